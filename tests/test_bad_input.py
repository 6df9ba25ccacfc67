"""Bad input everywhere gives one clear line naming the field, the value, the allowed range and
what to do: method configs, planner inputs, accelerate()'s arguments, profiles, the CLI's --out."""
import math

import pytest

import diffaccel
import diffaccel.profiler.calibrate_psnr as C
import diffaccel.profiler.schedule as S
from diffaccel.methods.deepcache import MAX_POWER, centred_steps
from diffaccel.profiler.schedule_file import load_schedule

NAN, INF = float("nan"), float("inf")

# ---- every float (and every other) field of every method config ------------------------------
CONFIGS = [
    # DeepCache: power bounds the non-uniform sampler's loop (1e6 used to never return)
    (lambda: diffaccel.DeepCache(schedule="non-uniform", power=INF), r"DeepCache power must be a number in \[1, 10\], got inf"),
    (lambda: diffaccel.DeepCache(schedule="non-uniform", power=1e6), r"power must be a number in \[1, 10\], got 1000000.0. 1 spaces"),
    (lambda: diffaccel.DeepCache(power=NAN), "DeepCache power must be .* got nan"),
    (lambda: diffaccel.DeepCache(power=0.5), "DeepCache power must be"),
    (lambda: diffaccel.DeepCache(power="1.4"), "DeepCache power must be"),
    (lambda: diffaccel.DeepCache(center=NAN), r"DeepCache center must be a number in \[0, 1\], got nan. 0.5 crowds"),
    (lambda: diffaccel.DeepCache(center=-INF), "DeepCache center must be"),
    (lambda: diffaccel.DeepCache(interval=2.0), "DeepCache interval must be a positive integer, got 2.0"),
    (lambda: diffaccel.DeepCache(interval=True), "DeepCache interval must be a positive integer, got True"),
    (lambda: diffaccel.DeepCache(skip_branch=-1), "skip_branch must be an integer >= 0"),
    (lambda: diffaccel.DeepCache(schedule=[0.5, NAN]), r"schedule times must lie in \[0, 1\]"),
    (lambda: diffaccel.DeepCache(schedule=[INF]), r"schedule times must lie in \[0, 1\]"),
    (lambda: diffaccel.DeepCache(schedule=[0, -3]), "schedule steps must be >= 0"),
    (lambda: diffaccel.DeepCache(schedule=5), "schedule must be 'uniform', 'non-uniform' or a list"),
    (lambda: diffaccel.DeepCache(schedule=""), "schedule must be one of"),
    (lambda: diffaccel.DeepCache(schedule=[]), "schedule list is empty"),
    (lambda: diffaccel.AdaptiveCache(threshold=NAN), r"threshold=...\) must be a finite number >= 0, got nan"),
    (lambda: diffaccel.AdaptiveCache(threshold=INF), "threshold=...\\) must be a finite number >= 0, got inf"),
    (lambda: diffaccel.AdaptiveCache(threshold=-0.1), "threshold=...\\) must be a finite number >= 0"),
    (lambda: diffaccel.AdaptiveCache(warmup=-1), "warmup=...\\) must be an integer >= 0"),
    (lambda: diffaccel.AdaptiveCache(max_consecutive=0), "max_consecutive=...\\) must be a positive integer"),
    (lambda: diffaccel.AdaptiveCache(reference=""), "reference=...\\) must be one of"),
    (lambda: diffaccel.FasterCache(extrapolation=NAN), r"extrapolation=...\) must be a number in \[0, 1\], got nan. 0 repeats"),
    (lambda: diffaccel.FasterCache(extrapolation=1.5), "extrapolation=...\\) must be a number in"),
    (lambda: diffaccel.FasterCache(alpha_low=INF), r"alpha_low=...\) must be a number in \[0, 4\], got inf"),
    (lambda: diffaccel.FasterCache(alpha_high=NAN), "alpha_high=...\\) must be a number in"),
    (lambda: diffaccel.FasterCache(attention_range=(0.2, 0.1)), "attention_range=...\\) must be \\(low, high\\)"),
    (lambda: diffaccel.FasterCache(cfg_range=(0.0, INF)), "cfg_range=...\\) must be \\(low, high\\)"),
    (lambda: diffaccel.FasterCache(low_freq_range=(NAN, 0.5)), "low_freq_range=...\\) must be"),
    (lambda: diffaccel.FasterCache(high_freq_range=0.3), "high_freq_range=...\\) must be"),
    (lambda: diffaccel.FasterCache(cfg_interval=0), "cfg_interval=...\\) must be a positive integer"),
    (lambda: diffaccel.PAB(spatial_range=(0.1, NAN)), "spatial_range=...\\) must be"),
    (lambda: diffaccel.PAB(temporal_range=(-INF, 0.5)), "temporal_range=...\\) must be"),
    (lambda: diffaccel.PAB(cross_interval=1.5), "cross_interval=...\\) must be a positive integer"),
    (lambda: diffaccel.ToMe(ratio=NAN), r"ToMe ratio must be a number in \[0, 0.75\].*got nan"),
    (lambda: diffaccel.ToMe(ratio=-INF), "ToMe ratio must be a number"),
    (lambda: diffaccel.ToMe(merge_mlp="no"), "ToMe merge_mlp must be True or False, got 'no'"),
    (lambda: diffaccel.ToMe(use_rand=1), "ToMe use_rand must be True or False"),
    (lambda: diffaccel.ToMe(seed=0.5), "ToMe seed must be an integer, got 0.5"),
    (lambda: diffaccel.ToMe(sx=0), "ToMe sx must be a positive integer"),
    (lambda: diffaccel.MediatorAttention(shortcut=INF), r"shortcut=...\) must be a number in \[0, 1\], got inf"),
    (lambda: diffaccel.MediatorAttention(query_scale_factor=NAN), "query_scale_factor=...\\) must be"),
    (lambda: diffaccel.MediatorAttention(full_attention_fraction=1.1), "full_attention_fraction=...\\) must be"),
    (lambda: diffaccel.MediatorAttention(mediator_ratio=(NAN, 0.2)), "mediator_ratio=...\\) entries must be"),
    (lambda: diffaccel.MediatorAttention(mediator_ratio=0.2), "mediator_ratio=...\\) must be \\(first, last\\)"),
    (lambda: diffaccel.SlidingTileAttention(full_attention_fraction=NAN), "full_attention_fraction=...\\) must be .* got nan"),
    (lambda: diffaccel.SlidingTileAttention(min_tokens=-1), "min_tokens=...\\) must be an integer >= 0"),
    (lambda: diffaccel.SlidingTileAttention(window=(1, 2, 3)), "window=...\\) must be 3 odd positive ints"),
    (lambda: diffaccel.SlidingTileAttention(backend="fastest"), "backend=...\\) must be one of"),
    (lambda: diffaccel.Instrument(targets="blocks"), "Instrument targets must be a tuple"),
    (lambda: diffaccel.Instrument(targets=("block",)), "Instrument targets must be among"),
]


@pytest.mark.parametrize("make, message", CONFIGS, ids=[m for _, m in CONFIGS])
def test_a_bad_config_value_is_one_clear_line(make, message):
    with pytest.raises(ValueError, match=message) as err:
        make().validate()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("power", [1.0, 1.4, 3.0, MAX_POWER])
def test_non_uniform_schedule_at_every_allowed_power_has_the_asked_count(power):
    for n, interval in ((50, 3), (20, 2), (7, 5), (1000, 4)):
        config = diffaccel.DeepCache(interval=interval, schedule="non-uniform", power=power)
        config.validate()
        steps = config.full_steps(n)
        assert len(steps) == math.ceil(n / interval) and steps[0] == 0 and steps == sorted(set(steps))


@pytest.mark.parametrize("power", [1e6, INF, NAN, 0.9])
def test_the_non_uniform_sampler_refuses_an_unbounded_power(power):
    with pytest.raises(ValueError, match="power must be a number in"):
        centred_steps(50, 17, 0.5, power)


# ---- planner inputs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_profile():
    from diffaccel.bundled.loader import bundled_dir
    from diffaccel.profiler.profile import load_profile

    return load_profile(bundled_dir() / "tiny-sd" / "profile.json")


def _plan(method, times=None, target=2.0):
    return lambda p: S.plan_method(method, p, p.times if times is None else times, target)


PLANNER_INPUTS = [
    (lambda p: S.plan_all(p, NAN), "target_speedup must be a finite number >= 1, got nan"),
    (lambda p: S.plan_all(p, INF), "target_speedup must be a finite number >= 1, got inf"),
    (lambda p: S.plan_all(p, 0.5), "target_speedup must be a finite number >= 1, got 0.5. e.g. 2.0"),
    (lambda p: S.plan_all(p, "2"), "target_speedup must be a finite number >= 1, got '2'"),
    (lambda p: S.plan_all(p, 2.0, steps=2.5), "steps must be a positive integer, got 2.5"),
    (lambda p: S.plan_all(p, 2.0, steps=-4), "steps must be a positive integer, got -4"),
    (lambda p: S.plan_for_max_error(p, NAN), "max_error must be a finite number >= 0, got nan"),
    (lambda p: S.plan_for_max_error(p, -1.0), "max_error must be a finite number >= 0"),
    (lambda p: C.plan_for_min_psnr(p, NAN), "--min-psnr must be a number"),
    (_plan("deepcache", target=NAN), "target_speedup must be a finite number >= 1, got nan"),
    (_plan("deepcache", times=[0.1, 0.5, 0.9]), "step times must be .* never increase"),
    (_plan("deepcache", times=[0.5, NAN]), "step times must be"),
    (_plan("deepcache", times=[]), "step times must be a non-empty list"),
    (_plan("deepcache", times=[1.5, 0.5]), r"normalised times in \[0, 1\]"),
]


@pytest.mark.parametrize("call, message", PLANNER_INPUTS, ids=[m for _, m in PLANNER_INPUTS])
def test_a_bad_planner_input_is_one_clear_line(sd_profile, call, message):
    with pytest.raises(ValueError, match=message) as err:
        call(sd_profile)
    assert "\n" not in str(err.value)


def test_the_per_call_replanner_refuses_a_bad_target(sd_profile):
    from diffaccel.profiler.schedule import ProfileSchedule

    with pytest.raises(ValueError, match="target_speedup must be a finite number >= 1, got nan"):
        ProfileSchedule(profile=sd_profile, target_speedup=NAN, controlled=diffaccel.DeepCache()).validate()


WINDOW_SEARCH = [
    (dict(max_error=NAN), "max_error must be a finite number >= 0, got nan"),
    (dict(max_error=None, target_density=NAN), r"target_density must be a number in \[0, 1\], got nan"),
    (dict(max_error=None, target_density=1.5), "target_density must be a number in"),
    (dict(sampled_steps=0), "sampled_steps must be a positive integer"),
    (dict(full_attention_fraction=INF), "full_attention_fraction must be a number in"),
    (dict(sizes=(2, 4)), "sizes must be odd positive window sizes"),
]


@pytest.mark.parametrize("kwargs, message", WINDOW_SEARCH, ids=[m for _, m in WINDOW_SEARCH])
def test_window_search_checks_its_numbers_before_running_anything(kwargs, message):
    from diffaccel.methods.window_search import search_windows

    with pytest.raises(ValueError, match=message):
        search_windows(object(), [{"prompt": "x"}], **kwargs)  # refused before the pipeline is touched


# ---- accelerate()'s arguments and profiles: refused before any work --------------------------
@pytest.fixture(scope="module")
def sd_pipe():
    import tiny_pipes as T

    return T.build("sd")


@pytest.fixture
def profile_file(tmp_path, sd_profile):
    """Write the shipped tiny-sd profile with some of its JSON replaced."""
    import json

    def write(**changes):
        data = sd_profile.to_json()
        for key, value in changes.items():
            if key == "call":
                data["costs"]["call"] = value
            elif key == "denoiser_share":
                data["costs"]["denoiser_share"] = value
            else:
                data[key] = value
        path = tmp_path / "p.json"
        path.write_text(json.dumps(data))
        return str(path)

    return write


ACCELERATE = [
    (dict(preset=""), ValueError, r"Unknown preset ''. Choose one of: quality, balanced, fast"),
    (dict(preset="Fast"), ValueError, r"Unknown preset 'Fast'. Choose one of"),
    (dict(preset=2), ValueError, r"Unknown preset 2. Choose one of"),
    (dict(preset=["fast"]), ValueError, r"Unknown preset \['fast'\]"),
    (dict(methods=[]), ValueError, r"methods= is empty, so nothing would be accelerated.*diffaccel.disable"),
    (dict(methods=()), ValueError, "methods= is empty"),
    (dict(methods=(m for m in [])), ValueError, "methods= is empty"),
    (dict(methods=42), TypeError, "methods must be a list of method configs or names.*got int"),
    (dict(methods={"deepcache": {"interval": 3}}), TypeError, "methods must be a list.*got dict"),
    (dict(methods=[diffaccel.DeepCache]), TypeError, r"holds the class DeepCache; give a config made from it, e.g. diffaccel.DeepCache\(\)"),
    (dict(methods=["warpdrive"]), ValueError, "Unknown method 'warpdrive'. Known methods"),
    (dict(methods=[None]), TypeError, "method configs such as diffaccel.DeepCache.*got NoneType"),
    (dict(methods=["deepcache", "deepcache"]), ValueError, "Each method may be given once; repeated: deepcache"),
    (dict(methods=[diffaccel.DeepCache(schedule="non-uniform", power=1e6)]), ValueError, "DeepCache power must be"),
    (dict(methods=[diffaccel.PAB()]), ValueError, "PAB cannot accelerate pipelines of the unet family"),
    (dict(methods=["deepcache"], preset="fast"), ValueError, "Give either methods=, preset= or target_speedup=, not several"),
    (dict(preset="fast", target_speedup=2.0), ValueError, "not several \\(got preset= and target_speedup=\\)"),
    (dict(methods=["deepcache"], profile="p.json"), ValueError, "profile= .* cannot go with methods="),
    (dict(methods=[diffaccel.DeepCache(interval=3)], profile="p.json"), ValueError, "profile= needs target_speedup="),
    (dict(methods=["tome"], profile="p.json"), ValueError, r"or DeepCache\(min_psnr=...\) among the methods"),
    (dict(profile="p.json"), ValueError, "Profile file 'p.json' does not exist"),  # the presets plan from one
    (dict(preset="fast", profile="p.json"), ValueError, "Profile file 'p.json' does not exist"),
    (dict(profile=123, target_speedup=2.0), TypeError, "profile must be a path to a profile JSON .* got int 123"),
    (dict(profile=None, target_speedup=NAN), ValueError, "target_speedup must be a finite number >= 1, got nan. e.g."),
    (dict(target_speedup=INF), ValueError, "target_speedup must be a finite number >= 1, got inf"),
    (dict(target_speedup=0.0), ValueError, "target_speedup must be a finite number >= 1, got 0.0"),
    (dict(target_speedup="2"), ValueError, "target_speedup must be a finite number >= 1, got '2'"),
    (dict(target_speedup=True), ValueError, "target_speedup must be a finite number >= 1, got True"),
    (dict(profile="no/such/p.json", target_speedup=2.0), ValueError, "Profile file 'no/such/p.json' does not exist"),
]


@pytest.mark.parametrize("kwargs, error, message", ACCELERATE, ids=[m for _, _, m in ACCELERATE])
def test_a_bad_accelerate_argument_is_refused_before_any_work(sd_pipe, kwargs, error, message):
    from diffaccel.api import session_of

    calls = []
    hook = sd_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=message) as err:
            diffaccel.accelerate(sd_pipe, **kwargs)
    finally:
        hook.remove()
    assert "\n" not in str(err.value)
    assert calls == [], "the denoiser ran (a calibration?) before the argument was refused"
    assert session_of(sd_pipe) is None


PROFILES = [
    (dict(times=list(reversed([0.96 - 0.04 * i for i in range(25)]))), "step times must run from noise \\(1\\) down to 0"),
    (dict(times=[0.5] * 25), "never increasing and not all equal, got \\[0.5, 0.5, 0.5, ..., 0.5, 0.5\\]"),
    (dict(times=[0.96 - 0.04 * i for i in range(24)] + [0.9]), "step times must run from noise"),
    (dict(times=[0.96 - 0.04 * i for i in range(24)] + [NAN]), "times must list at least 2 normalised step times in \\[0, 1\\]"),
    (dict(times=[1.5 - 0.04 * i for i in range(25)]), "times must list at least 2 normalised step times in \\[0, 1\\]"),
    (dict(times="0.9,0.5"), "times must list"),
    (dict(call=0), "costs.call .* must be a positive number, got 0"),
    (dict(call=-1e9), "costs.call"),
    (dict(denoiser_share=1.5), "costs.denoiser_share .* must be in \\(0, 1\\], got 1.5"),
]


@pytest.mark.parametrize("changes, message", PROFILES, ids=[m for _, m in PROFILES])
def test_a_profile_with_bad_times_or_costs_is_refused(sd_pipe, profile_file, changes, message):
    from diffaccel.profiler.profile import ProfileError, load_profile

    path = profile_file(**changes)
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert "\n" not in str(err.value) and "Re-create it with `diffaccel profile`" in str(err.value)
    with pytest.raises(ProfileError, match=message):
        diffaccel.accelerate(sd_pipe, profile=path, target_speedup=2.0)


def test_profile_argument_of_the_wrong_type_is_refused_by_load_profile():
    from diffaccel.profiler.profile import load_profile

    with pytest.raises(TypeError, match="profile must be a path to a profile JSON .* got int 123"):
        load_profile(123)


@pytest.mark.parametrize("name, attr, method", [("sd", "unet", "deepcache"), ("pixart", "transformer", "adaptive_cache")])
def test_replacing_the_denoiser_after_accelerate_is_said_at_the_next_call_and_in_stats(name, attr, method):
    import torch

    import tiny_pipes as T

    pipe = diffaccel.accelerate(T.build(name), methods=[method])
    T.run(name, pipe, steps=2)
    assert diffaccel.stats(pipe)["denoiser_calls"] > 0
    setattr(pipe, attr, torch.compile(getattr(pipe, attr)))  # a compiled wrapper still runs the hooks
    assert diffaccel.stats(pipe)["denoiser_calls"] > 0
    setattr(pipe, attr, getattr(T.build(name), attr))
    message = f"pipe.{attr} was replaced after diffaccel.accelerate\\(pipe\\).*call diffaccel.accelerate\\(pipe, ...\\) again"
    with pytest.raises(RuntimeError, match=message):
        T.run(name, pipe, steps=2)
    with pytest.raises(RuntimeError, match=message):
        diffaccel.stats(pipe)
    diffaccel.accelerate(pipe, methods=[method])  # accelerating again applies to the new denoiser
    T.run(name, pipe, steps=2)
    assert diffaccel.stats(pipe)["denoiser_calls"] > 0
    diffaccel.disable(pipe)
    T.run(name, pipe, steps=2)  # plain again


# ---- the CLI's output paths: one line, exit 2, nothing written -------------------------------
def _unwritable_folder(tmp_path):
    """A folder this process cannot write in (root writes anywhere chmod allows: then /sys)."""
    from diffaccel.validate import _writable

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked if not _writable(locked) else __import__("pathlib").Path("/sys")


def _bad_out(kind, tmp_path):
    """(path, expected message) for a bad output path of ``kind``."""
    a_file = tmp_path / "taken.json"
    a_file.write_text("{}")
    return {
        "folder": lambda: (tmp_path, "is a folder; give a file path"),
        "under-a-file": lambda: (a_file / "p.json", "cannot be created: .*taken.json' is a file, not a folder"),
        "unwritable": lambda: (_unwritable_folder(tmp_path) / "p.json", "cannot be written: no permission to write in"),
        "file-as-folder": lambda: (a_file, "is an existing file, not a folder"),
        "folder-under-a-file": lambda: (a_file / "sub", "cannot be created: .*taken.json' is a file, not a folder"),
        "unwritable-folder": lambda: (_unwritable_folder(tmp_path) / "sub", "cannot be written: no permission to write in"),
    }[kind]()


def _listing(folder):
    return sorted(str(p) for p in folder.rglob("*"))


def _shipped(name):
    from diffaccel.bundled.loader import bundled_dir

    return str(bundled_dir() / name / "profile.json")


CLI_OUT = [
    (["schedule", _shipped("tiny-sd"), "--target-speedup", "2"], "--out", "folder"),
    (["schedule", _shipped("tiny-sd"), "--target-speedup", "2"], "--out", "under-a-file"),
    (["schedule", _shipped("tiny-sd"), "--target-speedup", "2"], "--out", "unwritable"),
    (["profile", "tiny-sd", "--out", "{ok}"], "--plot", "folder"),
    (["profile", "tiny-sd"], "--out", "folder"),
    (["profile", "tiny-sd"], "--out", "under-a-file"),
    (["profile", "tiny-sd"], "--out", "unwritable"),
    (["demo", "--models", "tiny-sd"], "--out", "file-as-folder"),
    (["demo", "--models", "tiny-sd"], "--out", "folder-under-a-file"),
    (["demo", "--models", "tiny-sd"], "--out", "unwritable-folder"),
]


@pytest.mark.parametrize("argv, flag, kind", CLI_OUT, ids=[f"{a[0]} {f} {k}" for a, f, k in CLI_OUT])
def test_a_bad_output_path_is_one_line_exit_2_before_any_work(tmp_path, capsys, argv, flag, kind):
    from diffaccel import cli

    path, message = _bad_out(kind, tmp_path)
    before = _listing(tmp_path)
    argv = [a.replace("{ok}", str(tmp_path / "ok.json")) for a in argv]
    assert cli.main([*argv, flag, str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffaccel {argv[0]}: error: {flag} "), captured.err
    assert __import__("re").search(message, err[0]), err[0]
    assert captured.out == "", "work started (and printed) before the bad path was refused"
    assert _listing(tmp_path) == before  # nothing half-written, no stray temporary


@pytest.mark.parametrize("kind", ["file-as-folder", "folder-under-a-file", "unwritable-folder"])
def test_evaluate_refuses_a_bad_out_folder_in_one_line(tmp_path, capsys, monkeypatch, kind):
    import re
    import runpy
    import sys
    from pathlib import Path

    path, message = _bad_out(kind, tmp_path)
    before = _listing(tmp_path)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", "tiny-sd", "--out", str(path), "--no-progress"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "eval" / "evaluate.py"), run_name="__main__")
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error: --out ") and re.search(message, err[0]), captured.err
    assert _listing(tmp_path) == before


def test_schedule_overwrites_an_existing_file_atomically(tmp_path, capsys):
    from diffaccel import cli

    out = tmp_path / "s.json"
    out.write_text("old")
    assert cli.main(["schedule", _shipped("tiny-sd"), "--target-speedup", "2", "--out", str(out)]) == 0
    assert out.read_text().startswith("{") and _listing(tmp_path) == [str(out)]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from diffaccel.validate import write_atomic

    out = tmp_path / "r.json"
    out.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt  # any exception, interrupts included

    with pytest.raises(KeyboardInterrupt):
        write_atomic(out, fail)
    assert out.read_text() == "old" and _listing(tmp_path) == [str(out)]


# ---- files the library reads back -----------------------------------------------------------
def _schedule_file(tmp_path, chosen):
    import json

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": "diffaccel-schedule", "version": 1, "chosen": chosen}))
    return path


READ_BACK = [
    (lambda d: load_schedule(123), TypeError,
     "load_schedule needs the path of a schedule file, got int 123"),
    (lambda d: load_schedule(d / "none.json"), ValueError,
     "Schedule file .* does not exist; write one with `diffaccel schedule"),
    (lambda d: load_schedule(d), ValueError,
     "Schedule file .* is corrupted or not a file"),
    (lambda d: load_schedule(
        _schedule_file(d, {"config": {"method": "warpdrive"}})), ValueError, "is corrupted: its chosen method config cannot be read"),
    (lambda d: load_schedule(
        _schedule_file(d, {"config": {"method": "deepcache", "intervall": 3}})), ValueError, "is corrupted: .*TypeError"),
    (lambda d: load_schedule(_schedule_file(d, ["deepcache"])), ValueError, "is corrupted: its chosen method config"),
    (lambda d: load_schedule(
        _schedule_file(d, {"config": {"method": "step_cache"}, "with": [{"method": "nope"}]})), ValueError, "is corrupted"),
    (lambda d: load_schedule(
        _schedule_file(d, {"config": {"method": "deepcache", "schedule": "non-uniform", "power": 1e6}})), ValueError,
     "DeepCache power must be a number in"),
    (lambda d: diffaccel.SlidingTileAttention.from_profile(d / "none.json"), FileNotFoundError,
     "Window file .* does not exist; create it with diffaccel.methods.window_search"),
    (lambda d: diffaccel.SlidingTileAttention.from_profile(d), ValueError, "is not a JSON window file"),
    (lambda d: diffaccel.SlidingTileAttention.from_profile(_schedule_file(d, {})), ValueError, "holds no 'sliding_tile' section"),
]


@pytest.mark.parametrize("call, error, message", READ_BACK, ids=[m for _, _, m in READ_BACK])
def test_a_bad_file_read_back_is_one_clear_line(tmp_path, call, error, message):
    with pytest.raises(error, match=message) as err:
        call(tmp_path)
    assert "\n" not in str(err.value)


def test_a_corrupt_window_section_is_one_clear_line(tmp_path):
    import json

    path = tmp_path / "w.json"
    path.write_text(json.dumps({"sliding_tile": {"tile": [1, 2, 2]}}))
    with pytest.raises(ValueError, match="'sliding_tile' section is corrupted \\(KeyError"):
        diffaccel.SlidingTileAttention.from_profile(path)
    path.write_text(json.dumps({"sliding_tile": {"tile": [1, 2, 2], "window": [1, 2, 3], "layer_windows": {}}}))
    with pytest.raises(ValueError, match="window=...\\) must be 3 odd positive ints"):
        diffaccel.SlidingTileAttention.from_profile(path)


# ---- the CLI's numbers: one line, exit 2, before anything is loaded or written ---------------
CLI_NUMBERS = [
    (["demo", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["demo", "--steps", "-3"], "--steps must be a positive integer, got -3"),
    (["demo", "--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (["demo", "--timing-budget", "nan"], "--timing-budget must be a finite number >= 0, got nan"),
    (["demo", "--timing-budget", "-1"], "--timing-budget must be a finite number >= 0"),
    (["demo", "--presets", "turbo"], "--presets: unknown turbo"),
    (["demo", "--device", "nope"], "Unknown --device 'nope'; use cpu, cuda"),
    (["profile", "tiny-sd", "--device", "nope"], "Unknown --device 'nope'"),
    (["profile", "tiny-sd", "--dtype", "fp8"], "Unknown dtype 'fp8'"),
    (["profile", "tiny-sd", "--height", "-8"], "--height must be a positive integer, got -8"),
    (["profile", "tiny-sd", "--frames", "0"], "--frames must be a positive integer, got 0"),
    (["profile", "tiny-sd", "--frames", "5"], "--frames applies to video models only; tiny-sd makes images"),
    (["profile", "tiny-sd", "--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0, got nan"),
    (["profile", "tiny-sd", "--calibration-prompts", "-1"], "--calibration-prompts must be an integer >= 0"),
    (["schedule", _shipped("tiny-sd"), "--target-speedup", "nan"], "target_speedup must be a finite number >= 1, got nan"),
    (["schedule", _shipped("tiny-sd"), "--target-speedup", "2", "--steps", "0"], "steps must be a positive integer, got 0"),
    (["schedule", _shipped("tiny-sd"), "--max-error", "nan"], "max_error must be a finite number >= 0, got nan"),
    (["schedule", _shipped("tiny-dit"), "--max-error", "0"], "No schedule keeps the predicted error within 0"),
    (["schedule", _shipped("tiny-sd"), "--min-psnr", "inf"], "--min-psnr must be a number of dB"),
    (["schedule", "missing.json", "--target-speedup", "2"], "Profile file 'missing.json' does not exist"),
    (["profile", "tiny-sd", "--steps", "1"], "--steps must be >= 2"),
    (["profile", "tiny-sd", "--num-prompts", "0"], "--num-prompts must be >= 1"),
]


@pytest.mark.parametrize("argv, message", CLI_NUMBERS, ids=[m for _, m in CLI_NUMBERS])
def test_a_bad_cli_number_is_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    import re

    from diffaccel import cli

    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "out")] if argv[0] in ("demo", "profile") else []
    assert cli.main([*argv, *out]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffaccel {argv[0]}: error: "), captured.err
    assert re.search(message, err[0]), err[0]
    assert captured.out == "" and list(tmp_path.iterdir()) == []


EVALUATE_NUMBERS = [
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--resolution", "-32"], "--resolution must be a positive integer, got -32"),
    (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--timing-budget", "inf"], "--timing-budget must be a finite number >= 0, got inf"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--seeds", "a"], "Seeds 'a': use a range like 0-7"),
    (["--device", "nope"], "Unknown --device 'nope'"),
    (["--configs", "baseline,deepcache:power=1e6"], "DeepCache power must be a number in"),
    (["--configs", "target@nan"], "Speed-up target 'nan' must be a finite number >= 1, got nan"),
    (["--configs", "profile:p.json@0.5"], "Speed-up target '0.5' must be a finite number >= 1, got 0.5"),
    (["--configs", "fast@"], r"Config 'fast@': write PRESET@PATH, e.g. fast@p.json"),
]


@pytest.mark.parametrize("argv, message", EVALUATE_NUMBERS, ids=[m for _, m in EVALUATE_NUMBERS])
def test_evaluate_refuses_a_bad_number_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    import re
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", "tiny-sd", "--out", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "eval" / "evaluate.py"), run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("evaluate.py")]  # transformers may warn first
    assert "Traceback" not in err and len(ours) == 1 and ours[0].startswith("evaluate.py: error: "), err
    assert re.search(message, ours[0]), ours[0]
    assert list(tmp_path.iterdir()) == []

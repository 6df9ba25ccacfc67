"""The command line: help text, readable info, its own output, one-line errors."""
import argparse
import logging
import os
import subprocess
import sys

import pytest

from diffaccel import cli


def subcommand_parsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def in_required_group(parser, action) -> bool:
    return any(group.required and action in group._group_actions for group in parser._mutually_exclusive_groups)


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_help_entry_has_text_and_its_default(name):
    parser = subcommand_parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.option_strings and not flag and not action.required and not in_required_group(parser, action):
            text = formatter._expand_help(action)
            assert "default" in text, f"{name} {action.option_strings}: help does not say the default: {text!r}"
    assert "(default: 3)" in subcommand_parsers()["demo"].format_help()  # --repeats


def test_info_prints_readable_text_with_preset_settings(capsys):
    assert cli.main(["info", "tiny-sd"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("StableDiffusionPipeline: U-Net family")
    assert "{" not in out and "['" not in out  # no dict or list reprs
    assert "balanced  TextCache(" in out and "+ DeepCache(interval=3" in out and "+ ToMe(ratio=0.5" in out
    assert "  scheduler  DDIMScheduler" in out and "note" not in out  # the bundled DDIM does not clip
    assert "  profile    shipped with diffaccel" in out


def test_info_says_a_dit_without_a_profile_runs_the_generic_rule():
    import tiny_pipes

    from diffaccel.commands.info import profile_text
    from diffaccel.pipelines import detect

    assert "generic rule, whose PSNR is unmeasured" in profile_text(detect(tiny_pipes.build("pixart")))
    assert profile_text(detect(tiny_pipes.build("sd"))).startswith("none shipped (the presets run DeepCache's measured rule")


def test_info_notes_a_clipping_ddim_scheduler():
    import diffusers as D

    from diffaccel.commands.info import render, scheduler_notes

    clipping = D.DDIMScheduler.from_config(D.DPMSolverMultistepScheduler().config)  # the key absent: clip_sample=True
    notes = scheduler_notes(clipping)
    assert len(notes) == 1 and "clip_sample=True" in notes[0]
    assert scheduler_notes(D.DDIMScheduler(clip_sample=False)) == [] and scheduler_notes(None) == []
    info = {"pipeline": "P", "family": "image_dit", "denoiser": "D", "blocks": 2, "attention": {}, "cfg_mode": "batched",
            "scheduler": "DDIMScheduler", "notes": notes}
    assert "  note       clip_sample=True clips" in render(info, {"fast": []})


def test_library_noise_is_dropped_only_while_a_command_runs():
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    library = logging.getLogger("transformers")
    keep = Keep()
    library.addHandler(keep)
    noisy = logging.getLogger("transformers.utils.import_utils")
    try:
        with cli.own_output():
            noisy.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back ...")
            noisy.warning("a warning the user should see")
        noisy.warning("`SiglipImageProcessor` requires torchvision (not installed); falling back ...")
    finally:
        library.removeHandler(keep)
    assert seen == ["a warning the user should see",
                    "`SiglipImageProcessor` requires torchvision (not installed); falling back ..."]


def test_a_cli_run_starts_with_our_output(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffaccel.cli", "info", "tiny-video"], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("WanPipeline: video DiT family")
    assert "torchvision" not in proc.stderr and "low cpu memory" not in proc.stderr
    assert "Loading" not in proc.stderr  # a bundled model loads in a blink: no loading bars


def test_demo_bad_models_is_one_line(capsys):
    assert cli.main(["demo", "--models", "tiny-nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffaccel demo: error: --models: tiny-nope; the demo runs bundled models: tiny-sd, tiny-dit, "
                   "tiny-video."]


def test_profile_says_each_phase_and_the_whole_time(tmp_path, capsys):
    out = tmp_path / "not-yet" / "p.json"  # the folder is created
    assert cli.main(["profile", "tiny-sd", "--out", str(out), "--num-prompts", "1", "--steps", "3",
                     "--calibration-prompts", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("profiling tiny-sd: per-module costs") and "1 prompt x 3 steps" in lines[0]
    assert lines[1].startswith("calibrating PSNR: probe schedules")
    assert lines[2].startswith(f"wrote {out}") and "calibration" in lines[2] and lines[2].endswith("s in all")
    assert out.is_file()


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-dit", "tiny-video"])
def test_schedule_max_error_on_a_shipped_profile(model, capsys):
    # Every family's planners include TextCache, which plans nothing where it is not counted: the
    # search skips it instead of stopping at its refusal.
    from diffaccel.bundled.loader import bundled_dir

    assert cli.main(["schedule", str(bundled_dir() / model / "profile.json"), "--max-error", "0.2"]) == 0
    chosen = [line for line in capsys.readouterr().out.splitlines() if line.startswith("*")]
    assert len(chosen) == 1 and float(chosen[0].split()[3]) <= 0.2

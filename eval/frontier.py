"""Quality at speed, ours against every peer, on the bundled trained models (issue 15's suite).

    python eval/bench.py --suite frontier --model tiny-video [--seeds 2000-2015] [--captions heldout] \
        [--configs "quality;fast;step_cache:threshold=0.1"] [--lock /work/helpers/bench.lock] \
        --out eval/results/frontier_tiny-video.md

For every config (ours: the presets, ``target@X`` points and any eval/evaluate.py spec, e.g. a
method list ``adaptive_cache:threshold=0.1``; peers: eval/frontier_peers.py specs such as
``diffusers.mag:threshold=0.06``) and every seed: the output in pixel space, PSNR against the
unaccelerated output of the same seed and caption, and the denoiser FLOPs of that very call,
counted by diffaccel.flops.flop_counter (torch's FlopCounterMode with the CPU SDPA formula) active
only inside the denoiser's forward -- the same counter for peers and ours, so a method that skips
a whole denoiser call counts zero for it. Captions come from the held-out split, seeds from a range
no tuning uses; MagCache's ratios are calibrated on training captions (seeds 3000+).

Per-seed results are cached under runs/frontier/<model>/ keyed by the config spec and a hash of
the code behind it (diffaccel's sources for ours, the peer library versions for peers), so a rerun
after algorithm work recomputes only ours. Wall speed-up (median and IQR of paired rounds:
baseline call, config call, same seed) is measured last, under ``--lock`` when given (a directory
created while timing, as the shared machine's bench lock), and cached the same way.
Writes the table (--out), a frontier plot beside it (.png) and prints where the time went.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

# The presets include TextCache (lossless); target@X points are the planned step schedules alone, and
# text_cache alone is the lossless point.
OURS = ["text_cache", "quality", "balanced", "fast", "target@1.2", "target@1.3", "target@1.5", "target@1.7", "target@1.75", "target@2", "target@2.5",
        "target@3"]
# On the DiTs, TextCache composed with the verified step schedules at high PSNR (what a user gets
# from methods=[TextCache(), StepCache(min_psnr=X)]): the points between text_cache alone and "quality".
OURS_DIT = [f"text_cache+step_cache:min_psnr={p}" for p in (50, 45, 40)]
_DIT_PEERS = (  # three settings each around the documented default, most telling first
    [f"diffusers.mag:threshold={t}" for t in (0.03, 0.06, 0.12, 0.24)]
    + [f"diffusers.taylorseer:cache_interval={n}" for n in (2, 3, 5)]
    + ["diffusers.taylorseer:cache_interval=3,identifiers='default'"]  # its defaults: hooks nothing here
    + [f"diffusers.fbc:threshold={t}" for t in (0.05, 0.1, 0.2)]
    + [f"diffusers.seacache:threshold={t}" for t in (0.1, 0.25, 0.5)]
    + [f"diffusers.taylorseer:cache_interval={n},lite=True" for n in (2, 3)]
    + [f"diffusers.fastercache:spatial={n}" for n in (2, 3, 4)]
    + [f"diffusers.pab:spatial={n}" for n in (2, 3, 4)]
    + [f"cachedit.dbcache:threshold={t}" for t in (0.1, 0.2, 0.3)]
    + [f"cachedit.dbcache:threshold={t},taylorseer=1" for t in (0.2, 0.3)]
)
DEFAULT_PEERS = {
    "tiny-sd": [f"DeepCache:interval={n}" for n in (2, 3, 5)] + ["DeepCache:interval=3,branch=1"]
    + [f"tomesd:ratio={r}" for r in (0.3, 0.5, 0.7)]
    + ["diffusers.fbc:threshold=0.1", "cachedit.dbcache:threshold=0.1"],  # to say why they cannot run here
    "tiny-dit": _DIT_PEERS + ["DeepCache:interval=3", "tomesd:ratio=0.5"],
    "tiny-video": _DIT_PEERS,
}


def add_arguments(p) -> None:
    p.add_argument("--model", choices=sorted(DEFAULT_PEERS), required=True)
    p.add_argument("--seeds", default="2000-2015", help="e.g. 2000-2015 (seed s captions prompt s mod the number of captions)")
    p.add_argument("--captions", choices=("heldout", "train"), default="heldout")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p.add_argument("--ours", default=None, help="our config specs, ';'-separated (eval/evaluate.py syntax; default: "
                   "OURS, and OURS_DIT on the DiTs)")
    p.add_argument("--configs", default="", help="more config specs, ours or peers, ';'-separated")
    p.add_argument("--peers", default=None, help="peer specs, ';'-separated (default: every peer at its settings; '' for none)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only configs whose spec holds one")
    p.add_argument("--rounds", type=int, default=5, help="paired timing rounds per config (0: no wall timing)")
    p.add_argument("--time", default="", help="';'-separated specs to time (a trailing * matches a prefix; default all)")
    p.add_argument("--lock", default=os.environ.get("DIFFACCEL_BENCH_LOCK"),
                   help="directory to create while timing (waits while it exists)")
    p.add_argument("--report-only", action="store_true",
                   help="generate nothing: tabulate the configs whose every seed is cached, list the rest as not run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None, help="per-seed cache (default runs/frontier/<model>)")
    p.add_argument("--out", type=Path, default=None, help="markdown table (default eval/results/frontier_<model>.md)")


# -- what a config is, and the key its cached results live under --------------------------------
def _source_hash() -> str:
    import diffaccel

    digest = hashlib.sha256()
    roots = [Path(diffaccel.__file__).parent]
    for sub in ("kernels", "pipelines"):
        with contextlib.suppress(ImportError):
            roots.append(Path(__import__(f"diffaccel.{sub}", fromlist=["_"]).__file__).parent)
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
        for path in sorted(root.rglob("*.json")):  # shipped schedules
            digest.update(path.read_bytes())
    from diffaccel.bundled.loader import bundled_dir

    for path in sorted(bundled_dir().glob("*/profile.json")):  # the bundled models' profiles plan our schedules
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _peer_versions() -> str:
    from importlib import metadata

    out = []
    for dist in ("diffusers", "cache-dit", "DeepCache", "tomesd", "torch"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    return hashlib.sha256(",".join(out).encode()).hexdigest()[:10]


class Config:
    def __init__(self, spec: str):
        from frontier_peers import is_peer, parse_peer

        self.spec = spec
        self.peer = is_peer(spec)
        if self.peer:
            parse_peer(spec)  # bad specs fail before any work
            self.ours = None
        elif spec == "baseline":
            self.ours = None
        else:
            from diffaccel.evaluation.configs import parse_config

            self.ours = parse_config(spec)
        self.slug = re.sub(r"[^A-Za-z0-9.=_+-]+", "_", spec)

    @property
    def owner(self) -> str:
        return "baseline" if self.spec == "baseline" else ("peer" if self.peer else "diffaccel")


def parse_specs(text: str) -> list[str]:
    return [s.strip() for s in (text or "").split(";") if s.strip()]


# -- measuring ---------------------------------------------------------------------------------
class _Global:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to the total only. The tracker
    walks the module tree by recursion and never returns on cache-dit's (its cached-blocks wrapper
    makes the tree a cycle); the total needs no per-module attribution."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


@contextlib.contextmanager
def total_flop_counter():
    """diffaccel.flops.flop_counter (FlopCounterMode, CPU SDPA counted) without the per-module tracker."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffaccel.compat import register_cpu_sdpa_flop_formula

    register_cpu_sdpa_flop_formula()
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Global()
    with torch.no_grad(), counter:
        yield counter


class DenoiserMeter:
    """Counts the denoiser's FLOPs (diffaccel.flops.flop_counter, active only inside its forward)
    and wall time, over every forward of a pipeline call; hooks outside anything a method adds."""

    def __init__(self, denoiser):
        self.counting, self.flops, self.seconds = False, 0, 0.0
        self._depth, self._stack, self._start = 0, None, 0.0
        denoiser.register_forward_pre_hook(self._pre, prepend=True)
        denoiser.register_forward_hook(self._post, always_call=True)

    def reset(self, counting: bool):
        self.counting, self.flops, self.seconds = counting, 0, 0.0

    def _pre(self, module, args):
        self._depth += 1
        if self._depth == 1:
            if self.counting:
                self._stack = contextlib.ExitStack()
                self._counter = self._stack.enter_context(total_flop_counter())
            self._start = time.perf_counter()

    def _post(self, module, args, output):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start
            if self._stack is not None:
                self._stack.close()
                self._stack = None
                self.flops += int(self._counter.get_total_flops())


class Runner:
    def __init__(self, args):
        import torch

        import diffaccel
        from diffaccel.bundled.loader import default_call_kwargs
        from diffaccel.evaluation.generation import CallSettings, builtin_prompts
        from frontier_peers import PeerInstaller, denoiser_of

        torch.set_num_threads(args.threads)
        self.args, self.model = args, args.model
        self.video = args.model == "tiny-video"
        self.pipe = diffaccel.load_bundled(args.model)
        self.pipe.set_progress_bar_config(disable=True)
        kwargs = default_call_kwargs(args.model)
        if args.steps:
            kwargs["num_inference_steps"] = args.steps
        self.steps = kwargs["num_inference_steps"]
        self.call = CallSettings(kwargs)
        self.prompts = builtin_prompts("heldout" if args.captions == "heldout" else "bundled", self.video)
        calibration = builtin_prompts("bundled", self.video)[-2:]  # training captions, for MagCache
        self.cache = args.cache or REPO / "runs" / "frontier" / args.model
        self.cache.mkdir(parents=True, exist_ok=True)
        self.peers = PeerInstaller(self.pipe, args.model, kwargs, calibration, self.cache)
        self.meter = DenoiserMeter(denoiser_of(self.pipe))
        self.keys = {"diffaccel": _source_hash(), "peer": _peer_versions(), "baseline": _peer_versions()}

    def folder(self, config: Config) -> Path:
        key = self.keys[config.owner]
        return self.cache / f"{self.args.captions}-{self.steps}steps" / config.slug / key

    def install(self, config: Config) -> int:
        import diffaccel
        from frontier_peers import denoiser_of, hooked_modules, module_marks

        self.peers.clear()
        diffaccel.disable(self.pipe)
        self.before = module_marks(denoiser_of(self.pipe))
        if config.peer:
            return self.peers.install(config.spec)
        if config.ours is not None:
            config.ours.apply(self.pipe)
        return hooked_modules(denoiser_of(self.pipe), self.before)

    def hooked_now(self) -> int:
        """Modules hooked now, against the bare model: a method may hook some only at its first call
        (TextCache settles its modules per call), so a count taken at install alone misses them."""
        from frontier_peers import denoiser_of, hooked_modules

        return hooked_modules(denoiser_of(self.pipe), self.before)

    def generate(self, seed: int, counting: bool):
        from diffaccel.evaluation.generation import generate

        self.meter.reset(counting)
        with self.peers.call_context():
            start = time.perf_counter()
            image = generate(self.pipe, self.prompts[seed % len(self.prompts)], seed, self.call)
            wall = time.perf_counter() - start
        return image, self.meter.flops, wall, self.meter.seconds

    def clear(self):
        import diffaccel

        self.peers.clear()
        diffaccel.disable(self.pipe)

    # -- quality: every seed, FLOPs counted ------------------------------------------------------
    def quality(self, config: Config, seeds: list[int]) -> dict:
        import numpy as np

        folder = self.folder(config)
        meta_path = folder / "meta.json"
        todo = [s for s in seeds if not (folder / f"seed{s:04d}.npz").is_file()]
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if todo and "error" not in meta and self.args.report_only:
            return {"error": f"not run yet ({len(seeds) - len(todo)} of {len(seeds)} seeds cached; rerun without --report-only)"}
        if todo and "error" not in meta:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                hooked = self.install(config)
                if config.peer and hooked == 0:  # its output would be the baseline's: nothing to measure
                    raise ValueError("hooks no module of this model (0 modules): it acts on nothing")
                meta = {"spec": config.spec, "hooked": hooked}
                if config.ours is not None:
                    meta["resolved"] = config.ours.method_dicts()
                for seed in todo:
                    image, flops, _, _ = self.generate(seed, counting=True)
                    meta["hooked"] = max(meta["hooked"], self.hooked_now())
                    tmp = folder / f"seed{seed:04d}.partial.npz"
                    np.savez(tmp, image=image, flops=flops)
                    os.replace(tmp, folder / f"seed{seed:04d}.npz")
            except Exception as exc:  # a peer (or target) that cannot serve this model: say why, go on
                meta = {"spec": config.spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                print(f"{config.spec}: cannot run: {meta['error']}", file=sys.stderr, flush=True)
            finally:
                self.clear()
            meta_path.write_text(json.dumps(meta, default=str))
        if "error" in meta:
            return {"error": meta["error"]}
        data = {s: np.load(folder / f"seed{s:04d}.npz") for s in seeds}
        return {"hooked": meta.get("hooked"), "images": {s: d["image"] for s, d in data.items()},
                "flops": {s: int(d["flops"]) for s, d in data.items()}}

    # -- wall: paired rounds, same seed, under the lock -------------------------------------------
    def timing(self, configs: list[Config], seed: int, rounds: int, budget_s: float = 480.0) -> dict:
        base = Config("baseline")
        out, todo = {}, []
        for config in configs:
            path = self.folder(config) / f"timing-{rounds}rounds.json"
            if path.is_file():
                out[config.spec] = json.loads(path.read_text())
            elif config.spec != "baseline" and not self.args.report_only:
                todo.append((config, path))
        while todo:
            with bench_lock(self.args.lock):
                start = time.monotonic()
                while todo and time.monotonic() - start < budget_s:
                    config, path = todo.pop(0)
                    try:
                        record = self._pairs(base, config, seed, rounds)
                    except Exception as exc:
                        record = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                    finally:
                        self.clear()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(record))
                    out[config.spec] = record
        return out

    def _pairs(self, base: Config, config: Config, seed: int, rounds: int) -> dict:
        self.install(config)
        self.generate(seed, counting=False)  # warm-up (first-call work of the method)
        pairs = []
        for _ in range(rounds):
            self.install(base)
            _, _, base_wall, base_den = self.generate(seed, counting=False)
            self.install(config)
            _, _, wall, den = self.generate(seed, counting=False)
            pairs.append([base_wall, wall, base_den, den])
        return {"pairs": pairs, "load": os.getloadavg()[0]}


@contextlib.contextmanager
def bench_lock(path: str | None):
    if not path:
        yield
        return
    while True:
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            time.sleep(5)
    try:
        yield
    finally:
        os.rmdir(path)


def main(args) -> int:
    from diffaccel.evaluation.runner import parse_seeds
    from frontier_peers import PEERS  # noqa: F401  (fails early if the module is broken)
    from frontier_report import summarise, write_report

    t0 = time.monotonic()
    peers = DEFAULT_PEERS[args.model] if args.peers is None else parse_specs(args.peers)
    ours = args.ours if args.ours is not None else ";".join(OURS + (OURS_DIT if args.model != "tiny-sd" else []))
    specs = ["baseline"] + parse_specs(ours) + parse_specs(args.configs) + peers
    wanted = [w for w in args.only.split(",") if w]
    specs = [s for s in dict.fromkeys(specs) if s == "baseline" or not wanted or any(w in s for w in wanted)]
    try:
        configs = [Config(s) for s in specs]
        seeds = parse_seeds(args.seeds)
    except (ValueError, KeyError) as err:
        print(f"bench.py --suite frontier: error: {err}", file=sys.stderr)
        return 2
    runner = Runner(args)
    results, clock = {}, {}
    for config in configs:
        start = time.monotonic()
        results[config.spec] = runner.quality(config, seeds)
        clock[config.spec] = time.monotonic() - start
        print(f"{config.spec}: quality done ({clock[config.spec]:.0f}s)", flush=True)
    t_quality = time.monotonic() - t0
    timed = parse_specs(args.time)
    runnable = [c for c in configs if "error" not in results[c.spec] and (not timed or any(
        w == c.spec or (w.endswith("*") and c.spec.startswith(w[:-1])) for w in timed))]
    timings = runner.timing(runnable, seeds[0], args.rounds) if args.rounds > 0 else {}
    t_total = time.monotonic() - t0
    rows = summarise(configs, results, timings)
    out = args.out or REPO / "eval" / "results" / f"frontier_{args.model}.md"
    command = "python eval/bench.py " + shlex.join(sys.argv[1:])
    write_report(out, rows, model=args.model, steps=runner.steps, seeds=seeds, captions=args.captions,
                 command=command, seconds=(t_quality, t_total - t_quality), rounds=args.rounds)
    print(out.read_text())
    print(f"frontier {args.model}: quality {t_quality:.0f}s, timing {t_total - t_quality:.0f}s", flush=True)
    return 0

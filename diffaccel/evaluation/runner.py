"""One evaluation: generate every (config, seed), score, time, report. Resumable and
multi-process: seeds are dealt round-robin to ranks (seed list position i goes to rank i mod N),
each rank generates and scores its own, independently (diffaccel issues no collective unless
asked, so ranks never wait for each other, whatever each one skips on resume); rank 0 computes
FID over all seeds in order, times the configs alone and writes the report, so every number but
the timings equals a 1-process run.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffaccel import metrics
from diffaccel.evaluation import generation, quality, report, timing
from diffaccel.evaluation.configs import EvalConfig, parse_configs
from diffaccel.evaluation.distributed import Ranks
from diffaccel.validate import at_least, non_negative_int, positive_int


@dataclass
class EvalOptions:
    model: str
    out: Path
    configs: list[EvalConfig] | str = "baseline,balanced"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    prompts: str | None = None  # file or built-in set; default: the model's own captions or generic
    steps: int | None = None
    resolution: int | None = None
    frames: int | None = None
    device: str | None = None
    dtype: str | None = None
    repeats: int = 3  # timed rounds at least (median); more until the medians are stable...
    timing_budget_s: float = 60.0  # ...or this many seconds of timing passed (0: exactly `repeats`)
    warmup: int = 1  # untimed calls per config after the FLOP-counting call
    inception: str | None = None  # FID feature extractor file
    fid_ref: str | None = None  # folder of reference images or .npz statistics
    clip: str | None = None  # local CLIP model folder
    fid_feature: torch.nn.Module | None = None  # injected extractor (tests, custom features)
    progress: bool = True
    pipe: object = None  # an already loaded pipeline (demo reuses it)
    replace_stale: bool = False  # demo: regenerate configs whose methods changed (evaluate: refuse)

    def __post_init__(self):
        """Numbers refused before anything is loaded or written (a bad one used to crash mid-run,
        after the output folder's manifest was written)."""
        for flag, value in (("--steps", self.steps), ("--resolution", self.resolution), ("--frames", self.frames)):
            if value is not None:
                positive_int(value, flag, "Leave it out for the model's default.")
        positive_int(self.repeats, "--repeats", "It is the least number of timed rounds, e.g. 3.")
        non_negative_int(self.warmup, "--warmup", "It counts untimed calls per config before timing, e.g. 1.")
        at_least(self.timing_budget_s, "--timing-budget", 0.0, "Seconds of timing; 0 times exactly --repeats rounds.")


def parse_seeds(text: str) -> list[int]:
    """"0-7", "0,3,5" or "0-3,8" -> sorted distinct seeds."""
    seeds: set[int] = set()
    try:
        for part in filter(None, text.split(",")):
            low, dash, high = part.partition("-")
            seeds.update(range(int(low), int(high) + 1) if dash else [int(low)])
    except ValueError:
        raise ValueError(f"Seeds {text!r}: use a range like 0-7, a list like 0,3,5, or both (0-3,8).") from None
    if not seeds:
        raise ValueError("No seeds given (e.g. --seeds 0-7).")
    return sorted(seeds)


def model_identity(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def check_manifest(out: Path, manifest: dict) -> None:
    """Refuse an output folder holding another model's (or other settings') results."""
    path = out / "run.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for key in manifest:
        if old.get(key) != manifest.get(key):
            what = "a different model" if key == "model" else f"results made with different {key}"
            raise ValueError(f"Output folder {out} holds {what} ({key}: {str(old.get(key))[:80]!r}, now "
                             f"{str(manifest.get(key))[:80]!r}). Use another --out; nothing was overwritten.")


class _Bar:
    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=True)

    def update(self, n: int = 1):
        self.bar.update(n)

    def add_total(self, n: int):
        self.bar.total += n
        self.bar.refresh()

    def close(self):
        self.bar.close()


def _fid_reference(fid, options: EvalOptions, ranks: Ranks, video: bool, n: int) -> str:
    """Load FID's reference features (rank 0 only: states are summed across ranks)."""
    from diffaccel.bundled.loader import BUNDLED_MODELS

    if options.fid_ref and options.fid_ref.endswith(".npz"):
        if ranks.main:
            metrics.load_fid_statistics(fid, options.fid_ref)
        return f"statistics {options.fid_ref}"
    if options.fid_ref:
        from PIL import Image

        files = sorted(p for p in Path(options.fid_ref).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise FileNotFoundError(f"--fid-ref {options.fid_ref}: no .png/.jpg reference images there.")
        if ranks.main:
            for chunk in range(0, len(files), 32):
                images = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files[chunk:chunk + 32]]
                fid.update(metrics.to_uint8_nchw(np.stack(images)), real=True)
        return f"{len(files)} images in {options.fid_ref}"
    if options.model in BUNDLED_MODELS:
        from diffaccel.bundled.dataset import make_images, make_videos

        count = max(64, n)
        if ranks.main:
            data = make_videos(count // 8 + 1, seed=12345)[0].reshape(-1, 32, 32, 3) if video else make_images(count, seed=12345)[0]
            fid.update(metrics.to_uint8_nchw(data.astype(np.float32) / 255), real=True)
        return f"{'frames of ' if video else ''}synthetic dataset samples (seed 12345)"
    return "baseline outputs"


def run_evaluation(options: EvalOptions) -> dict | None:
    """Run it; rank 0 returns the results dict (also written to out/results.json)."""
    configs = parse_configs(options.configs) if isinstance(options.configs, str) else options.configs
    out = Path(options.out)
    ranks = Ranks.from_env(options.device)
    try:
        return _run(options, configs, out, ranks)
    finally:
        ranks.close()


def _run(options: EvalOptions, configs: list[EvalConfig], out: Path, ranks: Ranks) -> dict | None:
    from diffaccel.bundled.loader import BUNDLED_MODELS
    from diffaccel.loading import load_pipeline

    check_manifest(out, {"model": model_identity(options.model)})  # fail before loading anything
    timing.TimingPlan(min_rounds=options.repeats, budget_s=options.timing_budget_s)  # bad values fail here too
    if options.prompts not in (None, *generation.BUILTIN_SETS):
        generation.read_prompts(options.prompts, options.model, video=False)  # a missing file fails here too
    pipe = options.pipe or load_pipeline(options.model, device=ranks.device(options.device), dtype=options.dtype)
    pipe.set_progress_bar_config(disable=True)
    video = generation.is_video_pipeline(pipe)
    prompts = generation.read_prompts(options.prompts or ("bundled" if options.model in BUNDLED_MODELS else "generic"),
                                      options.model, video)
    call = generation.CallSettings.for_model(options.model, options.steps, options.resolution, options.frames, video)
    manifest = {"model": model_identity(options.model), "call": call.kwargs, "prompts": prompts, "dtype": options.dtype}
    check_manifest(out, manifest)
    for config in configs:  # bad parameters or a method that does not fit this model: fail before generating
        config.apply(pipe)
    import diffaccel

    diffaccel.disable(pipe)
    stale = stale_configs(out, configs)
    if stale and not options.replace_stale:
        raise ValueError(f"Output folder {out} holds samples of {', '.join(stale)} made with other methods (the "
                         "preset or profile changed). Use another --out; nothing was overwritten.")
    ranks.barrier()
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(manifest, indent=1))
        for config in configs:
            folder = out / "samples" / config.name
            if config.name in stale:
                shutil.rmtree(folder)
                (out / "timing.json").unlink(missing_ok=True)
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "config.json").is_file():
                (folder / "config.json").write_text(_methods_json(config))
    ranks.barrier()

    mine = ranks.mine(options.seeds)
    prompt_of = {seed: prompts[seed % len(prompts)] for seed in options.seeds}
    bar = _Bar(len(configs) * len(mine), f"{options.model}: generate", options.progress and ranks.main)
    for config in configs:
        config.apply(pipe)
        for seed in mine:
            viewable, raw = generation.sample_paths(out, config.name, seed, video)
            if not raw.is_file():  # finished samples are never generated again
                generation.save_sample(generation.generate(pipe, prompt_of[seed], seed, call), viewable, raw)
            bar.update()
    diffaccel.disable(pipe)
    bar.close()

    extra_note = metrics.eval_extra_note()
    notes, scorers = ([extra_note] if extra_note else []), {}
    for key, make in (("clip", lambda: metrics.ClipScorer(options.clip, device=pipe.device)),
                      ("lpips", lambda: metrics.LpipsScorer(device=pipe.device))):
        try:
            scorers[key] = make()
        except metrics.MetricUnavailable as why:
            notes.append(str(why))
    follows = quality.follows_bundled_captions(prompts)
    if not follows:
        notes.append("Prompt-following skipped: it is read from pixels only for the bundled models' captions.")

    fid, fid_note, why = _fid_metric(options, pipe)
    if why:
        notes.append(why)
    if fid is not None:
        fid_note["reference"] = _fid_reference(fid, options, ranks, video, len(options.seeds))

    records, fids = [], {}
    for config in configs:
        for seed in mine:
            sample = generation.load_sample(generation.sample_paths(out, config.name, seed, video)[1])
            baseline = None if config.is_baseline else generation.load_sample(
                generation.sample_paths(out, configs[0].name, seed, video)[1])
            records.append(quality.sample_record(config.name, seed, prompt_of[seed], sample, baseline,
                                                 scorers.get("clip"), scorers.get("lpips"), follows))
    records = ranks.gather(records)
    ranks.barrier()  # every rank's samples are on disk
    if fid is not None and ranks.main:
        # Rank 0 reads every seed's sample in seed order: the same feature sums as one process, bit
        # for bit (summing per-rank states would change the last digits with the rank count).
        for config in configs:
            fid.reset()  # keeps the reference features
            for seed in options.seeds:
                sample = generation.load_sample(generation.sample_paths(out, config.name, seed, video)[1])
                if fid_note["reference"] == "baseline outputs" and config.is_baseline:
                    fid.update(metrics.to_uint8_nchw(sample).to(pipe.device), real=True)
                fid.update(metrics.to_uint8_nchw(sample).to(pipe.device), real=False)
            fids[config.name] = round(float(fid.compute()), 6)

    speed = None
    if ranks.main:
        speed = _timings(pipe, configs, out, options, call, prompts[options.seeds[0] % len(prompts)], options.seeds[0])
    ranks.barrier()
    if not ranks.main:
        return None
    order = {c.name: i for i, c in enumerate(configs)}
    records.sort(key=lambda r: (order[r["config"]], r["seed"]))
    results = report.assemble(options, configs, records, fids, fid_note, speed, notes, video,
                              scorers["clip"].name if "clip" in scorers else None)
    report.write(out, results)
    return results


def _fid_metric(options: EvalOptions, pipe) -> tuple[object | None, dict | None, str | None]:
    """(torchmetrics FID on the chosen features, their description, why FID is skipped)."""
    from diffaccel.bundled.loader import BUNDLED_MODELS

    if not metrics.available("torchmetrics"):
        return None, None, None  # said once, in the eval extra's note
    try:
        if options.fid_feature is not None:
            feature, feature_name = options.fid_feature, getattr(options.fid_feature, "name", "injected feature module")
        elif options.inception is None and options.model in BUNDLED_MODELS:
            feature = metrics.ColourGridFeatures()  # the bundle's own extractor: no Inception offline
            feature_name = feature.name
        else:
            feature, feature_name = metrics.fid_feature_extractor(options.inception)
        if len(options.seeds) < 2:
            raise metrics.MetricUnavailable("FID skipped: it needs at least 2 seeds (a covariance).")
    except metrics.MetricUnavailable as why:
        return None, None, str(why)
    fid = metrics.make_fid(feature.to(pipe.device) if hasattr(feature, "to") else feature)
    return fid, {"features": feature_name}, None


def _methods_json(config: EvalConfig) -> str:
    return json.dumps({"spec": config.spec, "methods": config.method_dicts()}, default=str, indent=1)


def stale_configs(out: Path, configs: list[EvalConfig]) -> list[str]:
    """Configs whose saved samples were made with other method settings than they resolve to now."""
    stale = []
    for config in configs:
        meta = out / "samples" / config.name / "config.json"
        if meta.is_file() and meta.read_text() != _methods_json(config):
            stale.append(config.name)
    return stale


def _timings(pipe, configs, out: Path, options: EvalOptions, call, prompt: str, seed: int) -> dict:
    """Latency/FLOPs of all configs, reused from out/timing.json when it covers them: timings
    compare configs measured together, and a resumed run should not redo (or change) them."""
    path = out / "timing.json"
    names = [c.name for c in configs]
    if path.is_file():
        stored = json.loads(path.read_text())
        if all(n in stored.get("configs", {}) for n in names):
            return {**stored, "configs": {n: stored["configs"][n] for n in names}}

    def one_call():
        generation.generate(pipe, prompt, seed, call)

    plan = timing.TimingPlan(min_rounds=options.repeats, budget_s=options.timing_budget_s)
    bar = _Bar(len(configs) * (1 + plan.min_rounds), f"{options.model}: time", options.progress)
    measured = timing.measure(pipe, configs, one_call, plan, warmup=options.warmup, progress=bar)
    bar.close()
    path.write_text(json.dumps(measured, indent=1))
    return measured


def finite_or_text(value):
    """JSON has no infinity: identical outputs are written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: finite_or_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_text(v) for v in value]
    return value

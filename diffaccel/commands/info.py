"""``diffaccel info MODEL``: what diffaccel recognises in a pipeline."""
from __future__ import annotations

import json
from dataclasses import fields

FAMILY_NAMES = {"unet": "U-Net", "image_dit": "image DiT", "video_dit": "video DiT"}
CFG_MODES = {"batched": "unconditional and conditional halves in one denoiser call",
             "separate": "one denoiser call per guidance branch"}


def add_arguments(parser) -> None:
    parser.add_argument("model", help="bundled name (tiny-sd, tiny-dit, tiny-video), local pipeline folder or hub id")
    parser.add_argument("--device", default="cpu", help="where to load the model: cpu, cuda or auto")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def method_text(method) -> str:
    """``DeepCache(interval=3, branch=0, schedule='uniform')``: the config as it would be written."""
    settings = [f"{f.name}={getattr(method, f.name)!r}" for f in fields(method) if f.init]
    return f"{type(method).__name__}({', '.join(settings)})"


def preset_methods_of(family: str) -> dict[str, list]:
    from diffaccel.presets import PRESETS, preset_methods

    return {name: preset_methods(name, family) for name in PRESETS}


def scheduler_notes(scheduler) -> list[str]:
    """What a user should know about the pipeline's scheduler before caching steps."""
    notes = []
    if getattr(getattr(scheduler, "config", None), "clip_sample", False):
        notes.append("clip_sample=True clips every predicted clean sample, which makes skipped or cached steps cost far "
                     "more PSNR (tiny-dit under DDIM: one skipped step 20-24 dB, 44-52 dB with clip_sample=False; "
                     "eval/results/presets.md). DDIMScheduler.from_config keeps this default when the config lacks the "
                     "key: keep it only if the model was trained with it.")
    return notes


def profile_text(adapter) -> str:
    """Whether a redundancy profile is shipped for the model, and what its absence means for the presets."""
    from diffaccel.profiler.schedule import shipped_profile

    if shipped_profile(adapter) is not None:
        return "shipped with diffaccel (the presets and target_speedup plan from it)"
    if adapter.family == "unet":
        return ("none shipped (the presets run DeepCache's measured rule; target_speedup calibrates quickly; "
                "`diffaccel profile MODEL --out p.json --verify 16 --validate 16` makes one the presets plan from)")
    return ("none shipped: the presets' StepCache runs its generic rule, whose PSNR is unmeasured on this model; "
            "`diffaccel profile MODEL --out p.json --step-graph 2 --verify 12 --validate 24` makes one")


def render(info: dict, presets: dict[str, list]) -> str:
    family = info["family"]
    attention = ", ".join(f"{count} {kind}" for kind, count in info["attention"].items()) or "none found"
    lines = [f"{info['pipeline']}: {FAMILY_NAMES.get(family, family)} family",
             f"  denoiser   {info['denoiser']}, {info['blocks']} blocks",
             f"  attention  {attention}",
             f"  CFG        {info['cfg_mode']}: {CFG_MODES.get(info['cfg_mode'], '')}".rstrip(": ")]
    if info.get("scheduler"):
        lines.append(f"  scheduler  {info['scheduler']}")
    if "profile" in info:
        lines.append(f"  profile    {info['profile']}")
    lines += [f"  note       {note}" for note in info.get("notes", [])]
    lines.append("  presets")
    width = max(len(name) for name in presets)
    for name, methods in presets.items():
        for i, text in enumerate([method_text(m) for m in methods] or ["(no methods)"]):
            lines.append(f"    {name if i == 0 else '':<{width}}  {'+ ' if i else ''}{text}")
    return "\n".join(lines)


def main(args) -> int:
    from diffaccel.loading import load_pipeline
    from diffaccel.pipelines import detect

    pipe = load_pipeline(args.model, device=args.device)
    adapter = detect(pipe)
    scheduler = getattr(pipe, "scheduler", None)
    info = {**adapter.describe(), "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "profile": profile_text(adapter), "notes": scheduler_notes(scheduler)}
    presets = preset_methods_of(adapter.family)
    if args.json:
        as_dicts = {name: [m.to_dict() for m in methods] for name, methods in presets.items()}
        print(json.dumps({**info, "presets": as_dicts}, indent=2, default=str))
    else:
        print(render(info, presets))
    return 0

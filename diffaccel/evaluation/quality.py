"""Per-sample quality records and their per-config summary.

A record holds what one (config, seed) sample scores on its own: fidelity to the baseline
sample of the same seed (MSE, PSNR, SSIM; videos frame by frame; LPIPS when available), CLIP
score, and prompt-following for captions of the bundled synthetic dataset. Records are
computed by whichever rank owns the seed and summarised on rank 0 in seed order, so the
summary does not depend on how seeds were dealt.
"""
from __future__ import annotations

import math

import numpy as np

from diffaccel import metrics


def follows_bundled_captions(prompts: list[str]) -> bool:
    """Prompt-following can be read from pixels only for the synthetic dataset's captions."""
    from diffaccel.bundled.dataset import parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return False
    return True


def sample_record(config: str, seed: int, prompt: str, sample: np.ndarray, baseline: np.ndarray | None,
                  clip=None, lpips=None, prompt_following: bool = False) -> dict:
    record = {"config": config, "seed": seed, "prompt": prompt}
    video = sample.ndim == 4
    if baseline is not None:
        frames, ref = (sample, baseline) if video else (sample[None], baseline[None])
        per_frame_mse = ((frames - ref) ** 2).reshape(len(frames), -1).mean(axis=1).astype(np.float64)
        record["mse"] = float(per_frame_mse.mean())
        record["psnr"] = _psnr(record["mse"])
        record["psnr_frames"] = [_psnr(float(m)) for m in per_frame_mse] if video else None
        if metrics.available("torchmetrics"):  # else skipped, with the eval extra's note
            record["ssim"] = metrics.ssim(frames, ref)
        if lpips is not None:
            record["lpips"] = lpips.distance(frames, ref)
    if clip is not None:
        record["clip"] = clip.score(sample, prompt)
    if prompt_following:
        from diffaccel.bundled.analyser import analyse_image, analyse_video, to_uint8_rgb

        uint8 = [to_uint8_rgb(f) for f in sample] if video else to_uint8_rgb(sample)
        judged = (analyse_video if video else analyse_image)(uint8, prompt)
        record["follows"] = {key: bool(value["correct"]) for key, value in judged.items()}
    return record


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def summarise(records: list[dict]) -> dict:
    """Per-config numbers from its records (sorted by seed by the caller)."""
    out: dict = {"samples": len(records)}
    with_ref = [r for r in records if "mse" in r]
    if with_ref:
        out["psnr"] = _psnr(float(np.mean([r["mse"] for r in with_ref])))  # pooled MSE: one identical seed is not inf
        worst = min(with_ref, key=lambda r: (r["psnr"], r["seed"]))
        out["psnr_worst_seed"] = worst["psnr"]
        if len(with_ref) > 1:  # one seed that turns into another image can set the pooled PSNR on its own
            out["worst_seed"] = worst["seed"]
            out["psnr_without_worst_seed"] = _psnr(float(np.mean([r["mse"] for r in with_ref if r is not worst])))
        if all("ssim" in r for r in with_ref):
            out["ssim"] = float(np.mean([r["ssim"] for r in with_ref]))
        if all("lpips" in r for r in with_ref):
            out["lpips"] = float(np.mean([r["lpips"] for r in with_ref]))
    if records and all("clip" in r for r in records):
        out["clip"] = float(np.mean([r["clip"] for r in records]))
    if records and all("follows" in r for r in records):
        per_attr = [v for r in records for v in r["follows"].values()]
        out["prompt_following"] = 100.0 * float(np.mean(per_attr))  # % of named attributes right
        out["prompt_following_all"] = 100.0 * float(np.mean([all(r["follows"].values()) for r in records]))
    return out

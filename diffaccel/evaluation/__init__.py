"""Evaluation core shared by ``eval/evaluate.py``, ``diffaccel demo`` and benchmarks.

configs     what is compared (baseline, presets, method lists, profile targets)
generation  prompts, call arguments, one output file per (config, seed), resumable
timing      latency (denoiser-only and end-to-end, interleaved medians) and FLOPs
quality     per-seed fidelity and prompt-following, FID / CLIP across seeds
report      results.json, markdown table, speed vs quality plot
runner      the whole evaluation, single- or multi-process
"""

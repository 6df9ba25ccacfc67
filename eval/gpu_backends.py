"""Attention-level methods under each CUDA attention backend: fidelity and speed rows (GPU suite).

The CPU suite (tests/test_attention_backends.py) covers every dispatch backend that runs on CPU;
these are the CUDA-only ones. For each backend in :data:`CUDA_BACKENDS` that runs on this machine,
the bundled tiny-video (Wan: its processors call diffusers' attention dispatch) runs in bf16
under that backend, unaccelerated and with each method of :data:`METHODS`. Rows: the method's
stats (which backend ran its attention, sparse / reused calls), PSNR against the baseline under
the same backend, PSNR against the same method under ``native`` (the method does the same
whatever runs the dense part), and latency speed-up (median of ``--repeats`` interleaved runs). A
backend that cannot run here (package missing, wrong GPU) is one row saying why.
``xformers-processor`` is the other way users pick xformers
(``enable_xformers_memory_efficient_attention``, tiny-dit): reuse methods act there, sparse ones
refuse at ``accelerate`` (the row shows the message).

    python eval/gpu_backends.py --out eval/results/backends_gpu.md                       # CUDA
    python eval/gpu_backends.py --device cpu --backends native,_native_math --steps 4   # dry run
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import diffaccel

# Dispatch backends that need CUDA (and their package); "xformers-processor" is the processor path.
CUDA_BACKENDS = ("flash", "flash_varlen", "_flash_3", "_flash_varlen_3", "_native_cudnn", "_native_efficient",
                 "_native_flash", "flex", "sage", "sage_varlen", "_sage_qk_int8_pv_fp8_cuda",
                 "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda", "_sage_qk_int8_pv_fp16_triton",
                 "xformers", "xformers-processor")
# Hub-downloaded kernels, NPU and XLA: not run by this suite (no network / other hardware).
NOT_RUN = ("_hub", "_native_npu", "_native_xla")
METHODS = {
    # tiny-video's latent grid is small: a 1x2x2 tile and window 1 keep the windows sparse.
    "sliding_tile": lambda: diffaccel.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1), min_tokens=0),
    "mediator": lambda: diffaccel.MediatorAttention(min_tokens=0),
    "pab": lambda: diffaccel.PAB(),
    "faster_cache": lambda: diffaccel.FasterCache(),
    "adaptive_cache": lambda: diffaccel.AdaptiveCache(threshold=0.25),
}


def cases(backends=CUDA_BACKENDS) -> list[tuple[str, str]]:
    """(backend, method) pairs of the GPU suite."""
    return [(backend, method) for backend in backends for method in METHODS]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    peak = float(b.float().abs().max()) or 1.0
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


def _timed(pipe, kwargs, device) -> tuple[torch.Tensor, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = pipe(**kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    out = getattr(out, "frames", getattr(out, "images", None))
    return torch.as_tensor(out), time.perf_counter() - start


def _select(pipe, backend: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "xformers-processor":
            pipe.enable_xformers_memory_efficient_attention()
        else:
            pipe.transformer.set_attention_backend(backend)


def run_backend(backend, args, native_outputs: dict) -> list[str]:
    model = "tiny-dit" if backend == "xformers-processor" else "tiny-video"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = diffaccel.load_bundled(model, device=args.device, dtype=dtype)
    kwargs = dict(prompt="a red circle", num_inference_steps=args.steps, output_type="pt",
                  generator=torch.Generator(args.device).manual_seed(0))
    try:
        _select(pipe, backend)
        base, _ = _timed(pipe, dict(kwargs, generator=torch.Generator(args.device).manual_seed(0)), args.device)
    except Exception as error:  # noqa: BLE001 - a backend missing here is a row, not a crash
        return [f"| {backend} | - | not run: {type(error).__name__}: {str(error).splitlines()[0][:120]} | | | | |"]
    rows = []
    for method, make in METHODS.items():
        fresh = lambda: dict(kwargs, generator=torch.Generator(args.device).manual_seed(0))  # noqa: E731
        try:
            diffaccel.accelerate(pipe, methods=[make()])
        except ValueError as error:
            rows.append(f"| {backend} | {method} | refused: {str(error)[:140]} | | | | |")
            continue
        plain_times, fast_times = [], []
        for _ in range(args.repeats):
            out, t = _timed(pipe, fresh(), args.device)
            fast_times.append(t)
            stats = diffaccel.stats(pipe)["methods"][method]
            diffaccel.disable(pipe)
            plain_times.append(_timed(pipe, fresh(), args.device)[1])
            diffaccel.accelerate(pipe, methods=[make()])
        diffaccel.disable(pipe)
        native = native_outputs.setdefault(method, out) if backend == "native" else native_outputs.get(method)
        acted = {k: v for k, v in stats.items() if k in ("attention_backend", "sparse_calls", "reused", "computed")}
        vs_native = "-" if native is None or backend == "native" else f"{_psnr(out, native):.1f}"
        speed = statistics.median(plain_times) / statistics.median(fast_times)
        rows.append(f"| {backend} | {method} | {acted} | {_psnr(out, base):.1f} | {vs_native} | {speed:.2f}x |"
                    f" {statistics.median(fast_times) * 1e3:.0f} ms |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default=",".join(("native",) + CUDA_BACKENDS),
                        help="comma-separated; 'native' first gives the vs-native column its reference")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    args = parser.parse_args()
    native_outputs: dict = {}
    lines = [f"# Attention-level methods per attention backend ({args.device})", "",
             f"`python eval/gpu_backends.py --device {args.device} --steps {args.steps} --repeats {args.repeats}`", "",
             "| backend | method | stats | PSNR vs baseline (same backend) dB | PSNR vs method under native dB |"
             " speed-up | latency |", "|---|---|---|---|---|---|---|"]
    for backend in args.backends.split(","):
        lines += run_backend(backend, args, native_outputs)
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

"""One GPU check of the attention kernels: correctness of every sliding-tile path against
the fp64 dense masked reference (fp32 / fp16 / bf16), then speed of the Triton kernel,
FlexAttention and the box path against SDPA (default backend and FlashAttention) at
CogVideoX-2b-like and HunyuanVideo-like shapes, plus mediator attention and a small
Triton launch-config sweep. Writes a markdown table to $OUT/kernels_gpu.md.

Needs only torch (+ triton) and kernels/: it loads kernels/ as a standalone package, so
diffusers and the rest of diffaccel need not be installed. Robust by design: every case
is caught on its own (the error goes in the table), the table is rewritten after each
case, and cases are skipped once --budget seconds (default 150) have passed.

    bash eval/gpu_suite.sh --only kernels                      # on the GPU machine
    TRITON_INTERPRET=1 python eval/gpu_kernels.py --tiny --out /tmp/k.md   # CPU dry run
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def load_kernels():
    """kernels/ as the package ``diffaccel_kernels``, without importing diffaccel."""
    if "diffaccel_kernels" in sys.modules:
        return sys.modules["diffaccel_kernels"]
    spec = importlib.util.spec_from_file_location("diffaccel_kernels", REPO / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["diffaccel_kernels"] = module
    spec.loader.exec_module(module)
    return module


class Report:
    """Collects rows per section and rewrites the markdown file after every row."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.header, self.sections = path, header, {}
        path.parent.mkdir(parents=True, exist_ok=True)

    def section(self, title: str, columns: list[str]):
        self.sections[title] = (columns, [])

    def add(self, title: str, cells: list):
        self.sections[title][1].append(cells)
        print(f"[{title}] " + " | ".join(str(c) for c in cells), flush=True)
        self.write()

    def write(self):
        lines = list(self.header)
        for title, (columns, rows) in self.sections.items():
            lines += ["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.path.write_text("\n".join(lines) + "\n")


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def expired(self) -> bool:
        return time.monotonic() - self.start > self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup: int = 2, repeats: int = 5) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
    return "ERROR " + text[:160]


def correctness(kernels, report, budget, device, tiny):
    st = importlib.import_module("diffaccel_kernels.sliding_tile")
    ref_mod = importlib.import_module("diffaccel_kernels.sliding_tile_reference")
    title = "Correctness vs fp64 dense masked reference"
    report.section(title, ["case", "backend", "dtype", "max abs err", "PyTorch SDPA err (same dtype)", "bound",
                           "pass"])
    cases = [  # (name, batch, heads, dim, grid, tile, window, text)
        ("ragged 5x12x20, tile 64, text 77", 2, 4, 64, (5, 12, 20), (2, 4, 8), (3, 1, 3), 77),
        ("ragged 13x18x20, tile 6x8x8, per-head windows", 1, 3, 128, (13, 18, 20), (6, 8, 8),
         [(1, 1, 1), (3, 1, 3), (1, 3, 1)], 0),
        ("2D 20x30, tile 5x5 (50 tokens), head_dim 80, text 10", 1, 2, 80, (1, 20, 30), (1, 5, 5), (1, 3, 1), 10),
    ]
    if tiny:
        cases = [("tiny 3x5x7 text 5", 1, 2, 32, (3, 5, 7), (2, 2, 3), (3, 1, 3), 5),
                 ("tiny 3x5x7 per-head", 1, 3, 16, (3, 5, 7), (2, 2, 3), [(1, 3, 1), (3, 3, 3), (1, 1, 1)], 0)]
    flex_runs = {("fp32", 0), ("bf16", 0)}  # flex compiles per shape and dtype: keep it to two
    for case_index, (name, batch, heads, dim, grid, tile, window, text) in enumerate(cases):
        gen = torch.Generator(device="cpu").manual_seed(case_index)
        seq = text + math.prod(grid)
        base = [torch.randn(batch, heads, seq, dim, generator=gen).to(device) for _ in range(3)]
        exact = ref_mod.sliding_tile_attention_reference(*(x.double() for x in base), grid, tile, window, text)
        for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            q, k, v = (x.to(dtype) for x in base)
            torch_err = (ref_mod.sliding_tile_attention_reference(q, k, v, grid, tile, window, text).double()
                         - exact).abs().max().item()
            bound = 1e-4 if dtype == torch.float32 else 2 * torch_err + 1e-6
            for backend in ("triton", "flex", "boxes"):
                if backend == "flex" and (dtype_name, case_index) not in flex_runs:
                    continue
                if budget.expired():
                    report.add(title, [name, backend, dtype_name, "skipped (time budget)", "", "", ""])
                    continue
                try:
                    out = st.sliding_tile_attention(q, k, v, grid, tile, window, text, backend=backend)
                    sync(device)
                    err = (out.double() - exact).abs().max().item()
                    report.add(title, [name, backend, dtype_name, f"{err:.2e}", f"{torch_err:.2e}", f"{bound:.1e}",
                                       "yes" if err <= bound else "NO"])
                except Exception as exc:  # noqa: BLE001 -- report and carry on
                    traceback.print_exc()
                    report.add(title, [name, backend, dtype_name, short_error(exc), "", "", "NO"])
        del base, exact


def speed(kernels, report, budget, device, tiny, dtype):
    st = importlib.import_module("diffaccel_kernels.sliding_tile")
    tri = importlib.import_module("diffaccel_kernels.sliding_tile_triton")
    layout = importlib.import_module("diffaccel_kernels.tile_layout")
    title = f"Speed ({str(dtype).replace('torch.', '')}), median ms"
    report.section(title, ["shape", "method", "tile", "window", "density", "ms", "speed-up vs fastest SDPA",
                           "ideal 1/density", "of ideal"])
    shapes = [  # (name, batch, heads, dim, grid, tile, text, windows)
        ("CogVideoX-2b-like 13x30x45 +226 text, B2 (CFG) x 30 heads x 64", 2, 30, 64, (13, 30, 45), (1, 8, 8), 226,
         [(5, 3, 3), (3, 3, 5), (13, 3, 3)]),
        ("HunyuanVideo-like 30x48x80 +256 text, B1 x 24 heads x 128", 1, 24, 128, (30, 48, 80), (6, 8, 8), 256,
         [(3, 3, 3), (3, 3, 5), (5, 6, 10)]),  # (5, 6, 10): the tile counts, even: the case that errored
    ]
    if tiny:
        shapes = [("tiny 4x8x8 +5 text", 1, 2, 32, (4, 8, 8), (2, 4, 4), 5, [(1, 1, 1), (3, 1, 1)])]
    for name, batch, heads, dim, grid, tile, text, windows in shapes:
        if budget.expired():
            report.add(title, [name, "all", "", "", "", "skipped (time budget)", "", "", ""])
            continue
        try:
            seq = text + math.prod(grid)
            q, k, v = (torch.randn(batch, heads, seq, dim, device=device, dtype=dtype) for _ in range(3))
            baseline = {}
            for label, backend in (("SDPA default", None), ("SDPA flash", "flash")):
                try:
                    if backend == "flash" and device.type == "cuda":
                        from torch.nn.attention import SDPBackend, sdpa_kernel
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device)
                    else:
                        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device)
                    baseline[label] = ms
                    report.add(title, [name, label, "", "dense", "100%", f"{ms:.2f}", "", "", ""])
                except Exception as exc:  # noqa: BLE001
                    report.add(title, [name, label, "", "dense", "100%", short_error(exc), "", "", ""])
            reference_ms = min(baseline.values()) if baseline else None  # the fastest dense backend
            for window in windows:
                try:
                    density = st.sliding_tile_density(grid, tile, window, text)
                except Exception as exc:  # noqa: BLE001 -- a bad window must not end the shape's other rows
                    report.add(title, [name, "density", tile, window, "", short_error(exc), "", "", ""])
                    continue
                methods = ["triton", "boxes", "flex"] if window == windows[0] else ["triton"]
                for method in methods:
                    # flex compiles a kernel per shape (tens of seconds): only with time to spare
                    if budget.expired() or (method == "flex" and budget.left() < 60):
                        report.add(title, [name, method, tile, window, f"{density:.1%}", "skipped (time budget)",
                                           "", "", ""])
                        continue
                    try:
                        fn = lambda: st.sliding_tile_attention(q, k, v, grid, tile, window, text, backend=method)  # noqa: E731
                        fn()  # compile / build masks outside the timing
                        sync(device)
                        ms = time_ms(fn, device, warmup=1, repeats=3 if method == "boxes" else 5)
                        gain = reference_ms / ms if reference_ms else float("nan")
                        report.add(title, [name, method, tile, window, f"{density:.1%}", f"{ms:.2f}", f"{gain:.2f}x",
                                           f"{1 / density:.2f}x", f"{gain * density:.0%}"])
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        report.add(title, [name, method, tile, window, f"{density:.1%}", short_error(exc), "", "", ""])
            # kernel alone (tensors already in tile order) and a few launch configs
            spec = layout.make_spec(q, k, v, grid, tile, windows[0], text)
            density = spec.density(heads)
            configs = [tri.default_config(spec.tile_tokens, dim)]
            if not tiny:
                configs += [dict(block_m=64, block_n=64, num_warps=4, num_stages=2),
                            dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
                            dict(block_m=64, block_n=128, num_warps=8, num_stages=2)]
            for config in configs:
                if budget.expired():
                    break
                label = f"triton kernel only {config}".replace("'", "")
                try:
                    inputs = tri.prepare_triton_inputs(q, k, v, spec, config)
                    fn = lambda: tri.sliding_tile_attn(*inputs, dim ** -0.5, config["block_m"], config["block_n"],  # noqa: E731
                                                       config["num_warps"], config["num_stages"])
                    ms = time_ms(fn, device, warmup=1, repeats=5)
                    gain = reference_ms / ms if reference_ms else float("nan")
                    report.add(title, [name, label, tile, windows[0], f"{density:.1%}", f"{ms:.2f}", f"{gain:.2f}x",
                                       f"{1 / density:.2f}x", f"{gain * density:.0%}"])
                    del inputs
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    report.add(title, [name, label, tile, windows[0], "", short_error(exc), "", "", ""])
            # tile-ordered kernel alone: what a model that keeps its tokens in tile order pays
            # (q, k, v strided as attention processors pass them, text first, nothing reordered)
            if not budget.expired():
                label = "tile-ordered triton (permute once), kernel + text rows"
                try:
                    ordered = importlib.import_module("diffaccel_kernels.tile_order")
                    qs, ks, vs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
                    fn = lambda: ordered.sliding_tile_attention_tile_ordered(qs, ks, vs, grid, tile, windows[0], text,  # noqa: E731
                                                                             backend="triton")
                    ms = time_ms(fn, device, warmup=1, repeats=5)
                    gain = reference_ms / ms if reference_ms else float("nan")
                    report.add(title, [name, label, tile, windows[0], f"{density:.1%}", f"{ms:.2f}", f"{gain:.2f}x",
                                       f"{1 / density:.2f}x", f"{gain * density:.0%}"])
                    del qs, ks, vs
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    report.add(title, [name, label, tile, windows[0], "", short_error(exc), "", "", ""])
            # mediator attention (fast path = two SDPA calls)
            for mediators in ((64,) if tiny else (256, 1024)):
                if budget.expired():
                    break
                try:
                    fn = lambda: kernels.mediator_attention(q, k, v, mediators, grid, text_tokens=text)  # noqa: E731
                    ms = time_ms(fn, device, warmup=1, repeats=5)
                    cells = math.prod(kernels.mediator_grid(grid, mediators))
                    gain = reference_ms / ms if reference_ms else float("nan")
                    report.add(title, [name, f"mediator attention, {cells} mediators", "", "", "", f"{ms:.2f}",
                                       f"{gain:.2f}x", "", ""])
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    report.add(title, [name, f"mediator attention m={mediators}", "", "", "", short_error(exc), "",
                                       "", ""])
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            report.add(title, [name, "setup", "", "", "", short_error(exc), "", "", ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "./out"), "kernels_gpu.md"))
    parser.add_argument("--budget", type=float, default=150.0, help="seconds after which remaining cases are skipped")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run with TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device: use --tiny (with TRITON_INTERPRET=1) for a CPU dry run", file=sys.stderr)
        return 2
    kernels = load_kernels()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()}), tiny dry run"
    report = Report(Path(args.out), [
        "# diffaccel attention kernels on GPU",
        "",
        f"Device: {name}; torch {torch.__version__}; triton {triton_version}; python {platform.python_version()}.",
        "Command: `bash eval/gpu_suite.sh --only kernels` (eval/gpu_kernels.py). Times are medians of CUDA-event timings after "
        "warm-up; every sliding-tile time includes the reorder into tiles and back. 'of ideal' = speed-up x density.",
    ])
    torch.manual_seed(0)
    correctness(kernels, report, budget, device, args.tiny)
    speed(kernels, report, budget, device, args.tiny, torch.bfloat16)
    report.header.append(f"Finished in {budget.elapsed():.0f} s (budget {args.budget:.0f} s).")
    report.write()
    print(f"wrote {args.out} in {budget.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a plain install gets: every subpackage in the wheel, kernels without triton, the demo
without the eval extra (SSIM, FID, plot and MP4 skipped with one line)."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[1]

# Run Python as if these packages were not installed (the import system finds no spec for them).
WITHOUT = """
import importlib.machinery, sys
BLOCKED = {blocked!r}
_find = importlib.machinery.PathFinder.find_spec.__func__
def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in BLOCKED else _find(cls, name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
"""


def run_without(blocked: set, code: str, cwd: Path):
    return subprocess.run([sys.executable, "-c", WITHOUT.format(blocked=sorted(blocked)) + code], cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


def test_the_wheel_holds_every_subpackage(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"))
    packages, mapping = set(captured["packages"]), captured["package_dir"]
    for root, prefix in (("diffaccel", "diffaccel"), ("kernels", "diffaccel.kernels"), ("pipelines", "diffaccel.pipelines")):
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / root).parts
            assert ".".join((prefix, *relative)) in packages, f"{init.parent} is not in the wheel"
    assert mapping["diffaccel.kernels"] == "kernels" and mapping["diffaccel.pipelines"] == "pipelines"
    assert mapping["diffaccel.assets"] == "assets" and captured["package_data"] == {"diffaccel.assets": ["**/*"]}


def test_cpu_kernels_import_and_run_without_triton(tmp_path):
    code = """
import torch
import diffaccel, diffaccel.kernels
from diffaccel.kernels import sliding_tile_attention
from diffaccel.kernels.sliding_tile_reference import sliding_tile_attention_reference
assert "triton" not in sys.modules
q, k, v = (torch.randn(1, 2, 4 + 4 * 8 * 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
args = dict(grid=(4, 8, 8), tile=(2, 4, 4), window=(1, 1, 1), text_tokens=4)
out = sliding_tile_attention(q, k, v, **args)
ref = sliding_tile_attention_reference(q.double(), k.double(), v.double(), **args)
print("max diff", float((out.double() - ref).abs().max()))
assert torch.allclose(out.double(), ref, atol=1e-4)
"""
    proc = run_without({"triton"}, code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_demo_runs_without_the_eval_extra(tmp_path):
    code = """
from diffaccel.cli import main
sys.exit(main(["demo", "--models", "tiny-video", "--presets", "balanced", "--steps", "2", "--seeds", "0-1",
               "--repeats", "1", "--timing-budget", "0", "--out", "out", "--no-progress"]))
"""
    proc = run_without({"torchmetrics", "matplotlib", "imageio", "imageio_ffmpeg", "triton"}, code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = [line for line in proc.stdout.splitlines() if 'pip install "diffaccel[eval]"' in line]
    assert len(extra) == 1 and "SSIM and FID" in extra[0] and "plot" in extra[0]  # one line says it all
    out = tmp_path / "out"
    assert (out / "tiny-video.gif").is_file() and (out / "tiny-video" / "samples" / "balanced" / "seed0001.gif").is_file()
    assert not (out / "tiny-video" / "speed_quality.png").exists()
    results = json.loads((out / "tiny-video" / "results.json").read_text())
    assert "ssim" not in results["configs"]["balanced"] and "psnr" in results["configs"]["balanced"]
    assert results["skipped"][0] == extra[0]


def test_repository_kernels_folder_never_shadows_transformers_silently(tmp_path):
    # transformers >= 5.25 imports the Hugging Face `kernels` package; from the repository root
    # `python -c` finds our kernels/ folder first. The user gets our one-line reason, not a deep ImportError.
    proc = subprocess.run([sys.executable, "-c", "import kernels"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "run from another directory" in proc.stderr.splitlines()[-1]

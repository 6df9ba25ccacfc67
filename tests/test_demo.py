"""`diffaccel demo` on one bundled model with few steps: exits 0, writes table and grid."""
import os
import subprocess
import sys

import pytest
from PIL import Image

from diffaccel.bundled.loader import bundled_dir


@pytest.mark.skipif(not (bundled_dir() / "tiny-sd" / "model_index.json").is_file(),
                    reason="the trained bundled models are not in assets/ (eval/train_bundled.py makes them)")
def test_demo_runs_offline_and_writes_its_files(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "diffaccel.cli", "demo", "--models", "tiny-sd", "--presets", "fast", "--steps", "2",
                           "--seeds", "0", "--repeats", "1", "--timing-budget", "0", "--out", str(out), "--no-progress"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # not the repository root, whose kernels/ shadows transformers' `kernels`
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tiny-sd | baseline |" in proc.stdout and "prompt-following" in proc.stdout
    grid = Image.open(out / "tiny-sd.png")
    assert grid.width >= 128 and grid.height >= 2 * 128  # baseline row + the preset row
    assert "| tiny-sd | fast |" in proc.stdout
    assert (out / "tiny-sd" / "results.json").is_file() and (out / "tiny-sd" / "samples" / "baseline" / "seed0000.png").is_file()

"""eval/gpu_suite.py's CPU smoke mode: the GPU suite's own code path (real pipeline classes,
diffaccel presets and the peers, STA inside a transformer step, timing, composition, tables) at
tiny sizes, so the prepared GPU run cannot rot between GPU sessions."""

import importlib.util
import sys
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parents[1] / "eval"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", EVAL / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_smoke_models_and_sta(tmp_path):
    """A U-Net (DeepCache library, tomesd) and a video DiT (diffusers' cache hooks, STA per layer
    and permute once): every variant runs and gets a time, memory and a composed generation."""
    suite = _suite()
    assert suite.main(["--smoke", "--out", str(tmp_path), "--only", "models,sta", "--models", "SD1.5,CogVideoX"]) == 0
    models = _rows(tmp_path / "gpu_models.md")
    names = {(row[0], row[1]) for row in models}
    errors = [row for row in models if "ERROR" in " ".join(row) or "skipped" in " ".join(row)]
    assert not errors, errors
    for expected in [("SD1.5 512px", "DeepCache lib (N=3, branch 0)"), ("SD1.5 512px", "tomesd(0.5)"),
                     ("SD1.5 512px", "diffaccel preset balanced"), ("CogVideoX-2b 49x480x720", "diffusers FirstBlockCache(0.2)"),
                     ("CogVideoX-2b 49x480x720", "diffusers TaylorSeerCache(interval 3)"),
                     ("CogVideoX-2b 49x480x720", "diffaccel preset fast")]:
        assert expected in names, sorted(names)
    ours = [row for row in models if row[1].startswith("diffaccel preset")]
    assert all(row[8].endswith("x") for row in ours), ours  # an ideal (FLOP ratio) for every diffaccel row
    sta = _rows(tmp_path / "gpu_sta.md")
    once = [row for row in sta if row[1] == "STA permute once"]
    assert len(once) == 2 and all(row[5].replace(".", "").isdigit() for row in once), sta
    assert "total" in (tmp_path / "gpu_summary.md").read_text()


@pytest.mark.slow
def test_smoke_every_section(tmp_path):
    """Every model and section (kernels, torch.compile, diffaccel profile) in smoke mode."""
    suite = _suite()
    assert suite.main(["--smoke", "--out", str(tmp_path)]) == 0
    for name in ("gpu_kernels.md", "gpu_models.md", "gpu_compile.md", "gpu_sta.md", "gpu_profile.md"):
        assert (tmp_path / name).exists(), name
    models = _rows(tmp_path / "gpu_models.md")
    assert {row[0] for row in models} == {m.name for m in suite.MODELS}
    assert not [row for row in models if "ERROR" in " ".join(row)]
    profile = _rows(tmp_path / "gpu_profile.md")
    assert profile and profile[0][3] == "0", profile
    compiled = _rows(tmp_path / "gpu_compile.md")
    assert len(compiled) == 4 and not [row for row in compiled if "ERROR" in " ".join(row)], compiled

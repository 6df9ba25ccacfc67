"""eval/evaluate.py on 2 gloo ranks (torchrun) equals 1 process, for every preset on every bundled
model: no hang (a deadline fails the test instead), every sample bit-identical, the same report.

Seeds 0-2 on 2 ranks: one rank gets two seeds, the other one (uneven on purpose: without hidden
collectives the ranks never wait for each other while generating)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaccel.bundled.loader import BUNDLED_MODELS
from diffaccel.evaluation.runner import EvalOptions, run_evaluation

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted(BUNDLED_MODELS)
ARGS = ["--configs", "baseline,quality,balanced,fast", "--seeds", "0-2", "--steps", "4", "--repeats", "1",
        "--timing-budget", "0", "--warmup", "0", "--no-progress"]


def _without_speed(results):
    out = json.loads(json.dumps(results))
    out.pop("timing")
    for row in out["configs"].values():
        row.pop("speed")
    return out


@pytest.mark.slow
def test_every_preset_on_every_bundled_model_two_ranks_equal_one(tmp_path):
    # 2 ranks, launched as a user would: one torchrun per model (gloo on CPU).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for model in MODELS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "eval" / "evaluate.py"), "--model", model, "--out", str(tmp_path / "two" / model),
               "--threads", "1", *ARGS]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # a hang fails here
        assert proc.returncode == 0, proc.stderr[-3000:]
    # 1 process, same settings (1 thread: the same kernels as each rank).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model in MODELS:
            run_evaluation(EvalOptions(model=model, out=tmp_path / "one" / model, configs=ARGS[1], seeds=[0, 1, 2],
                                       steps=4, repeats=1, timing_budget_s=0, warmup=0, progress=False))
    finally:
        torch.set_num_threads(threads)
    for model in MODELS:
        one, two = tmp_path / "one" / model, tmp_path / "two" / model
        ones = sorted(p.relative_to(one) for p in (one / "samples").rglob("*.npy"))
        assert ones == sorted(p.relative_to(two) for p in (two / "samples").rglob("*.npy")) and len(ones) == 12
        for rel in ones:
            assert np.array_equal(np.load(one / rel), np.load(two / rel)), f"{model}: {rel} differs"
        assert _without_speed(json.loads((two / "results.json").read_text())) == \
            _without_speed(json.loads((one / "results.json").read_text()))


@pytest.mark.slow
def test_demo_on_two_ranks_equals_one(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    demo = ["-m", "diffaccel.cli", "demo", "--models", "tiny-dit", "--presets", "balanced", "--steps", "3",
            "--seeds", "0-2", "--repeats", "1", "--timing-budget", "0", "--no-progress"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--module", "diffaccel.cli", *demo[2:], "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("| tiny-dit | balanced |") == 1  # rank 0 prints, once
    one = subprocess.run([sys.executable, *demo, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    results = [json.loads((tmp_path / run / "tiny-dit" / "results.json").read_text()) for run in ("one", "two")]
    assert _without_speed(results[0]) == _without_speed(results[1])
    assert (tmp_path / "two" / "tiny-dit.png").is_file()


def _without_timings(profile: dict) -> dict:
    out = dict(profile)
    out.pop("costs")  # timed modules: rank 0 times them, like one process does
    out["measured"] = {k: v for k, v in out["measured"].items() if k != "seconds"}
    return out


@pytest.mark.slow
def test_profile_on_two_ranks_equals_one(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    profile = ["-m", "diffaccel.cli", "profile", "tiny-dit", "--steps", "4", "--num-prompts", "3",
               "--calibration-prompts", "1", "--device", "cpu", "--no-progress"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--module", "diffaccel.cli", *profile[2:], "--out", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1  # rank 0 writes
    one = subprocess.run([sys.executable, *profile, "--out", str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "two.json"]  # no partial files left
    profiles = [json.loads((tmp_path / f"{run}.json").read_text()) for run in ("one", "two")]
    assert _without_timings(profiles[0]) == _without_timings(profiles[1])

"""eval/evaluate.py and diffaccel.evaluation: files, resume, FID/CLIP paths, 2 ranks == 1, bad input.

Runs on a bundled-format tiny-sd (the trained one when assets/ has it, else random weights
saved to a temp folder) with 2-3 steps, so the whole file stays around a minute on 2 cores.
"""
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffaccel import metrics
from diffaccel.evaluation.runner import EvalOptions, run_evaluation

REPO = Path(__file__).resolve().parents[1]
STEPS = "3"


class ColourGridFeatures(torch.nn.Module):
    """Tiny injected FID extractor: mean colour of each 2x2 quadrant (12 features)."""

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from diffaccel.bundled.loader import bundled_dir
    from diffaccel.bundled.models import build_pipeline

    trained = bundled_dir() / "tiny-sd"
    if (trained / "model_index.json").is_file():
        return str(trained)
    folder = tmp_path_factory.mktemp("model") / "tiny-sd"
    build_pipeline("tiny-sd").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP model + processor saved like a real local CLIP folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffaccel.bundled.models import clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **layers),
                        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return str(folder)


def options(model_dir, out, clip_dir=None, **kw):
    base = dict(model=model_dir, out=out, configs="baseline,deepcache:interval=2", seeds=[0, 1, 2], prompts="bundled",
                steps=int(STEPS), resolution=32, repeats=1, timing_budget_s=0, warmup=0, progress=False)
    return EvalOptions(clip=clip_dir, fid_feature=ColourGridFeatures(), **{**base, **kw})


def without_speed(results):
    """Latency differs between runs; everything else must not."""
    out = json.loads(json.dumps(results))
    out.pop("timing")
    for row in out["configs"].values():
        row.pop("speed")
    return out


@pytest.fixture(scope="module")
def first_run(model_dir, clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-rank run uses 1 thread per rank: same kernels, same bits
    try:
        results = run_evaluation(options(model_dir, out, clip_dir))
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_run_writes_every_file_and_a_table(first_run, clip_dir):
    out, results = first_run
    for config in ("baseline", "deepcache-interval=2"):
        for seed in (0, 1, 2):
            assert (out / "samples" / config / f"seed{seed:04d}.png").is_file()
            assert (out / "samples" / config / f"seed{seed:04d}.npy").is_file()
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "speed_quality.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| baseline |" in table and "| deepcache-interval=2 |" in table and "FID" in table and "CLIP" in table
    row = results["configs"]["deepcache-interval=2"]
    assert 0 < row["speed"]["flops_saved"] < 1  # DeepCache skips the deep blocks on half the steps
    assert np.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1 and "prompt_following" in row
    assert results["configs"]["baseline"]["fid"] >= 0 and "clip" in row
    assert results["clip_model"] == clip_dir  # the report names the CLIP model
    assert any("LPIPS skipped" in note for note in results["skipped"]) or "lpips" in row


def test_killed_run_resumes_without_regenerating(first_run, model_dir, clip_dir, tmp_path):
    out, results = first_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "results.json").unlink()  # killed before the report...
    lost = resumed / "samples" / "deepcache-interval=2"
    (lost / "seed0002.npy").unlink()  # ...and while writing the last sample
    (lost / "seed0002.png").rename(lost / "seed0002.partial.png")
    kept = {p: p.stat().st_mtime_ns for p in resumed.glob("samples/*/*") if "seed0002" not in p.name or "baseline" in str(p)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = run_evaluation(options(model_dir, resumed, clip_dir))
    finally:
        torch.set_num_threads(threads)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished work never rewritten
    assert (lost / "seed0002.npy").is_file()
    assert again == results  # timings reused from timing.json, samples bit-identical


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift():
    from diffaccel.bundled.dataset import make_images

    images = metrics.to_uint8_nchw(make_images(64, seed=0)[0].astype(np.float32) / 255)
    fid = metrics.make_fid(metrics.ColourGridFeatures())
    fid.update(images, real=True)
    fid.update(images, real=False)
    same = float(fid.compute())
    fid.reset()
    fid.update((images.float() * 0.6 + 60).to(torch.uint8), real=False)  # darker, washed-out colours
    shifted = float(fid.compute())
    assert abs(same) < 1e-3 and shifted > 1.0


def test_fid_statistics_file_matches_reference_images(tmp_path):
    from diffaccel.bundled.dataset import make_images

    feats = ColourGridFeatures()
    images = metrics.to_uint8_nchw(make_images(40, seed=1)[0].astype(np.float32) / 255)
    f = feats(images).double().numpy()
    np.savez(tmp_path / "ref.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=len(f))
    from_images, from_stats = metrics.make_fid(feats), metrics.make_fid(feats)
    from_images.update(images, real=True)
    metrics.load_fid_statistics(from_stats, str(tmp_path / "ref.npz"))
    fake = metrics.to_uint8_nchw(make_images(40, seed=2)[0].astype(np.float32) / 255)
    for fid in (from_images, from_stats):
        fid.update(fake, real=False)
    assert float(from_images.compute()) == pytest.approx(float(from_stats.compute()), rel=1e-6)


def test_two_gloo_ranks_give_the_single_process_results(first_run, model_dir, clip_dir, tmp_path):
    out, results = first_run
    script = tmp_path / "two_ranks.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "torch.set_num_threads(1)\n"
        "from test_evaluate import options\n"
        "from diffaccel.evaluation.runner import run_evaluation\n"
        f"run_evaluation(options({model_dir!r}, {str(tmp_path / 'ranks')!r}, {clip_dir!r}))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "ranks" / "results.json").read_text())
    assert without_speed(two) == without_speed(results)


def evaluate_cli(*argv):
    sys.argv = ["evaluate.py", *argv]
    try:
        runpy.run_path(str(REPO / "eval" / "evaluate.py"), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_bad_input_is_a_clear_error_and_overwrites_nothing(first_run, model_dir, tmp_path, capsys):
    out, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    common = ["--model", model_dir, "--steps", STEPS, "--resolution", "32", "--timing-budget", "0", "--seeds", "0-1",
              "--no-progress"]
    assert evaluate_cli(*common, "--out", str(tmp_path / "a"), "--prompts", str(tmp_path / "missing.txt")) == 2
    assert "missing.txt' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert evaluate_cli(*common, "--out", str(out), "--configs", "baseline,turbo") == 2
    assert "Unknown config 'turbo'" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"model": "tiny-dit"}))
    assert evaluate_cli(*common, "--out", str(other)) == 2
    assert "holds a different model" in capsys.readouterr().err
    assert list(other.iterdir()) == [other / "run.json"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    changed = tmp_path / "changed"  # a preset that changed since: its old samples must not be reused
    shutil.copytree(out, changed)
    meta = changed / "samples" / "deepcache-interval=2" / "config.json"
    meta.write_text(meta.read_text().replace('"interval": 2', '"interval": 3'))
    assert evaluate_cli(*common[:-3], "--seeds", "0-2", "--no-progress", "--out", str(changed),
                        "--configs", "baseline,deepcache:interval=2", "--prompts", "bundled") == 2
    assert "made with other methods" in capsys.readouterr().err


def test_a_failed_promise_names_the_seed_that_sets_the_pooled_psnr():
    from diffaccel.evaluation import quality, report

    records = [{"config": "quality", "seed": s, "mse": m, "psnr": 10 * math.log10(1 / m)}
               for s, m in ((5, 1e-4), (6, 1e-4), (7, 1e-1))]
    summary = quality.summarise(records)
    assert summary["worst_seed"] == 7 and summary["psnr_without_worst_seed"] == pytest.approx(40.0)
    assert summary["psnr"] == pytest.approx(10 * math.log10(3 / (2e-4 + 1e-1)))  # pooled: the one seed sets it
    speed = dict(e2e_median_s=1.0, e2e_iqr_s=None, speedup=1.0, ideal_speedup=1.0, denoiser_median_s=1.0,
                 denoiser_iqr_s=None, denoiser_speedup=1.0, denoiser_ideal_speedup=1.0, denoiser_flops=1e9, flops_saved=0.0)
    summary.update(speed=speed, promise=report.promise_check("quality", summary, {}, video=False))
    row = report.table({"configs": {"quality": summary}}).splitlines()[-1]
    assert "FAILS (PSNR >= 35; 40.00 without seed 7)" in row

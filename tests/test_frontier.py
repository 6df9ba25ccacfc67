"""eval/bench.py --suite frontier on the bundled tiny-sd: 2 seeds, 2 steps, ours and one peer.

Checks that the suite runs end to end, counts FLOPs for ours and the peer with the same counter
(our DeepCache and the DeepCache library give identical outputs, so they must count the same),
writes table and plot, reuses its per-seed cache, and rejects a bad spec in one line.
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))


@pytest.fixture(scope="module")
def trained():
    from diffaccel.bundled.loader import bundled_dir

    if not (bundled_dir() / "tiny-sd" / "model_index.json").is_file():
        pytest.skip("tiny-sd is not in assets/ (eval/train_bundled.py makes it)")


def _run(tmp_path, *extra):
    import bench

    return bench.main(["--suite", "frontier", "--model", "tiny-sd", "--seeds", "0-1", "--steps", "2",
                       "--ours", "deepcache:interval=2", "--cache", str(tmp_path / "cache"),
                       "--out", str(tmp_path / "frontier.md"), *extra])


def test_frontier_suite_smoke(tmp_path, trained, capsys):
    assert _run(tmp_path, "--peers", "DeepCache:interval=2;diffusers.fbc:threshold=0.1", "--rounds", "1") == 0
    text = (tmp_path / "frontier.md").read_text()
    assert (tmp_path / "frontier.png").stat().st_size > 0
    table = text.split("| method |")[1].split("\n\n")[0].splitlines()[2:]
    rows = {(cells[1].strip().rstrip(" *"), cells[2].strip()): cells for cells in (line.split("|") for line in table)}
    ours, lib = rows["diffaccel deepcache", "deepcache:interval=2"], rows["DeepCache", "interval=2"]
    saved_ours, saved_lib = float(ours[3]), float(lib[3])
    assert 0 < saved_ours < 100 and saved_ours == saved_lib  # one counter, the same computation
    assert ours[4].strip() == lib[4].strip()  # identical outputs -> the same PSNR
    assert "x (" in ours[5]  # a wall speed-up with its IQR
    assert "cannot run" in rows["diffusers.fbc", "threshold=0.1"][4]  # no U-Net support: said, not crashed
    assert "## Pareto frontier" in text and "## Peer wins that remain" in text

    samples = sorted((tmp_path / "cache").rglob("seed*.npz"))
    stamps = {p: p.stat().st_mtime_ns for p in samples}
    assert len(samples) == 3 * 2  # baseline, ours, the library; two seeds each
    capsys.readouterr()
    assert _run(tmp_path, "--peers", "DeepCache:interval=2", "--rounds", "0") == 0  # a rerun reuses the cache
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").rglob("seed*.npz"))} == stamps


def test_frontier_bad_spec(tmp_path, capsys):
    import bench

    code = bench.main(["--suite", "frontier", "--model", "tiny-sd", "--ours", "nonsense:x=1", "--peers", "",
                       "--cache", str(tmp_path), "--out", str(tmp_path / "f.md")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nonsense" in err[0]


def test_hooked_counts_modules_a_method_hooks_at_its_first_call(tmp_path, trained):
    # TextCache settles which modules it hooks at each denoiser call: counted at install alone it
    # showed only its denoiser pre-hook (1).
    import bench

    assert bench.main(["--suite", "frontier", "--model", "tiny-sd", "--seeds", "0-0", "--steps", "2", "--ours",
                       "text_cache", "--peers", "", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "f.md"),
                       "--rounds", "0"]) == 0
    row = next(line for line in (tmp_path / "f.md").read_text().splitlines() if line.startswith("| diffaccel text_cache"))
    assert int(row.split("|")[-2]) > 1

"""Window search: measured errors drive the choice, budgets are met, the result round-trips
through a profile file into SlidingTileAttention."""

import json

import pytest
import torch

import diffaccel
import tiny_pipes as tp
from diffaccel.methods.sliding_tile import SlidingTileAttention
from diffaccel.methods.window_search import candidate_windows, search_windows


def _calls(seeds=(0, 1), steps=4):
    return [tp.call_kwargs("pixart", steps=steps, seed=s) for s in seeds]


@pytest.fixture(scope="module")
def pixart():
    return tp.build("pixart")


def test_candidates_exclude_full_attention():
    candidates = candidate_windows((1, 8, 8), (1, 2, 2), sizes=(1, 3, 5))
    assert (1, 1, 1) in candidates and (1, 3, 3) in candidates
    assert (1, 5, 5) not in candidates  # 5 >= 4 tiles on both axes: full attention


def test_error_threshold_extremes_and_profile_round_trip(pixart, tmp_path):
    loose = search_windows(pixart, _calls(), tile=(1, 2, 2), max_error=10.0, sizes=(1, 3, 5))
    assert set(loose.layer_windows.values()) == {(1, 1, 1)}  # everything passes: the cheapest
    strict = search_windows(pixart, _calls(), tile=(1, 2, 2), max_error=0.0, sizes=(1, 3, 5))
    assert strict.density == pytest.approx(1.0)  # nothing passes: full attention everywhere
    for errors in loose.errors.values():  # the smallest window is the least faithful
        assert max(errors["(1, 1, 1)"]) >= max(errors["(1, 3, 3)"])
    assert loose.seconds < 120

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"other_section": 1}))
    loose.save(profile)
    data = json.loads(profile.read_text())
    assert data["other_section"] == 1 and data["sliding_tile"]["tile"] == [1, 2, 2]
    loaded = SlidingTileAttention.from_profile(profile, min_tokens=0, full_attention_fraction=0.25)
    direct = loose.config(min_tokens=0, full_attention_fraction=0.25)
    outs = []
    for config in (loaded, direct):
        diffaccel.accelerate(pixart, methods=[config])
        outs.append(pixart(**_calls(seeds=(3,))[0])[0])
        assert diffaccel.stats(pixart)["methods"]["sliding_tile"]["sparse_calls"] > 0
    diffaccel.disable(pixart)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("per_head", [False, True])
def test_target_density_is_reached_with_least_error_first(pixart, per_head):
    result = search_windows(pixart, _calls(seeds=(0,)), tile=(1, 2, 2), target_density=0.4, per_head=per_head,
                            sizes=(1, 3, 5))
    assert 0.4 <= result.density < 0.75  # stops at the first step over the target
    windows = list(result.layer_windows.values())
    if per_head:
        assert all(isinstance(w, tuple) or (isinstance(w, list) and len(w) == 2) for w in windows)


def test_bad_calls_are_rejected(pixart):
    with pytest.raises(ValueError, match="at least one calibration call"):
        search_windows(pixart, [])
    with pytest.raises(ValueError, match="no attention call was measured"):
        search_windows(pixart, _calls(steps=2), tile=(1, 2, 2), full_attention_fraction=0.99)

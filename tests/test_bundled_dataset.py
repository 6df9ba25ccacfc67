"""The synthetic captioned dataset: deterministic, held-out combinations kept out of training."""

import numpy as np
import pytest

from diffaccel.bundled import dataset


def test_same_seed_same_data_and_other_seed_other_data():
    a_images, a_captions = dataset.make_images(64, seed=3)
    b_images, b_captions = dataset.make_images(64, seed=3)
    c_images, _ = dataset.make_images(64, seed=4)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions
    assert not np.array_equal(a_images, c_images)
    a_clips, a_video_captions = dataset.make_videos(16, seed=5)
    b_clips, b_video_captions = dataset.make_videos(16, seed=5)
    assert np.array_equal(a_clips, b_clips) and a_video_captions == b_video_captions


def test_shapes_and_dtypes():
    images, captions = dataset.make_images(8, seed=0)
    assert images.shape == (8, dataset.IMAGE_SIZE, dataset.IMAGE_SIZE, 3) and images.dtype == np.uint8
    clips, _ = dataset.make_videos(4, seed=0)
    assert clips.shape == (4, dataset.NUM_FRAMES, dataset.IMAGE_SIZE, dataset.IMAGE_SIZE, 3)
    assert len(captions) == 8


def test_held_out_pairs_never_in_training_split():
    held = set(dataset.HELD_OUT_PAIRS)
    _, _, attrs = dataset.make_images(3000, seed=11, split="train", return_attributes=True)
    assert not {(a["colour"], a["shape"]) for a in attrs} & held
    _, _, video_attrs = dataset.make_videos(500, seed=12, split="train", return_attributes=True)
    assert not {(a["colour"], a["shape"]) for a in video_attrs} & held
    _, _, held_attrs = dataset.make_images(300, seed=13, split="heldout", return_attributes=True)
    assert {(a["colour"], a["shape"]) for a in held_attrs} == held
    assert not set(dataset.all_image_captions("train")) & set(dataset.all_image_captions("heldout"))
    assert not set(dataset.all_video_captions("train")) & set(dataset.all_video_captions("heldout"))


def test_training_split_covers_every_seen_combination():
    _, captions = dataset.make_images(5000, seed=14)
    assert set(captions) == set(dataset.all_image_captions("train"))


def test_captions_parse_back_to_their_attributes():
    _, captions, attrs = dataset.make_images(50, seed=1, return_attributes=True)
    assert [dataset.parse_caption(c) for c in captions] == attrs
    _, video_captions, video_attrs = dataset.make_videos(20, seed=1, return_attributes=True)
    assert [dataset.parse_caption(c) for c in video_captions] == video_attrs


@pytest.mark.parametrize("caption", ["a red circle", "a purple circle in the center on a black background",
                                     "a red circle moving sideways on a black background"])
def test_bad_captions_are_refused(caption):
    with pytest.raises(ValueError):
        dataset.parse_caption(caption)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        dataset.make_images(2, seed=0, split="test")

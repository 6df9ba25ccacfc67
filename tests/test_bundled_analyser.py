"""The pixel prompt-following analyser: recognises ground truth, rejects wrong captions."""

import numpy as np
from PIL import Image

from diffaccel.bundled import analyser, dataset


def other(table, value):
    names = list(table)
    return names[(names.index(value) + 1) % len(names)]


def test_recognises_ground_truth_images_almost_always():
    for split, seed in (("train", 21), ("heldout", 22)):
        images, captions = dataset.make_images(300, seed=seed, split=split)
        summary = analyser.prompt_following(list(images), captions)
        assert summary["n"] == 300
        for key in ("colour", "shape", "position", "background"):
            assert summary[key] >= 0.98, (split, key, summary)


def test_recognises_ground_truth_clips_almost_always():
    clips, captions = dataset.make_videos(80, seed=23)
    summary = analyser.prompt_following(list(clips), captions, video=True)
    assert summary["direction"] >= 0.98 and summary["colour"] >= 0.98, summary


def test_rejects_wrong_captions_attribute_by_attribute():
    images, _, attrs = dataset.make_images(120, seed=24, return_attributes=True)
    tables = {"colour": dataset.COLOURS, "shape": dataset.SHAPES, "position": dataset.POSITIONS,
              "background": dataset.BACKGROUNDS}
    for key, table in tables.items():
        wrong = [dataset.image_caption(**{**a, key: other(table, a[key])}) for a in attrs]
        summary = analyser.prompt_following(list(images), wrong)
        assert summary[key] <= 0.02 and summary["all"] <= 0.02, (key, summary)


def test_rejects_wrong_direction():
    clips, _, attrs = dataset.make_videos(60, seed=25, return_attributes=True)
    wrong = [dataset.video_caption(a["colour"], a["shape"], other(dataset.DIRECTIONS, a["direction"]))
             for a in attrs]
    assert analyser.prompt_following(list(clips), wrong, video=True)["direction"] <= 0.02


def test_still_clip_has_no_direction():
    clips, captions = dataset.make_videos(1, seed=26)
    still = np.repeat(clips[0][:1], dataset.NUM_FRAMES, axis=0)
    assert analyser.analyse_video(still, captions[0])["direction"]["predicted"] is None


def test_blank_image_matches_no_object_caption():
    blank = np.zeros((32, 32, 3), np.uint8)
    result = analyser.analyse_image(blank, "a red circle in the center on a black background")
    assert result["background"]["correct"]
    assert not result["colour"]["correct"] and result["colour"]["predicted"] is None


def test_pil_uint8_and_float_inputs_agree():
    images, captions = dataset.make_images(10, seed=27)
    for image, caption in zip(images, captions):
        as_uint8 = analyser.analyse_image(image, caption)
        assert analyser.analyse_image(Image.fromarray(image), caption) == as_uint8
        assert analyser.analyse_image(image.astype(np.float32) / 255.0, caption) == as_uint8


def test_tolerates_moderate_noise():
    images, captions = dataset.make_images(100, seed=28)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    summary = analyser.prompt_following(list(noisy), captions)
    assert summary["colour"] >= 0.98 and summary["shape"] >= 0.9, summary

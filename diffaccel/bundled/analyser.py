"""Does an image or clip show what its caption asks for? Decided from pixels alone.

The bundled models' stand-in for CLIP score: deterministic, pure numpy, no weights.
It knows the synthetic dataset's vocabulary (dataset.py) and reads back each attribute:

- background: the median colour of the one-pixel border, nearest named background;
- object: the largest connected region of pixels far (> OBJECT_DISTANCE in RGB) from
  that background;
- colour: the median object colour, nearest named colour;
- shape: the template (circle / square / triangle) drawn in the object's bounding box
  that overlaps the object best (IoU);
- position: the object's centroid, nearest position anchor;
- direction (clips): the centroid's least-squares velocity over the frames; its dominant
  axis and sign, if it moves at least MIN_TRAVEL pixels over the clip.

>>> from diffaccel.bundled.dataset import make_images
>>> images, captions = make_images(1, seed=0)
>>> analyse_image(images[0], captions[0])["colour"]["correct"]
True
"""

from __future__ import annotations

import numpy as np

from .dataset import BACKGROUNDS, COLOURS, DIRECTIONS, POSITIONS, parse_caption

OBJECT_DISTANCE = 80.0  # RGB distance from the background that counts as "object"
MIN_OBJECT_PIXELS = 6  # fewer and there is no object to judge
MIN_TRAVEL = 3.0  # pixels over the clip; less is "not moving"

CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / 3, "position": 1 / len(POSITIONS),
          "background": 1 / len(BACKGROUNDS), "direction": 1 / len(DIRECTIONS)}


def to_uint8_rgb(image) -> np.ndarray:
    """H x W x 3 uint8 from a PIL image, a uint8 array, or a float array in [0, 1]."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an H x W x 3 image, got shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return array


def nearest(value: np.ndarray, table: dict) -> str:
    names = list(table)
    points = np.array([table[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((points - value) ** 2).sum(-1)))]


def background_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(border.astype(np.float32), axis=0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray pixels would stretch the box)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:  # every pixel takes the largest label among itself and its neighbours
        padded = np.pad(labels, 1)
        spread = np.maximum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1],
                                    padded[1:-1, :-2], padded[1:-1, 2:]])
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)] if len(values) else mask


def object_mask(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    distance = np.sqrt(((image.astype(np.float32) - background) ** 2).sum(-1))
    return largest_component(distance > OBJECT_DISTANCE)


def shape_of(mask: np.ndarray) -> str:
    """The shape whose template, stretched over the mask's bounding box, overlaps it best."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    grid_y, grid_x = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32) + 0.5
    # Box coordinates in [-1, 1]; each template fills the box (as dataset.shape_masks draws it).
    u = (grid_x - (x0 + x1) / 2.0) / max((x1 - x0) / 2.0, 0.5)
    v = (grid_y - (y0 + y1) / 2.0) / max((y1 - y0) / 2.0, 0.5)
    templates = {
        "circle": u * u + v * v <= 1.0,
        "square": (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0),
        "triangle": (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0),  # apex up
    }
    ious = {name: (t & mask).sum() / max((t | mask).sum(), 1) for name, t in templates.items()}
    return max(ious, key=ious.get)


def read_image(image) -> dict:
    """Predicted attributes of one image (None where there is no object to judge)."""
    image = to_uint8_rgb(image)
    bg = background_colour(image)
    mask = object_mask(image, bg)
    predicted = {"background": nearest(bg, BACKGROUNDS), "colour": None, "shape": None,
                 "position": None, "centroid": None}
    if mask.sum() < MIN_OBJECT_PIXELS:
        return predicted
    ys, xs = np.nonzero(mask)
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5], dtype=np.float32)
    predicted.update(colour=nearest(np.median(image[mask].astype(np.float32), axis=0), COLOURS),
                     shape=shape_of(mask), position=nearest(centroid, POSITIONS),
                     centroid=centroid)
    return predicted


def judged(predicted: dict, expected: dict) -> dict:
    return {key: {"predicted": predicted.get(key), "expected": value,
                  "correct": predicted.get(key) == value} for key, value in expected.items()}


def analyse_image(image, caption: str) -> dict:
    """Per attribute named by the caption: predicted value, expected value, correct."""
    return judged(read_image(image), parse_caption(caption))


def read_video(frames) -> dict:
    """Predicted attributes of a clip; colour/shape/background from its middle frame."""
    frames = [to_uint8_rgb(f) for f in frames]
    middle = read_image(frames[len(frames) // 2])
    times, points = [], []
    for t, frame in enumerate(frames):
        centroid = read_image(frame)["centroid"]
        if centroid is not None:
            times.append(t)
            points.append(centroid)
    direction = None
    if len(points) >= 2:
        times_ = np.array(times, dtype=np.float32)
        velocity = np.polyfit(times_, np.stack(points), 1)[0]  # (vx, vy) in px / frame
        travel = velocity * (len(frames) - 1)
        axis = int(np.argmax(np.abs(travel)))
        if abs(travel[axis]) >= MIN_TRAVEL:
            direction = (("left", "right") if axis == 0 else ("up", "down"))[int(travel[axis] > 0)]
    return {"background": middle["background"], "colour": middle["colour"],
            "shape": middle["shape"], "direction": direction}


def analyse_video(frames, caption: str) -> dict:
    """Per attribute named by the caption (direction included): predicted, expected, correct."""
    return judged(read_video(frames), parse_caption(caption))


def prompt_following(items, captions, video: bool = False) -> dict:
    """Fraction correct per attribute over items (images, or clips with video=True), plus
    "all" (every attribute right) and "n"."""
    if len(items) != len(captions):
        raise ValueError(f"{len(items)} items but {len(captions)} captions")
    analyse = analyse_video if video else analyse_image
    results = [analyse(item, caption) for item, caption in zip(items, captions)]
    summary = {"n": len(results)}
    if results:
        for key in results[0]:
            summary[key] = float(np.mean([r[key]["correct"] for r in results]))
        summary["all"] = float(np.mean([all(v["correct"] for v in r.values()) for r in results]))
    return summary

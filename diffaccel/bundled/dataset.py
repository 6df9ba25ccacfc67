"""Synthetic captioned shapes: the training and evaluation data of the bundled models.

Every image shows one coloured shape on a plain background; its caption names the
colour, the shape, where it is and the background, e.g.
"a red circle at the top left on a black background". Every clip shows one shape moving
in the direction its caption names, e.g. "a blue square moving left on a black background".

The vocabulary is deliberately small (DESIGN §6: few caption combinations are learned
much sooner) and the colours are far apart in RGB so that a pixel analyser can decide
them without doubt. A few colour x shape pairs (HELD_OUT_PAIRS) never appear in the
training split, so generalisation to unseen combinations can be reported on its own.

Everything is deterministic from a seed (numpy's PCG64), drawn with numpy masks:

>>> images, captions = make_images(4, seed=0)
>>> images.shape, images.dtype
((4, 32, 32, 3), dtype('uint8'))
"""

from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
NUM_FRAMES = 9  # 1 + 2k frames: what a Wan VAE with 2x temporal compression accepts

# Far apart in RGB: the closest pair is still > 190 apart, so decoding noise cannot swap them.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 30),
    "magenta": (210, 40, 210),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle")
# Anchor of each position, in pixels (x, y) of the 32x32 canvas.
POSITIONS = {
    "top left": (10.0, 10.0),
    "top right": (22.0, 10.0),
    "bottom left": (10.0, 22.0),
    "bottom right": (22.0, 22.0),
    "center": (16.0, 16.0),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
VIDEO_BACKGROUND = "black"

# Never drawn in the "train" split; each colour and each shape still appears with others.
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "square"))

SPLITS = ("train", "heldout")


def colour_shape_pairs(split: str) -> list[tuple[str, str]]:
    """The colour x shape pairs a split draws from: all but the held-out ones, or only those."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    held = set(HELD_OUT_PAIRS)
    return [p for p in pairs if (p in held) == (split == "heldout")]


def position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def image_caption(colour: str, shape: str, position: str, background: str) -> str:
    return f"a {colour} {shape} {position_phrase(position)} on a {background} background"


def video_caption(colour: str, shape: str, direction: str, background: str = VIDEO_BACKGROUND) -> str:
    return f"a {colour} {shape} moving {direction} on a {background} background"


def parse_caption(caption: str) -> dict:
    """Attributes named by an image or video caption (the inverse of *_caption)."""
    words = caption.lower().strip().rstrip(".").split()
    if len(words) < 8 or words[0] != "a" or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        raise ValueError(f"not a bundled-dataset caption: {caption!r}")
    attrs = {"colour": words[1], "shape": words[2], "background": words[-2]}
    middle = " ".join(words[3:-4])  # between the shape and "on a <bg> background"
    if middle.startswith("moving "):
        attrs["direction"] = middle[len("moving "):]
    else:
        attrs["position"] = middle.replace("in the ", "").replace("at the ", "")
    checks = {"colour": COLOURS, "shape": SHAPES, "background": BACKGROUNDS,
              "position": POSITIONS, "direction": DIRECTIONS}
    for key, value in attrs.items():
        if value not in checks[key]:
            raise ValueError(f"caption {caption!r}: unknown {key} {value!r}")
    return attrs


def all_image_captions(split: str = "train") -> list[str]:
    return [image_caption(c, s, p, b) for c, s in colour_shape_pairs(split)
            for p in POSITIONS for b in BACKGROUNDS]


def all_video_captions(split: str = "train") -> list[str]:
    return [video_caption(c, s, d) for c, s in colour_shape_pairs(split) for d in DIRECTIONS]


def shape_masks(shapes: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray,
                size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean masks (N, size, size) of shapes centred at (cx, cy) with half-extent radius."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    r = radius[:, None, None]
    circle = dx * dx + dy * dy <= r * r
    half = 0.85 * r  # a square of the same visual weight as the circle
    square = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Upward triangle: apex at cy - r, base at cy + r, base half-width r.
    inside_y = (dy >= -r) & (dy <= r)
    triangle = inside_y & (np.abs(dx) <= (dy + r) / 2.0)
    kind = np.asarray(shapes)[:, None, None]
    return np.where(kind == "circle", circle, np.where(kind == "square", square, triangle))


def paint(masks: np.ndarray, colours: list[str], backgrounds: list[str]) -> np.ndarray:
    """uint8 images (N, H, W, 3): background colour everywhere, shape colour under the mask."""
    fg = np.array([COLOURS[c] for c in colours], dtype=np.uint8)[:, None, None, :]
    bg = np.array([BACKGROUNDS[b] for b in backgrounds], dtype=np.uint8)[:, None, None, :]
    return np.where(masks[..., None], fg, bg)


def sample_image_attributes(n: int, rng: np.random.Generator, split: str = "train") -> list[dict]:
    pairs = colour_shape_pairs(split)
    pair_idx = rng.integers(len(pairs), size=n)
    pos_idx = rng.integers(len(POSITIONS), size=n)
    bg_idx = rng.integers(len(BACKGROUNDS), size=n)
    positions, backgrounds = list(POSITIONS), list(BACKGROUNDS)
    return [{"colour": pairs[i][0], "shape": pairs[i][1], "position": positions[p],
             "background": backgrounds[b]} for i, p, b in zip(pair_idx, pos_idx, bg_idx)]


def make_images(n: int, seed: int, split: str = "train", return_attributes: bool = False):
    """n images (uint8, N x 32 x 32 x 3) and their captions, deterministic from seed.

    Position and size jitter a little around each anchor, so that no two seeds give
    exactly the same pixels while the caption stays unambiguous.
    """
    rng = np.random.default_rng(seed)
    attrs = sample_image_attributes(n, rng, split)
    anchors = np.array([POSITIONS[a["position"]] for a in attrs], dtype=np.float32).reshape(n, 2)
    jitter = rng.uniform(-1.5, 1.5, size=(n, 2)).astype(np.float32)
    radius = rng.uniform(5.5, 7.0, size=n).astype(np.float32)
    masks = shape_masks(np.array([a["shape"] for a in attrs]), anchors[:, 0] + jitter[:, 0],
                        anchors[:, 1] + jitter[:, 1], radius)
    images = paint(masks, [a["colour"] for a in attrs], [a["background"] for a in attrs])
    captions = [image_caption(**a) for a in attrs]
    return (images, captions, attrs) if return_attributes else (images, captions)


def make_videos(n: int, seed: int, split: str = "train", num_frames: int = NUM_FRAMES,
                return_attributes: bool = False):
    """n clips (uint8, N x T x 32 x 32 x 3) of one shape moving as the caption says.

    The shape travels 14-16 px over the clip along the named axis, starting on the side
    it moves away from; its coordinate across the motion is random.
    """
    rng = np.random.default_rng(seed)
    pairs = colour_shape_pairs(split)
    directions = list(DIRECTIONS)
    pair_idx = rng.integers(len(pairs), size=n)
    dir_idx = rng.integers(len(directions), size=n)
    travel = rng.uniform(14.0, 16.0, size=n).astype(np.float32)
    across = rng.uniform(11.0, 21.0, size=n).astype(np.float32)
    radius = rng.uniform(5.0, 6.0, size=n).astype(np.float32)
    attrs = [{"colour": pairs[i][0], "shape": pairs[i][1], "direction": directions[d],
              "background": VIDEO_BACKGROUND} for i, d in zip(pair_idx, dir_idx)]
    unit = np.array([DIRECTIONS[a["direction"]] for a in attrs], dtype=np.float32).reshape(n, 2)
    start_along = 16.0 - travel / 2.0  # centred travel: -travel/2 .. +travel/2 around 16
    frames = []
    for t in range(num_frames):
        along = (start_along + travel * t / (num_frames - 1)) - 16.0
        cx = np.where(unit[:, 0] != 0, 16.0 + unit[:, 0] * along, across)
        cy = np.where(unit[:, 1] != 0, 16.0 + unit[:, 1] * along, across)
        masks = shape_masks(np.array([a["shape"] for a in attrs]), cx, cy, radius)
        frames.append(paint(masks, [a["colour"] for a in attrs], [a["background"] for a in attrs]))
    videos = np.stack(frames, axis=1)
    captions = [video_caption(**a) for a in attrs]
    return (videos, captions, attrs) if return_attributes else (videos, captions)

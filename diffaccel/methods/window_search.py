"""Window search for sliding tile attention: per layer (optionally per head), the cheapest
window whose output stays close to full attention, measured on a few calibration calls.

How. The pipeline runs its calibration calls with *full* attention (so the trajectory is
the reference one). At a few sampled steps of the sparse phase, each spatial/joint
attention's q, k, v are taken as they are and every candidate window is evaluated against
the dense output: relative error ``||STA_w - full|| / ||full||`` per head. Then either
each layer (head) gets the cheapest window under ``max_error``, or, with
``target_density``, windows are grown greedily where they buy the most error per added
density until the attention-FLOP-weighted mean density reaches the target. Cost: one
pipeline call per prompt plus the candidate attentions at the sampled steps: minutes on
the small calibration set, not hours.

Example::

    result = search_windows(pipe, [call_kwargs_1, call_kwargs_2], tile=(4, 8, 8), target_density=0.3)
    result.save("my_model.json")                       # the "sliding_tile" section of a profile
    pipe = diffaccel.accelerate(pipe, methods=[SlidingTileAttention.from_profile("my_model.json")])
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch.nn.functional as F

from diffaccel.families import method_defaults
from diffaccel.kernels import sliding_tile_attention, sliding_tile_density
from diffaccel.methods.attention_intercept import SparseAttentionHook, step_fraction
from diffaccel.methods.base import Installed, Method
from diffaccel.methods.sliding_tile import KINDS, SlidingTileAttention
from diffaccel.pipelines import detect
from diffaccel.state import attach, detach
from diffaccel.validate import at_least, fraction, positive_int, write_atomic


@dataclass
class WindowSearchResult:
    """Chosen windows and the measurements behind them."""

    tile: tuple[int, int, int]
    layer_windows: dict  # module name -> window, or list of per-head windows
    density: float  # attention-FLOP-weighted mean density of the chosen windows
    errors: dict = field(default_factory=dict)  # module name -> {window str: mean relative error per head}
    seconds: float = 0.0

    def config(self, **overrides) -> SlidingTileAttention:
        """A SlidingTileAttention using these windows (its default window is never used:
        every searched layer has its own)."""
        return SlidingTileAttention(**(dict(tile=self.tile, layer_windows=self.layer_windows) | overrides))

    def save(self, path) -> None:
        """Write (or merge into an existing profile JSON) the ``sliding_tile`` section."""
        path = Path(path)
        data = json.loads(path.read_text()) if path.is_file() else {}
        first_window = next(iter(self.layer_windows.values()), (1, 1, 1))
        data["sliding_tile"] = {
            "tile": list(self.tile),
            "window": _jsonable(first_window if not isinstance(first_window[0], (list, tuple)) else first_window[0]),
            "layer_windows": {name: _jsonable(w) for name, w in self.layer_windows.items()},
            "density": self.density,
            "errors": self.errors,
            "search_seconds": self.seconds,
        }
        text = json.dumps(data, indent=1)
        write_atomic(path, lambda tmp: tmp.write_text(text))


def _jsonable(window):
    return [list(w) for w in window] if isinstance(window[0], (list, tuple)) else list(window)


def candidate_windows(grid, tile, sizes=(1, 3, 5, 7)) -> list[tuple[int, int, int]]:
    """Odd windows per axis up to the axis' tile count (a window covering an axis once is
    enough), without the all-covering one (that is full attention)."""
    per_axis = []
    for size, t in zip(grid, tile):
        n = math.ceil(size / t)
        options = sorted({min(s, n if n % 2 else n + 1) for s in sizes})
        per_axis.append(options)
    candidates = [w for w in itertools.product(*per_axis) if sliding_tile_density(grid, tile, w) < 1.0 - 1e-9]
    return candidates


@dataclass(frozen=True)
class WindowProbe(Method):
    """Not a user method (not registered): measures candidate windows while the pipeline runs
    densely, at ``steps`` sampled steps past ``start`` (a fraction of the loop)."""

    name: ClassVar[str] = "window_search"

    tile: tuple[int, int, int] | None
    sizes: tuple[int, ...]
    steps: int
    start: float

    def apply(self, session) -> Installed:
        return WindowProbeInstalled(self, session)


class WindowProbeInstalled(Installed):
    """Probe hooks; the measurements (``records``) persist across the calibration calls."""

    def __init__(self, config: WindowProbe, session):
        super().__init__(config, session)
        family_tile = method_defaults(session.adapter.family, SlidingTileAttention.name, ("tile",))["tile"]
        self.tile = tuple(config.tile or family_tile)
        self.records: dict = {}  # name -> {"weight": seq^2 sum, "density": {w: d}, "errors": {w: tensor}, "n": int}
        self.hooks = [_ProbeHook(self, info) for info in session.adapter.attention_modules() if info.kind in KINDS]

    def reset(self) -> None:  # keep the records across calibration calls
        self.counters = {}


class _ProbeHook(SparseAttentionHook):
    def plan(self, layout):
        config = self.installed.config
        where = step_fraction(self.installed.session.ctx)
        if where is None or where < config.start:
            return None
        num_steps = self.installed.session.ctx.num_steps or 1
        sampled = {round(config.start * num_steps + (num_steps * (1 - config.start) - 1) * i / max(1, config.steps - 1))
                   for i in range(config.steps)}
        if self.installed.session.ctx.step not in sampled:
            return None
        grid = (layout.frames, layout.height, layout.width)
        tile = tuple(min(t, s) for t, s in zip(self.installed.tile, grid))
        return grid, tile

    def attend(self, q, k, v, layout, setting, call):
        grid, tile = setting
        scale = call.scale
        full = call.attend(q, k, v, scale)  # the user's backend: what the dense model computes
        norm = full.float().pow(2).sum(dim=(0, 2, 3)).sqrt().clamp_min(1e-12)  # per head
        record = self.installed.records.setdefault(self.info.name, {"weight": 0.0, "density": {}, "errors": {},
                                                                      "n": 0, "tile": tile})
        record["weight"] += float(q.shape[0] * q.shape[1] * q.shape[2] ** 2)
        record["n"] += 1
        for window in candidate_windows(grid, tile, self.installed.config.sizes):
            sparse = sliding_tile_attention(q, k, v, grid, tile, window, layout.text_tokens, scale=scale)
            error = (sparse.float() - full.float()).pow(2).sum(dim=(0, 2, 3)).sqrt() / norm
            errors = record["errors"]
            errors[window] = errors.get(window, 0) + error.cpu()
            record["density"][window] = sliding_tile_density(grid, tile, window, layout.text_tokens)
        return full


def search_windows(pipe, calibration_calls: list[dict], tile=None, *, max_error: float | None = 0.05,
                   target_density: float | None = None, per_head: bool = False, sizes=(1, 3, 5, 7),
                   sampled_steps: int = 3, full_attention_fraction: float = 0.3) -> WindowSearchResult:
    """Choose sliding-tile windows per layer (or per head) against full attention.

    Args:
        pipe: a diffusers pipeline of a supported family (it is left unaccelerated).
        calibration_calls: keyword arguments of a few pipeline calls (prompts, sizes, steps).
        tile: tile in tokens; None = family default.
        max_error: pick per unit the cheapest window with mean relative error <= max_error
            (full attention when none is). Ignored when ``target_density`` is given.
        target_density: instead, grow windows greedily (most error removed per added
            density first) until the FLOP-weighted mean density reaches this value.
        per_head: one window per head instead of per layer.
        sizes: odd window sizes (in tiles) tried on every axis.
        sampled_steps: sparse-phase steps of each call at which candidates are measured.
        full_attention_fraction: steps before this fraction are not measured (they stay dense).
    """
    if not calibration_calls:
        raise ValueError("search_windows needs at least one calibration call (a dict of pipeline kwargs)")
    if target_density is None and max_error is None:
        raise ValueError("give max_error= or target_density=")
    if target_density is not None:
        fraction(target_density, "search_windows target_density", 0.0, 1.0,
                 hint="It is the FLOP-weighted share of full attention kept, e.g. 0.3.")
    else:
        at_least(max_error, "search_windows max_error", 0.0, "It is the mean relative error of a window, e.g. 0.05.")
    positive_int(sampled_steps, "search_windows sampled_steps", "e.g. 3 measured steps per call.")
    fraction(full_attention_fraction, "search_windows full_attention_fraction", 0.0, 1.0, inclusive_high=False,
             hint="Use the value the SlidingTileAttention config will have, e.g. 0.3.")
    if not (isinstance(sizes, (tuple, list)) and sizes and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 and s % 2 for s in sizes)):
        raise ValueError(f"search_windows sizes must be odd positive window sizes in tiles, got {sizes!r}; e.g. (1, 3, 5, 7).")
    started = time.monotonic()
    probe = WindowProbe(tile, tuple(sizes), sampled_steps, full_attention_fraction)
    session = attach(pipe, detect(pipe), [probe])
    try:
        handle = session.installed[0]
        for kwargs in calibration_calls:
            pipe(**kwargs)
        records, used_tile = handle.records, handle.tile
    finally:
        detach(pipe)
    if not records:
        raise ValueError("no attention call was measured: the grid may be too small for the tile, or the calls have "
                         "too few steps after full_attention_fraction")
    units = _units(records, per_head)
    chosen = _choose_by_density(units, target_density) if target_density is not None else \
        {unit: _cheapest_under(options, max_error) for unit, options in units.items()}
    layer_windows, total, weight = {}, 0.0, 0.0
    for name, record in records.items():
        heads = len(next(iter(record["errors"].values())))
        if per_head:
            windows = [chosen[(name, h)] for h in range(heads)]
            layer_windows[name] = windows if len(set(windows)) > 1 else windows[0]
            density = sum(_density(record, w) for w in windows) / heads
        else:
            layer_windows[name] = chosen[(name, None)]
            density = _density(record, layer_windows[name])
        total += density * record["weight"]
        weight += record["weight"]
    errors = {name: {str(w): [round(float(e) / r["n"], 5) for e in err] for w, err in r["errors"].items()}
              for name, r in records.items()}
    return WindowSearchResult(used_tile, layer_windows, total / weight, errors, time.monotonic() - started)


_FULL = (999, 999, 999)  # "window covering everything": dense attention


def _density(record, window) -> float:
    return 1.0 if window == _FULL else record["density"][window]


def _units(records, per_head):
    """unit -> sorted [(density, mean error, window, weight)], plus the dense option."""
    units = {}
    for name, record in records.items():
        heads = len(next(iter(record["errors"].values())))
        for head in (range(heads) if per_head else [None]):
            options = []
            for window, error in record["errors"].items():
                value = float(error[head] if head is not None else error.mean()) / record["n"]
                options.append((record["density"][window], value, window, record["weight"]))
            options.append((1.0, 0.0, _FULL, record["weight"]))
            units[(name, head)] = sorted(options)
    return units


def _cheapest_under(options, max_error):
    return next(window for density, error, window, _ in options if error <= max_error)


def _choose_by_density(units, target_density):
    """Greedy on each unit's lower convex hull of (density, error)."""
    frontiers = {}
    for unit, options in units.items():
        frontier = []
        for option in options:  # sorted by density: keep strictly improving errors
            if not frontier or option[1] < frontier[-1][1]:
                frontier.append(option)
        frontiers[unit] = frontier
    position = {unit: 0 for unit in frontiers}
    total_weight = sum(f[0][3] for f in frontiers.values())

    def mean_density():
        return sum(f[position[u]][0] * f[0][3] for u, f in frontiers.items()) / total_weight

    while mean_density() < target_density:
        best, best_gain = None, -1.0
        for unit, frontier in frontiers.items():
            i = position[unit]
            if i + 1 < len(frontier):
                (d0, e0, _, w), (d1, e1, _, _) = frontier[i], frontier[i + 1]
                gain = (e0 - e1) / max(1e-12, (d1 - d0) * w)
                if gain > best_gain:
                    best, best_gain = unit, gain
        if best is None:
            break
        position[best] += 1
    return {unit: frontier[position[unit]][2] for unit, frontier in frontiers.items()}

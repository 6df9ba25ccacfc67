"""Sliding tile attention (STA): each query tile of the (T, H, W) token grid attends only to
a window of tiles around it (centre clamped inside the grid); text tokens of joint
attention still attend to and are attended by everything. Training-free: the first
fraction of steps keeps full attention (they fix the global layout), later steps, whose
attention is local, use the windows. Windows can differ per layer and per head, e.g. as
found by :func:`diffaccel.methods.window_search.search_windows`.

Applies to the self-attention of U-Nets, image DiTs and video DiTs (modules the family
adapter classifies as ``spatial`` or ``joint``), through the adapter's token layout. Where
a window covers the whole grid, or the grid has fewer than ``min_tokens`` tokens, the
module keeps its dense attention on the backend the user selected (torch SDPA, or the
diffusers attention-dispatch backend: flash, sage, ...); the sparse calls run the tile kernels
(:mod:`diffaccel.kernels`). Modules whose attention diffaccel cannot route (xformers
processors, context parallelism) are refused at ``accelerate``.

Example::

    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.SlidingTileAttention(tile=(4, 8, 8), window=(3, 3, 3))])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from diffaccel.families import Capability
from diffaccel.kernels import BACKENDS, sliding_tile_attention, sliding_tile_density
from diffaccel.kernels.tile_order import sliding_tile_attention_tile_ordered
from diffaccel.methods.attention_intercept import SparseAttentionHook
from diffaccel.methods.base import Installed, Method, register
from diffaccel.methods.tile_order import TileOrder
from diffaccel.validate import fraction, int_triple, non_negative_int, window

KINDS = ("spatial", "joint")
BACKEND_CHOICES = (None, *BACKENDS, "cpu")  # "cpu" names the box path


@register
@dataclass(frozen=True)
class SlidingTileAttention(Method):
    """Sliding tile attention for spatial / joint self-attention.

    Attributes:
        tile: tile size in tokens (frames, height, width); None = the family default
            (:mod:`diffaccel.families`: (4, 8, 8) for video, (1, 8, 8) for images).
        window: window in tiles (odd per axis), or a list of per-head windows; None = the
            family default ((3, 3, 3) video, (1, 3, 3) images).
        layer_windows: per attention module name (as in ``adapter.attention_modules()``), a
            window or per-head list overriding ``window`` (what the window search returns).
        full_attention_fraction: the first fraction of the steps keeps full attention
            (STA keeps ~15 of 50 steps: 0.3).
        min_tokens: grids with fewer visual tokens stay dense (sparse overhead not worth it).
        backend: force a kernel backend (one of ``diffaccel.kernels.BACKENDS``, or "cpu" for
            the box path); None = the fastest that can run.
        permute_once: keep the video tokens in tile order for the whole denoiser call (reordered
            once after the patch embedding, with the rotary tables, and back before the output
            projection; :mod:`diffaccel.methods.tile_order`), so no layer reorders q, k, v: the
            Triton kernel then runs alone. Video DiTs whose adapter supports it (CogVideoX,
            HunyuanVideo T2V, Wan, LTX-Video); output equal to ``False`` up to float rounding.
            Off by default until GPU timings confirm the gain (eval/gpu_suite.sh measures it);
            on CPU the box path gathers to row-major per layer, so it is slower there.
    """

    name: ClassVar[str] = "sliding_tile"
    requires: ClassVar[Capability] = Capability.SPARSE_ATTENTION
    # under Ulysses the routed call runs between diffusers' all-to-alls (whole sequence, a shard of
    # the heads: exact); ring splits the keys, so no rank could see a whole window
    context_parallel: ClassVar[str] = "ulysses"
    family_defaults: ClassVar[tuple[str, ...]] = ("tile", "window")

    tile: tuple[int, int, int] | None = None
    window: tuple | list | None = None
    layer_windows: dict = field(default_factory=dict)
    full_attention_fraction: float = 0.3
    min_tokens: int = 1024
    backend: str | None = None
    permute_once: bool = False

    def validate(self) -> None:
        if self.tile is not None:
            int_triple(self.tile, "SlidingTileAttention(tile=...)", odd=False)
        if self.window is not None:
            window(self.window, "SlidingTileAttention(window=...)")
        if not isinstance(self.layer_windows, dict):
            raise ValueError("SlidingTileAttention(layer_windows=...) must map attention module names to windows, "
                             f"got {type(self.layer_windows).__name__}")
        for name, per_layer in self.layer_windows.items():
            window(per_layer, f"SlidingTileAttention(layer_windows[{name!r}])")
        fraction(self.full_attention_fraction, "SlidingTileAttention(full_attention_fraction=...)",
                 hint="0 makes every step sparse; 0.3 keeps the first 30% of the steps dense (STA).")
        non_negative_int(self.min_tokens, "SlidingTileAttention(min_tokens=...)")
        if not isinstance(self.permute_once, bool):
            raise ValueError(f"SlidingTileAttention(permute_once=...) must be True or False, got {self.permute_once!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"SlidingTileAttention(backend=...) must be one of {BACKEND_CHOICES}, got {self.backend!r}")

    @classmethod
    def from_profile(cls, path, **overrides) -> "SlidingTileAttention":
        """The config saved by the window search (``WindowSearchResult.save``)."""
        how = "create it with diffaccel.methods.window_search.search_windows(...).save(path)"
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"Window file {str(path)!r} does not exist; {how}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as err:
            raise ValueError(f"{str(path)!r} is not a JSON window file ({type(err).__name__}); {how}.") from None
        if not isinstance(data, dict) or "sliding_tile" not in data:
            raise ValueError(f"{path} holds no 'sliding_tile' section; {how}")
        section = data["sliding_tile"]
        try:
            windows = {name: _as_window(w) for name, w in section["layer_windows"].items()}
            kwargs = dict(tile=tuple(section["tile"]), window=_as_window(section["window"]), layer_windows=windows)
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            raise ValueError(f"{path}: its 'sliding_tile' section is corrupted ({type(err).__name__}: {err}); {how}.") from None
        config = cls(**(kwargs | overrides))
        config.validate()
        return config

    def apply(self, session) -> Installed:
        self.validate()
        self.check_family(session.adapter.family)
        return SlidingTileAttentionInstalled(self, session)


def _as_window(value):
    if value and isinstance(value[0], (list, tuple)):
        return [tuple(w) for w in value]
    return tuple(value)


class SlidingTileAttentionInstalled(Installed):
    """One tile hook per spatial / joint self-attention module."""

    def __init__(self, config: SlidingTileAttention, session):
        super().__init__(config, session)
        defaults = config.defaults_for(session.adapter.family)
        self.tile = tuple(config.tile or defaults["tile"])
        self.window = config.window or defaults["window"]
        modules = [info for info in session.adapter.attention_modules() if info.kind in KINDS]
        unknown = set(config.layer_windows) - {info.name for info in modules}
        if unknown:
            raise ValueError(f"layer_windows names modules that are not spatial/joint self-attention of this "
                             f"pipeline: {sorted(unknown)[:5]}; known: {[i.name for i in modules][:5]} ...")
        self.hooks = [_TileHook(self, info, config.layer_windows.get(info.name, self.window)) for info in modules]
        self.tile_order = None
        if config.permute_once:
            try:
                self.tile_order = TileOrder(self)
            except ValueError as exc:
                self.remove()
                raise ValueError(f"SlidingTileAttention(permute_once=True): {exc}") from None

    def stats(self) -> dict:
        out = dict(self.counters)
        densities = out.pop("_density_sum", None)
        if densities is not None and out.get("sparse_calls"):
            out["mean_density"] = densities / out["sparse_calls"]
        return out


class _TileHook(SparseAttentionHook):
    def __init__(self, installed: SlidingTileAttentionInstalled, info, window):
        super().__init__(installed, info)
        self.window = window

    def takes_model_order(self) -> bool:
        order = self.installed.tile_order
        return order is not None and order.active is not None

    def plan(self, layout):
        if self.sparse_phase(layout) is None:
            return None
        grid = (layout.frames, layout.height, layout.width)
        tile = tuple(min(t, s) for t, s in zip(self.installed.tile, grid))
        per_head = isinstance(self.window[0], (tuple, list))
        heads = len(self.window) if per_head else 1
        density = sliding_tile_density(grid, tile, self.window, layout.text_tokens, heads)
        if density >= 1.0 - 1e-9:  # the window covers everything: dense SDPA is the right kernel
            return None
        return grid, tile, density

    def attend(self, q, k, v, layout, setting, call):
        grid, tile, density = setting
        scale = call.scale
        batch, heads, seq, dim = q.shape
        self.installed.count("_density_sum", density)
        self.installed.count("flops_saved", 4.0 * batch * heads * seq * seq * dim * (1.0 - density))
        if self.takes_model_order():  # tokens in tile order since the patch embedding: no reorder here
            if self.installed.tile_order.active != (grid, tile):
                raise RuntimeError(f"{self.info.name}: tokens are in tile order {self.installed.tile_order.active}, "
                                   f"but this layer sees grid {grid} with tile {tile}; please report this model")
            self.installed.count("tile_ordered_calls")
            return sliding_tile_attention_tile_ordered(q, k, v, grid, tile, self.window, layout.text_tokens,
                                                       layout.text_position, scale=scale,
                                                       backend=self.installed.config.backend)
        return sliding_tile_attention(q, k, v, grid, tile, self.window, layout.text_tokens, scale=scale,
                                      backend=self.installed.config.backend)


def uniform_window_for_density(grid, tile, density: float, text_tokens: int = 0, odd_sizes=range(1, 64, 2)):
    """The isotropic-ish window whose density is closest to ``density`` (for comparisons)."""
    n = [math.ceil(s / t) for s, t in zip(grid, tile)]
    candidates = {(min(a, n[0] if n[0] % 2 else n[0] + 1), min(b, n[1] if n[1] % 2 else n[1] + 1),
                   min(c, n[2] if n[2] % 2 else n[2] + 1))
                  for a in odd_sizes for b in odd_sizes for c in odd_sizes if a <= n[0] + 1 and b <= n[1] + 1
                  and c <= n[2] + 1}
    return min(candidates, key=lambda w: abs(sliding_tile_density(grid, tile, w, text_tokens) - density))

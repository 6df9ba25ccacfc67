"""Pyramid Attention Broadcast: reuse attention outputs, more often for the stabler kinds.

Attention outputs change little from step to step in the middle of the trajectory, cross
attention least, temporal attention more, spatial attention most (the "pyramid"). Each kind
gets a broadcast interval N: an attention is computed when the branch last computed it N or
more steps ago or when the step lies outside the kind's time range, and otherwise its last
output is broadcast. Joint attention (text and visual tokens in one sequence: SD3, Flux,
CogVideoX, HunyuanVideo) follows the spatial settings.

Differences from diffusers' PyramidAttentionBroadcastConfig: time ranges are in normalised
time (t_norm in [0, 1], 1 = noise), so a schedule means the same for every step count and for
flow-matching models whose timesteps are sigmas; caches are kept per CFG branch, so separate
CFG calls (Wan, Flux true-CFG, HunyuanVideo) never broadcast the conditional output into the
unconditional call; and the kinds come from the family adapter instead of name patterns.

Example::

    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.PAB(spatial_interval=2, cross_interval=6)])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from diffaccel.methods.base import Installed, Method, positive_int, register
from diffaccel.methods.cache_common import AttentionReuse

# Per family: kind -> (interval, (t_low, t_high)). Cross attention is stablest; the extremes of
# the trajectory (first and last ~10-20%) change fastest and always compute.
FAMILY_DEFAULTS: dict[str, dict[str, tuple[int, tuple[float, float]]]] = {
    "image_dit": {"spatial": (2, (0.1, 0.8)), "temporal": (1, (0.1, 0.8)), "cross": (4, (0.1, 0.9))},
    "video_dit": {"spatial": (2, (0.1, 0.8)), "temporal": (4, (0.1, 0.85)), "cross": (6, (0.1, 0.9))},
}


@register
@dataclass
class PAB(Method):
    """Pyramid Attention Broadcast for image and video DiTs.

    Attributes:
        spatial_interval: compute spatial (and joint) attention every N steps inside its range;
            1 = never reuse; None = the family default (2).
        temporal_interval: the same for temporal attention (video default 4).
        cross_interval: the same for cross attention (default 4 image, 6 video).
        spatial_range / temporal_range / cross_range: (low, high) normalised times between which
            reuse is allowed (open interval, 1 = pure noise); None = the family default.
    """

    name: ClassVar[str] = "pab"
    families: ClassVar[tuple[str, ...]] = ("image_dit", "video_dit")

    spatial_interval: int | None = None
    temporal_interval: int | None = None
    cross_interval: int | None = None
    spatial_range: tuple[float, float] | None = None
    temporal_range: tuple[float, float] | None = None
    cross_range: tuple[float, float] | None = None

    def validate(self) -> None:
        for kind in ("spatial", "temporal", "cross"):
            interval = getattr(self, f"{kind}_interval")
            if interval is not None:
                positive_int(interval, f"PAB({kind}_interval=...)", "Use 1 to always compute this attention kind.")
            _check_range(getattr(self, f"{kind}_range"), f"PAB({kind}_range=...)")

    def resolved(self, family: str) -> dict[str, tuple[int, tuple[float, float]]]:
        """kind -> (interval, range) with the family defaults filled in."""
        out = {}
        for kind, (interval, t_range) in FAMILY_DEFAULTS[family].items():
            given_interval, given_range = getattr(self, f"{kind}_interval"), getattr(self, f"{kind}_range")
            out[kind] = (interval if given_interval is None else given_interval, tuple(t_range if given_range is None else given_range))
        out["joint"] = out["spatial"]
        return out

    def apply(self, session) -> Installed:
        self.validate()
        self.check_family(session.adapter.family)
        return _PABInstalled(self, session)


def _check_range(t_range, what: str) -> None:
    if t_range is None:
        return
    ok = isinstance(t_range, (tuple, list)) and len(t_range) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in t_range
    )
    if not ok or not (0.0 <= t_range[0] < t_range[1] <= 1.0):
        raise ValueError(
            f"{what} must be (low, high) normalised times with 0 <= low < high <= 1 (1 = pure noise), got {t_range!r}; "
            "e.g. (0.1, 0.8) reuses in the middle of the trajectory."
        )


class _PABInstalled(Installed):
    def __init__(self, config: PAB, session):
        super().__init__(config, session)
        settings = config.resolved(session.adapter.family)
        self.hooks = [
            AttentionReuse(self, info, *settings[info.kind])
            for info in session.adapter.attention_modules()
            if settings[info.kind][0] > 1  # interval 1 never reuses: leave the module untouched
        ]

    def reset_cache(self) -> None:
        for hook in getattr(self, "hooks", []):
            hook.reset()

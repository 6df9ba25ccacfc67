"""Pyramid Attention Broadcast: reuse attention outputs, more often for the stabler kinds.

Attention outputs change little from step to step in the middle of the trajectory, cross
attention least, temporal attention more, spatial attention most (the "pyramid"). Each kind
gets a broadcast interval N: an attention is computed when its CFG half last computed it N or
more steps ago or when the step lies outside the kind's time range, and otherwise its last
output is broadcast. Joint attention (text and visual tokens in one sequence: SD3, Flux,
CogVideoX, HunyuanVideo) follows the spatial settings.

Time ranges are normalised times (t_norm in [0, 1], 1 = noise), so a schedule means the same for
every step count and for flow-matching models whose timesteps are sigmas; caches are kept per
CFG half, so separate CFG calls (Wan, Flux true-CFG, HunyuanVideo) never broadcast the
conditional output into the unconditional call; the attention kinds come from the family
adapter, and each family's default intervals and ranges from :mod:`diffaccel.families`.

Example::

    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.PAB(spatial_interval=2, cross_interval=6)])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from diffaccel.families import Capability
from diffaccel.methods.base import Installed, Method, register
from diffaccel.methods.cache_common import AttentionReuse
from diffaccel.validate import positive_int, time_range

KINDS = ("spatial", "temporal", "cross")  # joint attention follows spatial


@register
@dataclass(frozen=True)
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
    requires: ClassVar[Capability] = Capability.ATTENTION_REUSE
    family_defaults: ClassVar[tuple[str, ...]] = KINDS  # kind -> (interval, (t_low, t_high))

    spatial_interval: int | None = None
    temporal_interval: int | None = None
    cross_interval: int | None = None
    spatial_range: tuple[float, float] | None = None
    temporal_range: tuple[float, float] | None = None
    cross_range: tuple[float, float] | None = None

    def validate(self) -> None:
        for kind in KINDS:
            interval = getattr(self, f"{kind}_interval")
            if interval is not None:
                positive_int(interval, f"PAB({kind}_interval=...)", "Use 1 to always compute this attention kind.")
            time_range(getattr(self, f"{kind}_range"), f"PAB({kind}_range=...)")

    def resolved(self, family: str) -> dict[str, tuple[int, tuple[float, float]]]:
        """kind -> (interval, range) with the family defaults filled in."""
        defaults = self.defaults_for(family)
        out = {}
        for kind in KINDS:
            interval, t_range = defaults[kind]
            given_interval, given_range = getattr(self, f"{kind}_interval"), getattr(self, f"{kind}_range")
            out[kind] = (interval if given_interval is None else given_interval, tuple(t_range if given_range is None else given_range))
        out["joint"] = out["spatial"]
        return out

    def apply(self, session) -> Installed:
        self.validate()
        self.check_family(session.adapter.family)
        return PABInstalled(self, session)


class PABInstalled(Installed):
    """One attention-reuse hook per attention module whose kind reuses at all."""

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

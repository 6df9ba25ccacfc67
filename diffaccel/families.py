"""The model families diffaccel knows, and everything it decides per family, in one registry.

A family groups denoiser architectures that the same methods and settings suit: U-Nets, image
DiTs, video DiTs. Each family has one :class:`FamilySpec` in :data:`FAMILIES`:

* ``adapters``: the module of ``diffaccel.pipelines`` whose :class:`~diffaccel.pipelines.Adapter`
  subclasses describe its pipelines (detection finds them there);
* ``capabilities``: what its denoisers offer; a method runs on the families that have the
  capability it ``requires`` (see :class:`~diffaccel.methods.base.Method`);
* ``presets``: the methods behind "quality", "balanced" and "fast";
* ``method_defaults``: per method, the values of its family-dependent settings (a PAB interval, a
  sliding-tile window) that a user leaves at None.

Adding a family is one adapter file in ``pipelines/`` and one entry here;
``tests/test_families.py`` fails until the entry has every preset and every default its methods
need. This module imports nothing else of diffaccel, so every layer may read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping


class Family(str, Enum):
    """A denoiser family. The values are the plain strings stored in profiles and shown in stats,
    and members compare equal to them (``Family.UNET == "unet"``)."""

    UNET = "unet"
    IMAGE_DIT = "image_dit"
    VIDEO_DIT = "video_dit"

    __str__ = str.__str__
    __format__ = str.__format__


class Capability(str, Enum):
    """What a family's denoisers offer, as the methods need it."""

    SKIP_BRANCHES = "skip_branches"  # U-Net skips a shallow path can run alone (DeepCache)
    TOKEN_MERGING = "token_merging"  # transformer blocks over one 2-D image grid (ToMe)
    BLOCK_CACHING = "block_caching"  # a stack of blocks whose residual can stand in for them (AdaptiveCache)
    ATTENTION_REUSE = "attention_reuse"  # attention outputs reusable across steps (PAB, FasterCache)
    SPARSE_ATTENTION = "sparse_attention"  # self-attention over a known (T, H, W) token layout
    VIDEO = "video"  # the pipeline returns frames

    __str__ = str.__str__
    __format__ = str.__format__


PRESET_NAMES = ("quality", "balanced", "fast")

MethodList = tuple[tuple[str, Mapping[str, Any]], ...]  # (method name, parameters), applied in order


@dataclass(frozen=True)
class FamilySpec:
    family: Family
    adapters: str
    capabilities: frozenset[Capability]
    presets: Mapping[str, MethodList]
    method_defaults: Mapping[str, Mapping[str, Any]]


# Every preset first computes what depends on the text alone once per call (TextCache: lossless,
# bit-identical outputs; it installs nothing on a denoiser without such modules) where the text is
# long against the visual tokens (>= 1/8: small images and short clips; at 512-1024 px it would
# save under 0.5% of a step and hold memory).
TEXT_CACHE_MIN_RATIO = 0.125
_TEXT = ("text_cache", {"required": False, "min_text_ratio": TEXT_CACHE_MIN_RATIO})
_SPAN = 0.18  # U-Net presets: the widest gap between full steps a DeepCache forecast bridges (see below)

# Preset parameters are measured, not guessed: PSNR against the unaccelerated output and
# prompt-following on the bundled models (eval/results/presets.md, fidelity_unet.md, fidelity_dit.md).
FAMILIES: dict[Family, FamilySpec] = {
    Family.UNET: FamilySpec(
        family=Family.UNET,
        adapters="unet",
        capabilities=frozenset({Capability.SKIP_BRANCHES, Capability.TOKEN_MERGING, Capability.SPARSE_ATTENTION}),
        presets={
            # DeepCache on its shallowest skip every 2 / 3 / 4 steps; "fast" adds ToMe, gated: it merges
            # only blocks with enough tokens for merging to pay (a fixed per-device rule, see tome.py).
            # fast is every 4, not 5: every 5 of 20 steps measured 23.7 / 25.2 / 26.9 / 29.3 dB pooled on four
            # seed sets of tiny-sd, under its 25 dB promise on one; every 4 measured 27.6 / 27.4 / 31.5 / 32.2.
            # The deep features are forecast (order 1; damped at guard 0.15 from every 3 steps) only where the
            # full steps lie at most 0.18 apart in normalised time: on tiny-sd forecasts gained 1.5-12 dB up
            # to 0.16 (every 2 or 3 of 20 DDIM steps, every 2-8 of 50) and lost 1-4 dB from 0.2 on (every 2
            # of 10, every 5 of 20); guard 0.3 gained more on average but lost 8 dB on one training seed.
            # max_span keeps a call with fewer steps from stretching the reuse. tiny-sd, pooled PSNR on training /
            # held-out captions with the full steps this far apart in normalised time: 0.13 (every 2 of 15 steps)
            # 40 / 43 dB, 0.15 (every 3 of 20) 37 / 39, 0.2 (every 4 of 20, 3 of 15, 2 of 10) 27-32 / 32-34,
            # 0.25-0.27 24-27 / 29, 0.3-0.4 22 / 22-23. So quality and balanced space them at most 0.15 apart,
            # fast 0.2: at 10 DDIM steps quality and balanced compute every step and fast every other one;
            # at 20 or more steps nothing changes.
            # min_psnr (36 / 30.5 / 26 dB, as the image DiTs): where a profile has verified DeepCache runs at the
            # call's timesteps (the shipped tiny-sd one: 20 DDIM steps, the lowest pooled PSNR of three training
            # seed sets), the fastest one keeping it runs instead of the rule above.
            "quality": (_TEXT, ("deepcache", dict(interval=2, skip_branch=0, forecast_order=1, forecast_span=_SPAN,
                                                  max_span=0.15, min_psnr=36.0))),
            "balanced": (_TEXT, ("deepcache", dict(interval=3, skip_branch=0, forecast_order=1, guard=0.15,
                                                   forecast_span=_SPAN, max_span=0.15, min_psnr=30.5))),
            # fast also runs the unconditional CFG half only at DeepCache's full steps (CfgCache following them):
            # the cached steps run the shallow path for the conditional rows alone. tiny-sd, 16 held-out seeds:
            # 72.3% of the FLOPs saved at 30.8 dB mean PSNR, against 68.7% at 30.9 without it.
            "fast": (_TEXT, ("deepcache", dict(interval=4, skip_branch=0, forecast_order=1, guard=0.15, forecast_span=_SPAN,
                                               max_span=0.2, min_psnr=26.0)),
                     ("cfg_cache", dict(follow_full_steps=True)),
                     ("tome", dict(ratio=0.5, max_downsample=None, gate=True))),
        },
        method_defaults={
            "sliding_tile": dict(tile=(1, 8, 8), window=(1, 3, 3)),
        },
    ),
    Family.IMAGE_DIT: FamilySpec(
        family=Family.IMAGE_DIT,
        adapters="image_dit",
        capabilities=frozenset({Capability.TOKEN_MERGING, Capability.BLOCK_CACHING, Capability.ATTENTION_REUSE,
                                Capability.SPARSE_ATTENTION}),
        presets={
            # Whole-step skipping planned for a PSNR each (35 / 30 / 25 dB, pooled over seeds as
            # eval/evaluate.py checks it; the shipped front's PSNR is already that of its worst of three
            # training seed sets, so the targets sit only 0.5-1 dB above): with a profile holding
            # a measured step graph (shipped for the bundled models) each call runs the fastest verified
            # schedule meeting it; with more steps of the profiled scheduler, that schedule stretched onto
            # the call's timesteps (the rule below broke balanced at 25 of 20 profiled steps), else every
            # step computes (the rule broke the promises at 10 and 15 steps, and with Euler or DDIM at 20).
            # Without a profile: the MagCache-like rule below (20% retention, last step computed, capped
            # runs of skips). Measured: eval/results/presets.md, step_cache.md.
            "quality": (_TEXT, ("step_cache", dict(min_psnr=36.0, forecast_order=0, max_consecutive=1)),),
            "balanced": (_TEXT, ("step_cache", dict(min_psnr=30.5, forecast_order=0, max_consecutive=2, threshold=0.16)),),
            "fast": (_TEXT, ("step_cache", dict(min_psnr=26.0, forecast_order=0, max_consecutive=3, threshold=0.25)),),
        },
        method_defaults={
            # PAB: attention kind -> (interval, (t_low, t_high)); cross attention changes least, and
            # the first and last ~10-20% of the trajectory change fastest, so they always compute.
            "pab": dict(spatial=(2, (0.1, 0.8)), temporal=(1, (0.1, 0.8)), cross=(4, (0.1, 0.9))),
            "sliding_tile": dict(tile=(1, 8, 8), window=(1, 3, 3)),
        },
    ),
    Family.VIDEO_DIT: FamilySpec(
        family=Family.VIDEO_DIT,
        adapters="video_dit",
        capabilities=frozenset({Capability.BLOCK_CACHING, Capability.ATTENTION_REUSE, Capability.SPARSE_ATTENTION,
                                Capability.VIDEO}),
        presets={
            # As for image DiTs, at 30 / 25 / 20 dB (+1.5 dB margin), residuals forecast to first order;
            # quality and balanced one schedule more careful than their PSNR needs: the 2.62x and 3.49x
            # schedules of the bundled Wan lose prompt-following (3.1 points on training captions).
            "quality": (_TEXT, ("step_cache", dict(min_psnr=35.0, forecast_order=1, max_consecutive=1)),),
            "balanced": (_TEXT, ("step_cache", dict(min_psnr=31.5, forecast_order=1, max_consecutive=2, threshold=0.16)),),
            "fast": (_TEXT, ("step_cache", dict(min_psnr=21.5, forecast_order=1, max_consecutive=3, threshold=0.25)),),
        },
        method_defaults={
            "pab": dict(spatial=(2, (0.1, 0.8)), temporal=(4, (0.1, 0.85)), cross=(6, (0.1, 0.9))),
            "sliding_tile": dict(tile=(4, 8, 8), window=(3, 3, 3)),
        },
    ),
}


def family_spec(family: str) -> FamilySpec:
    """The registry entry of ``family`` (a :class:`Family` or its string value)."""
    try:
        return FAMILIES[Family(family)]
    except (ValueError, KeyError):
        known = ", ".join(f.value for f in FAMILIES)
        raise ValueError(f"Unknown model family {family!r}; diffaccel knows {known} (see diffaccel/families.py).") from None


def families_with(capability: Capability | None) -> tuple[Family, ...]:
    """The families offering ``capability`` (all of them for None), in registry order."""
    return tuple(f for f, spec in FAMILIES.items() if capability is None or capability in spec.capabilities)


def has_capability(family: str, capability: Capability) -> bool:
    return capability in family_spec(family).capabilities


def preset_entry(preset: str, family: str) -> MethodList:
    """The (method name, parameters) list of ``preset`` for ``family``; a clear error when missing."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"Unknown preset {preset!r}. Choose one of: {', '.join(PRESET_NAMES)}.")
    spec = family_spec(family)
    if preset not in spec.presets:
        raise ValueError(f"The {spec.family} family has no {preset!r} preset; add it to FAMILIES[Family."
                         f"{spec.family.name}].presets in diffaccel/families.py.")
    return spec.presets[preset]


def method_defaults(family: str, method: str, keys: tuple[str, ...] = ()) -> Mapping[str, Any]:
    """``method``'s family-dependent default settings for ``family``; a clear error naming what is
    missing when the registry lacks them (or any of ``keys``)."""
    spec = family_spec(family)
    defaults = spec.method_defaults.get(method, {})
    missing = [k for k in keys if k not in defaults] if defaults else list(keys) or ["(all)"]
    if missing:
        raise ValueError(f"The {spec.family} family has no default {', '.join(missing)} for method {method!r}; add them "
                         f"to FAMILIES[Family.{spec.family.name}].method_defaults[{method!r}] in diffaccel/families.py.")
    return defaults

"""DeepCache for U-Net pipelines: reuse the deep features, recompute only a shallow path.

Every scheduled *full* step runs the whole U-Net and keeps the outputs of the modules deeper
than the chosen skip branch. On the other steps those modules return their kept outputs, so only
the shallow path (``conv_in`` -> the first layers of down block ``skip_branch // 3`` ... the last
layers of the matching up block -> ``conv_out``) is computed. Skip branches are numbered as
DeepCache's ``cache_branch_id`` (block ``b // 3``, layer ``b % 3``; a down block's layers are its
resnets followed by its downsampler), and a cached step runs exactly the modules that
``DeepCacheSDHelper`` (DeepCache 0.1.1) runs, so both give the same images.

The modules are hooked through diffusers' HookRegistry (no copied U-Net code; composes with
``enable_model_cpu_offload`` in either order) and the step comes from the session, so
schedulers with repeated timesteps (Heun, DPM2), img2img's truncated schedules and a changed
``num_inference_steps`` all work, and each denoiser call of a step keeps its own cache.

Example::

    import diffaccel
    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=3, skip_branch=0)])
    image = pipe("a red circle").images[0]
    print(diffaccel.stats(pipe)["methods"]["deepcache"])  # computed / reused / skipped_modules
"""
from __future__ import annotations

import math
from dataclasses import InitVar, dataclass
from typing import ClassVar, Sequence

from diffaccel.families import Capability
from diffaccel.methods.base import Installed, Method, hook_forward, register
from diffaccel.methods.cache_common import cat_rows, cfg_half_rows, num_rows, tree_map
from diffaccel.methods.forecast import ORDERS, History
from diffaccel.validate import at_least, fraction, non_negative_int, one_of, positive_int

HOOK_NAME = "diffaccel_deepcache"
SCHEDULES = ("uniform", "non-uniform")
# Largest non-uniform ``power``: beyond it every full step lands on ``center`` and the sampler
# lowers the power 0.02 at a time anyway, so a larger value only costs time (1e6 never returned).
MAX_POWER = 10.0


@register
@dataclass(frozen=True)
class DeepCache(Method):
    """Training-free feature caching for U-Nets (Ma et al., 2023).

    Args:
        interval: N in "one full step every N steps". 1 computes every step (output identical
            to the unaccelerated pipeline); higher is faster and drifts further.
        skip_branch: the U-Net skip kept live, DeepCache's ``cache_branch_id``. 0 is the
            shallowest (fastest); higher recomputes more of the U-Net on cached steps.
            ``branch=`` is accepted as its former name.
        schedule: which steps are full.
            ``"uniform"``: steps 0, N, 2N, ... (what DeepCache's helper does).
            ``"non-uniform"``: the same number of full steps, ceil(steps / N), placed densely
            around ``center`` of the trajectory and sparsely at its ends (the paper's quadratic
            "center/pow" sampling).
            A list of ints: the full steps' indices in the denoising loop. A list of floats in
            [0, 1]: normalised times (t / T_train, 1 = noise) at which to recompute; they are
            resolved at call time, so they survive a change of ``num_inference_steps`` or of the
            scheduler. Step 0 is always full (nothing is cached before it).
        center: non-uniform only: where the full steps crowd, as a fraction of the loop (0.5 =
            the middle).
        power: non-uniform only: how strongly they crowd (1 = uniform spacing; lowered
            automatically until the sampled steps are distinct).
        forecast_order: 0 reuses the deep features of the last full step as they are (DeepCache);
            1 / 2 extrapolate those of the last 2 / 3 full steps to the step's normalised time
            (:mod:`diffaccel.methods.forecast`).
        guard: bound on the forecast's change, in multiples of the last observed change (0: none).
        max_span: the most of the trajectory (normalised time t / T_train) the deep features of one
            full step may drive, from that step to the end of the last step reusing them (a step's
            length taken as the one before it); a step that would drive more is full (1: no bound). It
            keeps a schedule from stretching when a call has fewer steps: every 4 steps spans 0.2 at 20
            DDIM steps and 0.4 at 10, where tiny-sd measured 27-32 and 22 dB. With
            ``schedule="uniform"`` the interval restarts at each full step.
        forecast_span: the farthest apart (in normalised time t / T_train, 1 = the whole trajectory)
            the last two full steps may be for a forecast; farther, the deep features are reused as
            they are. On tiny-sd forecasts gained where full steps were at most 0.16 apart (every 2 or
            3 of 20 DDIM steps, every 2-8 of 50) and lost from 0.2 on (every 2 of 10, every 5 of 20).
        min_psnr: where a profile with verified DeepCache runs is known for the model (shipped with it or
            given to ``accelerate``) and a call runs at the timesteps they ran at, the call runs the fastest
            verified schedule (with its forecast) whose measured pooled PSNR (dB, the lowest over its seed
            sets) is at least this; composed with CfgCache exactly when a ``CfgCache(follow_full_steps=True)``
            is in the same method list. Other calls run the settings above (None: always them).
    """

    name: ClassVar[str] = "deepcache"
    requires: ClassVar[Capability] = Capability.SKIP_BRANCHES

    interval: int = 3
    skip_branch: int = 0
    schedule: str | Sequence[int] | Sequence[float] = "uniform"
    center: float = 0.5
    power: float = 1.4
    forecast_order: int = 0
    guard: float = 2.0
    forecast_span: float = 1.0
    max_span: float = 1.0
    min_psnr: float | None = None
    branch: InitVar[int | None] = None

    def __post_init__(self, branch: int | None) -> None:
        if branch is not None:
            if self.skip_branch not in (0, branch):
                raise ValueError(f"DeepCache got skip_branch={self.skip_branch} and branch={branch}: give skip_branch only.")
            object.__setattr__(self, "skip_branch", branch)

    def validate(self) -> None:
        positive_int(self.interval, "DeepCache interval", "Use 1 to compute every step, 3 for about 2x faster.")
        non_negative_int(self.skip_branch, "DeepCache skip_branch", "It is DeepCache's cache_branch_id; 0 is the shallowest.")
        fraction(self.center, "DeepCache center", hint="0.5 crowds the non-uniform full steps mid-trajectory.")
        fraction(self.power, "DeepCache power", 1.0, MAX_POWER,
                 hint="1 spaces the non-uniform full steps evenly; 1.4 (the default) crowds them around center.")
        if isinstance(self.forecast_order, bool) or self.forecast_order not in ORDERS:
            raise ValueError(f"DeepCache forecast_order={self.forecast_order!r} must be 0, 1 or 2 (0: plain reuse).")
        at_least(self.guard, "DeepCache guard", 0.0, "0 leaves the forecast unbounded; 2 is a safe bound.")
        fraction(self.max_span, "DeepCache max_span", 0.0, 1.0,
                 hint="1 reuses deep features however far from their full step; 0.25 at most a quarter of the trajectory.")
        fraction(self.forecast_span, "DeepCache forecast_span", 0.0, 1.0,
                 hint="1 forecasts whatever the gap between full steps; 0.16 only where they are close.")
        if self.min_psnr is not None:
            at_least(self.min_psnr, "DeepCache(min_psnr=...)", 0.0, "A PSNR in dB, e.g. 30; None runs the settings as given.")
        if isinstance(self.schedule, str):
            one_of(self.schedule, SCHEDULES, "DeepCache schedule", "Or give a list of full steps.")
            return
        if not isinstance(self.schedule, (list, tuple, range)):
            raise ValueError(f"DeepCache schedule must be 'uniform', 'non-uniform' or a list of full steps (ints) or "
                             f"normalised times (floats), got {self.schedule!r}.")
        values = list(self.schedule)
        if not values:
            raise ValueError("DeepCache schedule list is empty: give the full steps (ints) or normalised times (floats).")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            if min(values) < 0:
                raise ValueError(f"DeepCache schedule steps must be >= 0, got {values}.")
        elif all(isinstance(v, float) for v in values):
            if not all(0.0 <= v <= 1.0 for v in values):
                raise ValueError(f"DeepCache schedule times must lie in [0, 1] (t / T_train), got {values}.")
        else:
            raise ValueError("DeepCache schedule list must hold only ints (step indices) or only floats "
                             f"(normalised times in [0, 1]), got {values}.")

    def full_steps(self, num_steps: int) -> list[int] | None:
        """Full-step indices for a loop of ``num_steps`` iterations (None: decided from time)."""
        if self.schedule == "uniform":
            return list(range(0, num_steps, self.interval))
        if self.schedule == "non-uniform":
            return centred_steps(num_steps, math.ceil(num_steps / self.interval), self.center, self.power)
        values = list(self.schedule)
        if isinstance(values[0], float):
            return None
        return sorted({0, *(v for v in values if v < num_steps)})

    def apply(self, session) -> "DeepCacheInstalled":
        branches = {b.branch_id: b for b in session.adapter.skip_branches()}
        if self.skip_branch not in branches:
            raise ValueError(
                f"DeepCache skip branch {self.skip_branch} does not exist in this U-Net; valid branches are "
                f"{sorted(branches)} (block = skip_branch // 3, layer = skip_branch % 3)."
            )
        return DeepCacheInstalled(self, session)


def centred_steps(num_steps: int, count: int, center: float, power: float) -> list[int]:
    """``count`` distinct step indices in [0, num_steps), starting at 0, crowded around ``center``.

    Evenly spaced points x in [-c^(1/p), (n - c)^(1/p)) mapped to c + sign(x) |x|^p: the map is
    flat near x = 0, so indices bunch around c. Where rounding merges indices, p is lowered
    towards 1 (even spacing), as DeepCache's sampler does.
    """
    fraction(center, "centred_steps center")
    fraction(power, "centred_steps power", 1.0, MAX_POWER)  # bounds the loop below: at most 450 tries
    count = max(1, min(count, num_steps))
    c = center * num_steps
    p = float(power)
    while p > 1.0:
        lo, hi = -(c ** (1 / p)), (num_steps - c) ** (1 / p)
        points = (lo + (hi - lo) * i / count for i in range(count))
        steps = sorted({min(num_steps - 1, max(0, math.floor(c + math.copysign(abs(x) ** p, x) + 1e-9))) for x in points})
        if len(steps) == count and steps[0] == 0:
            return steps
        p -= 0.02
    return sorted({math.floor(i * num_steps / count) for i in range(count)})


class FullStepRule:
    """Which steps of one loop are full, decided step by step in order (the method and the planner
    share it): the listed steps, ``interval`` steps after the last full one (uniform), or the first step
    at or past each listed normalised time; step 0, and a step whose reuse would stretch the last full
    step's features over more than ``max_span`` of the trajectory, always."""

    def __init__(self, config: DeepCache, num_steps: int | None):
        self.config, self.num_steps = config, num_steps  # None: unknown, the loop so far counts
        timed = config.schedule != "uniform" and config.full_steps(num_steps or 1) is None
        self.pending = sorted(config.schedule, reverse=True) if timed else None
        self.last: tuple[int, float | None] | None = None  # (step, normalised time) of the last full step
        self.previous: float | None = None  # normalised time of the step before

    def full(self, step: int, t: float | None) -> bool:
        config = self.config
        if self.pending is not None:  # normalised times: None (no time known) counts as the start
            now = 1.0 if t is None else t
            full = any(tau >= now - 1e-6 for tau in self.pending)
            self.pending = [tau for tau in self.pending if tau < now - 1e-6]
        elif config.schedule != "uniform":
            full = step in config.full_steps(self.num_steps or step + 1)
        else:
            full = self.last is None or step - self.last[0] >= config.interval
        if self.last is not None and None not in (t, self.last[1], self.previous):
            full = full or (self.last[1] - t) + (self.previous - t) > config.max_span + 1e-6
        if full or self.last is None:
            self.last = (step, t)
        self.previous = t
        return full or step == 0


def cached_modules(unet, skip_branch: int) -> list[str]:
    """Paths (relative to the U-Net) of the outermost modules a cached step does not run.

    Mirrors DeepCache's rule with block B = skip_branch // 3 and layer L = skip_branch % 3: down
    blocks deeper than B, down block B's layers >= L (all of it when L = 0), the mid block, up
    blocks deeper than B and, in up block B, the layers whose reversed index is > L.
    """
    block, layer = divmod(skip_branch, 3)
    paths = []
    for i, down in enumerate(unet.down_blocks):
        if i > block or (i == block and layer == 0):
            paths.append(f"down_blocks.{i}")
        elif i == block:
            n = len(down.resnets)
            for j in range(layer, n):
                paths.append(f"down_blocks.{i}.resnets.{j}")
                if getattr(down, "attentions", None) is not None and j < len(down.attentions):
                    paths.append(f"down_blocks.{i}.attentions.{j}")
            if getattr(down, "downsamplers", None):  # layer index n >= layer always
                paths += [f"down_blocks.{i}.downsamplers.{k}" for k in range(len(down.downsamplers))]
    if unet.mid_block is not None:
        paths.append("mid_block")
    n_up = len(unet.up_blocks)
    for k, up in enumerate(unet.up_blocks):
        depth = n_up - 1 - k  # up blocks are numbered from the output side, as down blocks are
        if depth > block:
            paths.append(f"up_blocks.{k}")
        elif depth == block:
            n = len(up.resnets)
            for j in range(n):
                if n - 1 - j > layer:
                    paths.append(f"up_blocks.{k}.resnets.{j}")
                    if getattr(up, "attentions", None) is not None and j < len(up.attentions):
                        paths.append(f"up_blocks.{k}.attentions.{j}")
    return paths


def _time(ctx) -> float:
    return float(ctx.t_norm) if ctx.t_norm is not None else -float(ctx.step)


def _span(ctx, config: DeepCache) -> float:
    """The largest gap a forecast may bridge, in :func:`_time`'s units. Without normalised time (times
    are step indices) the gap's share of the trajectory is unknown: 1 keeps forecasting, less stops it."""
    if ctx.t_norm is not None:
        return config.forecast_span
    return math.inf if config.forecast_span >= 1.0 else 0.0


class DeepCacheInstalled(Installed):
    """Hooks on the cached modules plus a per-step decision: full step or not.

    The deep features are kept per CFG half (a half's cache never stands in for the other's): a
    call reuses them only if every half it runs stored its own at the last full step or later, so a
    half that skipped that step (CFG-Cache ran the conditional rows alone) computes in full.
    """

    def __init__(self, config: DeepCache, session):
        super().__init__(config, session)
        unet = session.adapter.denoiser
        self.paths = cached_modules(unet, config.skip_branch)
        self.reset_cache()
        for path in self.paths:
            hook_forward(self, unet.get_submodule(path), self._module_forward(path), HOOK_NAME)
        # Registered after the session's own pre-hook, so ctx.step / ctx.call_index are current here.
        handle = unet.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)
        self.on_remove(handle.remove)

    def reset_cache(self) -> None:
        self.mode: str | None = None  # this denoiser call: "store" / "reuse"; None until its first cached module
        self.cache: dict[tuple[int, str, str], object] = {}  # (call index, CFG half, module path) -> output rows
        self.history: dict[tuple[int, str, str], History] = {}  # the same keys -> last full outputs (forecast)
        self.stored: dict[tuple[int, str], tuple] = {}  # (call index, CFG half) -> (input signature, step stored)
        self.step_full: dict[int, bool] = {}  # step -> decision, so every call of a step agrees
        self.rule: FullStepRule | None = None

    def _module_forward(self, path: str):
        def forward(original, *args, **kwargs):
            ctx = self.session.ctx
            if not ctx.active:  # outside the call, or another thread: plain
                return original(*args, **kwargs)
            halves = cfg_half_rows(ctx, num_rows(args, kwargs))
            if self.mode is None:
                self._decide(ctx, halves, args, kwargs)
            config = self.call_config()
            keys = [(ctx.call_index, half, path) for half, _ in halves]
            if self.mode == "reuse":
                if config.forecast_order:
                    t, span = _time(ctx), _span(ctx, config)
                    return cat_rows([self.history[k].forecast(t, config.forecast_order, config.guard, span) for k in keys])
                return cat_rows([self.cache[k] for k in keys])
            out = original(*args, **kwargs)
            for key, (_, rows) in zip(keys, halves):
                part = out if len(halves) == 1 else tree_map(lambda x: x[rows], out)
                self.cache[key] = part
                if config.forecast_order:
                    self.history.setdefault(key, History(config.forecast_order + 1)).push(_time(ctx), part)
            return out

        return forward

    # ---- decisions -------------------------------------------------------------------
    def _is_full_step(self, ctx) -> bool:
        if ctx.step in self.step_full:
            return self.step_full[ctx.step]
        if self.rule is None:
            self.rule = FullStepRule(self.call_config(), int(ctx.num_steps or 0) or None)
        full = self.rule.full(ctx.step, ctx.t_norm)
        self.step_full[ctx.step] = full
        return full

    def _on_denoiser_call(self, module, args, kwargs):
        if self.session.ctx.active:
            self.session.ctx.full_step = self._is_full_step(self.session.ctx)  # CfgCache can follow it
            self.mode = None  # decided at the first cached module, which sees the rows that really run
        return None

    def _decide(self, ctx, halves, args, kwargs) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        signature = (tuple(x.shape[1:]), int(x.shape[0]) // len(halves), x.dtype, x.device)  # per half
        fresh = all(
            (kept := self.stored.get((ctx.call_index, half))) is not None
            and kept[0] == signature and kept[1] >= self.rule.last[0]  # stored at the last full step or later
            for half, _ in halves
        )
        if self.step_full[ctx.step] or not fresh:
            self.mode = "store"
            for half, _ in halves:
                self.stored[(ctx.call_index, half)] = (signature, ctx.step)
            self.count("computed")
        else:
            self.mode = "reuse"
            self.count("reused")
            share = len(halves) * ctx.cfg.row_share  # of a full call: 0.5 where CfgCache runs the conditional rows alone
            for path in self.paths:
                self.count_skipped(path, share)

    def stats(self) -> dict:
        out = dict(self.counters)
        out["skipped_modules"] = dict(out.get("skipped_modules", {}))
        out["full_steps"] = sorted(s for s, full in self.step_full.items() if full)
        if self.config.min_psnr is not None and self.config.name not in self.session.providers:
            out["why"] = (f"min_psnr={self.config.min_psnr:g} not planned (no profile with verified DeepCache runs): "
                          "the settings as given ran")
        return out

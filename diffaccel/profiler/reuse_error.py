"""Measured DeepCache error (the DeepCache planner's probe): what reusing k-step-old deep
features does to the denoiser output.

The change curves of the profile say how fast the deep features move, not how much that moves
the *output*: on a trained U-Net the deep features change most at the noisy start, where the
output barely depends on them. So during one ordinary generation every denoiser call is replayed,
right after it ran, with the deep modules (those a DeepCache step skips) returning their outputs
from 1..``max_age`` steps earlier, exactly as a DeepCache step would; the ages go through the
U-Net as one batch, so the replay costs about one shallow forward per step. Recorded per step
and age: the RMS of the change of the guided denoiser output (what the scheduler consumes).

The scheduler turns an output error at step s into a latent error of about
``sqrt(alpha_bar_{s+1}) |d sigma_s|`` times it (sigma = sqrt((1 - alpha_bar) / alpha_bar)),
so the profile also keeps sigma as a function of normalised time (:func:`sigma_curve`).
"""
from __future__ import annotations

import math

import torch

from diffaccel.methods.deepcache import cached_modules
from diffaccel.state import session_of


def _cat(outputs: list):
    """Concatenate module outputs (tensors, or tuples / lists of them) along the batch."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([o[i] for o in outputs]) for i in range(len(first)))
    return first


def _repeat(x, times: int, batch: int):
    """Repeat every batch-sized tensor in ``x`` ``times`` times along dim 0 (others unchanged)."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x] * times) if x.ndim and x.shape[0] == batch else x
    if isinstance(x, dict):
        return {k: _repeat(v, times, batch) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_repeat(v, times, batch) for v in x)
    return x


def _sample(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


class ReuseProbe:
    """Hooks on a U-Net that measure error[step][age - 1] during a normal pipeline call.

    One denoiser call per step is assumed (U-Net pipelines batch the CFG halves).
    """

    def __init__(self, pipe, skip_branch: int, max_age: int):
        self.pipe, self.unet, self.max_age = pipe, pipe.unet, max_age
        self.paths = cached_modules(self.unet, skip_branch)
        self.mode, self.replay, self.current = "record", {}, {}
        self.kept: dict[int, dict] = {}  # step -> deep outputs of that step's full call
        self.errors: list[list] = []  # [step][age - 1]
        self.output_rms: list[float] = []  # RMS of the guided output per step (for relative numbers)
        self.calls, self.busy, self.handles, self.restore = 0, False, [], []

    def __enter__(self):
        for path in self.paths:  # forward replaced (not a forward hook): a replay must not compute them
            module = self.unet.get_submodule(path)
            self.restore.append((module, vars(module).get("forward")))
            module.forward = self._module_forward(path, module.forward)
        self.handles.append(self.unet.register_forward_hook(self._after_call, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for module, own in self.restore:
            if own is None:
                del module.forward
            else:
                module.forward = own
        self.kept.clear()

    def _module_forward(self, path: str, original):
        def forward(*args, **kwargs):
            if self.mode == "replay":
                return self.replay[path]  # what a DeepCache step would hand on
            out = original(*args, **kwargs)
            self.current[path] = out
            return out

        return forward

    def _guided(self, out: torch.Tensor) -> torch.Tensor:
        """The output the scheduler sees: CFG halves combined when the call batches them."""
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if cfg and out.shape[0] % 2 == 0:
            uncond, cond = out.float().chunk(2)
            return uncond + float(self.pipe.guidance_scale) * (cond - uncond)
        return out.float()

    def _after_call(self, module, args, kwargs, output):
        if self.busy:
            return None
        step = self.calls
        self.calls += 1
        self.kept[step] = self.current
        self.current = {}
        full = self._guided(_sample(output))
        ages = [a for a in range(1, self.max_age + 1) if step - a in self.kept]
        row: list = [None] * self.max_age  # None: the age reaches back before step 0
        if ages:
            sample = args[0] if args else kwargs["sample"]
            batch = sample.shape[0]
            self.replay = {p: _cat([self.kept[step - a][p] for a in ages]) for p in self.paths}
            # Inside a recorded call (the profiler's instrumentation), the replay must be invisible
            # to the session: it is no step of the pipeline and changes no statistics.
            session = session_of(self.pipe)
            was_active = session.ctx.active if session is not None else None
            self.mode, self.busy = "replay", True
            try:
                if session is not None:
                    session.ctx.active = False
                with torch.no_grad():  # .forward: the U-Net's own hooks (call counters) must not see it
                    out = _sample(module.forward(*_repeat(args, len(ages), batch), **_repeat(kwargs, len(ages), batch)))
            finally:
                self.mode, self.busy, self.replay = "record", False, {}
                if session is not None:
                    session.ctx.active = was_active
            for a, chunk in zip(ages, out.chunk(len(ages))):
                row[a - 1] = float((self._guided(chunk) - full).pow(2).mean().sqrt())
        self.errors.append(row)
        self.output_rms.append(float(full.pow(2).mean().sqrt()))
        self.kept.pop(step - self.max_age, None)
        return None


def aggregate_reuse(runs: list[list[list[float]]]) -> dict:
    """Mean and spread over prompts of error[step][age - 1] (None where no prompt has a value)."""
    mean, std = [], []
    for s in range(len(runs[0])):
        mean_row, std_row = [], []
        for a in range(len(runs[0][s])):
            vals = [r[s][a] for r in runs if r[s][a] is not None and not math.isnan(r[s][a])]
            m = sum(vals) / len(vals) if vals else None
            mean_row.append(m)
            std_row.append(None if m is None else (sum((v - m) ** 2 for v in vals) / len(vals)) ** 0.5)
        mean.append(mean_row)
        std.append(std_row)
    return {"mean": mean, "std": std}


def sigma_curve(scheduler, points: int = 101) -> list[list[float]] | None:
    """[[t_norm, sigma], ...] from the scheduler's alpha_bar (None for schedulers without one)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return None
    alphas = alphas.double()
    n = len(alphas)
    out = []
    for i in range(points):
        index = min(n - 1, round(i * (n - 1) / (points - 1)))
        a = float(alphas[index])
        out.append([index / n, math.sqrt(max(1.0 - a, 0.0) / max(a, 1e-12))])
    return out


# ---- whole steps (StepCache) ---------------------------------------------------------------------
def step_skip_errors(pipe, adapter, prompts: list, seeds: list[int], call_kwargs: dict, max_gap: int = 4,
                     orders: tuple[int, ...] = (0, 1), progress: bool = False, per_prompt: bool = False) -> dict:
    """Measured error of every edge of the step graph (LeMiCa's view), for StepCache's planner.

    Edge (i, j): steps i and j compute, the ``j - i - 1`` steps between are skipped (j = n: every
    step after i), every other step computes. Each edge is run as a real generation per prompt,
    so the number is the whole effect of those skips on the output, scheduler and compounding
    included; recorded is the mean over prompts of the output's mean squared error against the
    unaccelerated output of the same seed (pixels in [0, 1] where the pipeline decodes them).
    A schedule's error is predicted as the sum of its edges' errors (errors of distant skips add
    like independent noise; checked against real runs in tests/test_plan_step_cache.py).
    ``per_prompt`` adds ``"per_prompt"``: {order: [[MSE of each prompt] per edge, in ``edges``' order]}.
    """
    from diffaccel.methods.step_cache import StepCache
    from diffaccel.state import attach, detach, session_of

    if session_of(pipe) is not None:
        raise ValueError("step_skip_errors needs a pipeline without diffaccel: call diffaccel.disable(pipe) first.")
    kwargs = {**call_kwargs, "output_type": "np"}
    denoiser = adapter.denoiser
    own = vars(denoiser).get("forward")
    original, recorded, replay = denoiser.forward, [], {"upto": 0, "calls": 0}

    def forward(*args, **kw):
        # Up to the branching point an edge's run equals the reference one: hand back its outputs.
        k = replay["calls"]
        replay["calls"] += 1
        if k < replay["upto"]:
            return recorded[k]
        out = original(*args, **kw)
        if replay["upto"] < 0:
            recorded.append(out)
        return out

    def output(prompt, seed, upto=0, record=False):
        replay.update(upto=-1 if record else upto, calls=0)
        return _pixels(pipe, prompt, kwargs, seed)

    bar = None
    denoiser.forward = forward
    try:
        prepared = []
        for p, s in zip(prompts, seeds):
            ref = output(p, s, record=True)
            prepared.append((p, s, ref, list(recorded)))
            recorded.clear()
        times = [adapter.normalised_time(float(t)) for t in pipe.scheduler.timesteps]
        n = len(times)
        edges = [(i, j) for i in range(n - 1) for j in range(i + 2, min(n, i + max_gap + 1) + 1)]
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(edges) * len(orders), desc="step graph", unit="edge")
        table, each = {}, {}
        for order in orders:
            rows, each[str(order)] = [], []
            for i, j in edges:
                mask = tuple(not (i < s < j) for s in range(n))
                attach(pipe, adapter, [StepCache(mask=mask, forecast_order=order, final_steps=0)])
                errs = []
                for p, s, ref, calls in prepared:
                    recorded[:] = calls
                    # Steps before i - 1 replay; i - 1 and i run, so the cache holds their residuals.
                    upto = max(0, i - 1) * len(calls) // n
                    errs.append(float((output(p, s, upto) - ref).pow(2).mean()))
                detach(pipe)
                rows.append([i, j, sum(errs) / len(errs)])
                each[str(order)].append(errs)
                if bar is not None:
                    bar.update(1)
            table[str(order)] = rows
    finally:
        if bar is not None:
            bar.close()
        detach(pipe)
        if own is None:
            del denoiser.forward
        else:
            denoiser.forward = own
    out = {"times": times, "max_gap": max_gap, "edges": table, "prompts": len(prompts),
           "statistic": "edge (i, j): mean over prompts of the output MSE with steps i+1..j-1 skipped"}
    return {**out, "per_prompt": each} if per_prompt else out


def skip_fragility(pipe, adapter, prompts: list, seeds: list[int], call_kwargs: dict, progress: bool = False) -> list[float]:
    """Per (prompt, seed): the lowest PSNR (dB) of its output with one step skipped (repeating the last
    residual), over every step but the first. Most seeds stay near 50-60 dB under any single skip; a rare
    one whose layout is decided in the first steps turns into another image (14.5-17.5 dB on tiny-dit: 2 of
    256 training seeds besides 2 chaotic ones, 1-8 in held-out sets of 64-128), and one such seed alone breaks a pooled-PSNR promise on
    any seed set that holds it: :meth:`~diffaccel.profiler.verify_step_cache.SeedSet.stress`
    validates schedules on the most fragile seeds of a screened pool. Costs about n / 2 generations per
    seed (each skip replays the reference up to the step before it)."""
    table = step_skip_errors(pipe, adapter, prompts, seeds, call_kwargs, max_gap=1, orders=(0,), progress=progress,
                             per_prompt=True)
    worst = [max(errs[k] for errs in table["per_prompt"]["0"]) for k in range(len(prompts))]
    return [-10 * math.log10(max(mse, 1e-30)) for mse in worst]


def verify_step_schedules(pipe, adapter, prompts: list, seeds: list[int], call_kwargs: dict, configs: list,
                          progress: bool = False) -> list[dict]:
    """Run StepCache ``configs`` (explicit masks) on ``prompts`` / ``seeds``: :func:`run_configs`'
    PSNRs of each, with its mask and forecast orders, for the planner's verified schedules."""
    runs = run_configs(pipe, adapter, prompts, seeds, call_kwargs, configs, progress=progress)
    for run, config in zip(runs, configs):
        del run["methods"]
        run.update(mask=[int(c) for c in config.mask], orders=list(config.forecast_orders or [0] * len(config.mask)))
    return runs


def run_configs(pipe, adapter, prompts: list, seeds: list[int], call_kwargs: dict, configs: list,
                progress: bool = False, desc: str = "verifying schedules") -> list[dict]:
    """Run each method config (or list of configs installed together) on ``prompts`` / ``seeds``: PSNR
    (dB, pixels in [0, 1]) against the unaccelerated output, and ``methods``: each method's stats of the
    last call (whether it acted). ``psnr`` is the pooled one (of the mean MSE over the seeds), the statistic
    eval/evaluate.py checks the presets' promises with: it is dominated by the worst seeds, where a
    mean of per-seed PSNRs (``psnr_mean``) hides them."""
    from diffaccel.state import attach, detach

    kwargs = {**call_kwargs, "output_type": "np"}

    def output(prompt, seed):
        return _pixels(pipe, prompt, kwargs, seed)

    refs = [output(p, s) for p, s in zip(prompts, seeds)]
    runs = []
    if progress:
        from tqdm.auto import tqdm

        configs = tqdm(configs, desc=desc, unit="schedule")
    try:
        for config in configs:
            session = attach(pipe, adapter, list(config) if isinstance(config, (list, tuple)) else [config])
            mses = [max(float((output(p, s) - ref).pow(2).mean()), 1e-30) for p, s, ref in zip(prompts, seeds, refs)]
            methods = session.stats()["methods"]
            detach(pipe)
            psnrs = [-10 * math.log10(m) for m in mses]
            runs.append({"psnr": -10 * math.log10(sum(mses) / len(mses)), "psnr_mean": sum(psnrs) / len(psnrs),
                         "psnr_worst": min(psnrs), "methods": methods})
    finally:
        detach(pipe)
    return runs


def noise_sensitivity(pipe, prompts: list, seeds: list[int], call_kwargs: dict, eps: float = 1e-4) -> list[float]:
    """Per (prompt, seed): PSNR (dB) of the unaccelerated output against itself with the initial noise
    perturbed by ``eps`` (Gaussian, relative to the noise's scale, drawn from seed + 1). Ordinary seeds stay
    far above 60 dB; a seed near a bifurcation of the sampler (the output flips under any perturbation,
    an accelerated one included) falls to ~30 dB. Such a seed says nothing about a method but sets a pooled
    PSNR on its own, so schedule selection leaves it out (and says so). Pipelines without
    ``prepare_latents`` give inf for every seed (none is left out)."""
    if not callable(getattr(pipe, "prepare_latents", None)):  # DiTPipeline draws its noise inline: not measurable
        return [math.inf] * len(seeds)
    kwargs = {**call_kwargs, "output_type": "np"}
    own = pipe.__dict__.get("prepare_latents")
    original = pipe.prepare_latents
    noise = {"gen": None}

    def perturbed(*args, **kw):
        out = original(*args, **kw)
        if noise["gen"] is None:
            return out
        # Some pipelines return more than the latents (Flux: (latents, latent image ids)).
        latents = out[0] if isinstance(out, tuple) else out
        delta = torch.randn(latents.shape, generator=noise["gen"], dtype=torch.float32).to(latents)
        latents = latents + eps * latents.float().std().to(latents) * delta
        return (latents, *out[1:]) if isinstance(out, tuple) else latents

    def output(prompt, seed, shift):
        noise["gen"] = torch.Generator().manual_seed(seed + 1) if shift else None
        return _pixels(pipe, prompt, kwargs, seed)

    pipe.prepare_latents = perturbed
    try:
        out = []
        for p, s in zip(prompts, seeds):
            mse = float((output(p, s, True) - output(p, s, False)).pow(2).mean())
            out.append(-10 * math.log10(max(mse, 1e-30)))
        return out
    finally:
        if own is None:
            del pipe.prepare_latents
        else:
            pipe.prepare_latents = own


def _pixels(pipe, prompt, kwargs: dict, seed: int) -> torch.Tensor:
    """One seeded generation (``kwargs`` asking for numpy output) as a float64 tensor of images or frames."""
    from diffaccel.profiler.costs import generate

    out = generate(pipe, prompt, kwargs, seed)
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images).double()

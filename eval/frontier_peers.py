"""The peers of the frontier suite (eval/frontier.py), each installed through its own public API.

A peer spec is ``NAME:key=value,...`` (values are Python literals):

| NAME | what | keys (default) |
| --- | --- | --- |
| ``diffusers.fbc`` | diffusers FirstBlockCache | threshold (0.05) |
| ``diffusers.mag`` | diffusers MagCache, ratios calibrated on training captions | threshold (0.06), max_skip_steps (3), retention_ratio (0.2) |
| ``diffusers.taylorseer`` | diffusers TaylorSeerCache on the blocks' attn1 / attn2 / feed-forward | cache_interval (5), warmup (3), order (1), lite (False), identifiers ("explicit" or "default") |
| ``diffusers.seacache`` | diffusers SeaCache | threshold (0.25), order (1), max_consecutive (2) |
| ``diffusers.fastercache`` | diffusers FasterCache | spatial (2), uncond (5) |
| ``diffusers.pab`` | diffusers Pyramid Attention Broadcast | spatial (2), cross (None: off) |
| ``cachedit.dbcache`` | cache-dit DBCache | threshold (0.08), fn (1), bn (0), warmup (2), max_cached (-1), taylorseer (0: off, else its order) |
| ``DeepCache`` | the DeepCache library's DeepCacheSDHelper (U-Net) | interval (3), branch (0) |
| ``tomesd`` | tomesd.apply_patch (U-Net) | ratio (0.5), max_downsample (2) |

Every install returns how many modules the peer hooked, patched or replaced — the first proof
that it acts on the model (the second is the FLOPs the suite counts: a peer that hooks nothing
saves nothing and reproduces the baseline).
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
from pathlib import Path

PEERS = ("diffusers.fbc", "diffusers.mag", "diffusers.taylorseer", "diffusers.seacache", "diffusers.fastercache",
         "diffusers.pab", "cachedit.dbcache", "DeepCache", "tomesd")

# TaylorSeer's default identifiers (``^blocks.*attn`` matched whole) hook nothing on PixArt / Wan,
# whose attention modules are named attn1 / attn2: name the block children explicitly.
TAYLORSEER_IDENTIFIERS = [r"(transformer_blocks|blocks)\.\d+\.(attn1|attn2|ff|ffn)"]


def is_peer(spec: str) -> bool:
    return spec.split(":", 1)[0] in PEERS


def parse_peer(spec: str) -> tuple[str, dict]:
    name, _, params = spec.partition(":")
    if name not in PEERS:
        raise ValueError(f"Unknown peer {name!r} in {spec!r}; peers: {', '.join(PEERS)}.")
    kwargs = {}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"Peer parameter {item!r} in {spec!r} needs the form key=value.")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name, kwargs


def denoiser_of(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


def module_marks(module) -> dict:
    """What a method can change on each module: its diffusers hooks, an instance-level forward
    (DeepCache, cache-dit, ours), its class (tomesd, cache-dit), its torch hooks."""
    marks = {}
    for name, m in module.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        hooks = tuple(getattr(registry, "hooks", {}) or ()) if registry is not None else ()
        marks[name] = (hooks, id(vars(m).get("forward")), type(m).__qualname__, type(m).__module__,
                       tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
    return marks


def hooked_modules(module, before: dict) -> int:
    """Modules whose marks differ from ``before`` (taken on the bare model)."""
    after = module_marks(module)
    return sum(1 for name, mark in after.items() if before.get(name) != mark)


def _pixart_latents(module, args, kwargs):
    """SeaCache's generic path wants each sample's visual latents as (C, T, H, W): an image is T = 1."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return [h.unsqueeze(1) for h in hidden.unbind(0)] if hidden is not None and hidden.ndim == 4 else None


class _TimestepProbe:
    """diffusers' PAB / FasterCache ask for the current timestep; the bundled pipelines do not expose it."""

    def __init__(self, module):
        import torch

        self.t = 1000.0
        self._torch = torch
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        t = kwargs.get("timestep")
        if isinstance(t, self._torch.Tensor):
            self.t = float(t.reshape(-1)[0])


class PeerInstaller:
    """Puts one peer on ``pipe`` (removing the last); ``call_context()`` wraps each pipeline call."""

    def __init__(self, pipe, model: str, call_kwargs: dict, calibration_prompts: list[str], cache_dir: Path):
        self.pipe, self.model, self.call_kwargs = pipe, model, dict(call_kwargs)
        self.steps = call_kwargs["num_inference_steps"]
        self.calibration_prompts, self.cache_dir = calibration_prompts, cache_dir
        self.denoiser = denoiser_of(pipe)
        self.kind = None  # what is installed: "diffusers", "cachedit", "deepcache", "tomesd"
        self._undo = None
        self._probe = None
        self._mag = None

    # -- diffusers hooks -------------------------------------------------------------------
    def _cache_mixin(self):
        from diffusers.models.cache_utils import CacheMixin

        if not isinstance(self.denoiser, CacheMixin):  # PixArt's transformer lacks the mixin diffusers' hooks need
            self.denoiser.__class__ = type(type(self.denoiser).__name__, (type(self.denoiser), CacheMixin), {})
            self.denoiser._cache_config = None
        if self._probe is None:
            self._probe = _TimestepProbe(self.denoiser)

    @contextlib.contextmanager
    def call_context(self):
        """PixArt's pipeline opens no cache context (batched CFG, one denoiser call per step): open
        one per denoiser call by hand, with the step metadata Wan's pipeline passes (SeaCache needs
        it; sigma is t / 1000, the normalised time)."""
        if self.kind != "diffusers" or not type(self.pipe).__name__.startswith("PixArt"):
            yield
            return
        stack, step = contextlib.ExitStack(), [0]

        def pre(module, args, kwargs):
            t = kwargs.get("timestep")
            t = float(t.reshape(-1)[0]) if t is not None else 1000.0
            stack.enter_context(module.cache_context("cond", step_index=step[0], sigma=t / 1000.0,
                                                     num_inference_steps=self.steps))
            step[0] += 1

        def post(module, args, output):
            stack.close()

        handles = [self.denoiser.register_forward_pre_hook(pre, with_kwargs=True),
                   self.denoiser.register_forward_hook(post, always_call=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            stack.close()

    def mag_ratios(self) -> list[float]:
        """MagCache's per-step ratios from its calibration mode (the documented way): calibrated on
        training captions with seeds no evaluation uses, averaged over captions and CFG contexts."""
        import diffusers
        import torch
        from diffusers import MagCacheConfig

        if self._mag is not None:
            return self._mag
        path = self.cache_dir / f"mag_ratios-diffusers{diffusers.__version__}-{self.steps}steps.json"
        if path.is_file():
            self._mag = json.loads(path.read_text())
            return self._mag
        self._cache_mixin()
        lists = []
        for i, prompt in enumerate(self.calibration_prompts):
            self.denoiser.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=self.steps))
            self.kind = "diffusers"
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf), torch.no_grad(), self.call_context():
                    self.pipe(prompt, generator=torch.Generator().manual_seed(3000 + i), output_type="np",
                              **self.call_kwargs)
            finally:
                self.denoiser.disable_cache()
                self.kind = None
            lists += [json.loads(ln) for ln in buf.getvalue().splitlines() if ln.strip().startswith("[1")]
        if not lists:
            raise RuntimeError("MagCache calibration printed no ratios.")
        self._mag = [sum(col) / len(col) for col in zip(*lists)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self._mag))
        return self._mag

    def _diffusers_config(self, name: str, kw: dict):
        import torch
        from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                               PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

        now = lambda: self._probe.t  # noqa: E731
        video = self.model == "tiny-video"
        if name == "diffusers.fbc":
            return FirstBlockCacheConfig(threshold=kw.get("threshold", 0.05))
        if name == "diffusers.mag":
            return MagCacheConfig(threshold=kw.get("threshold", 0.06), max_skip_steps=kw.get("max_skip_steps", 3),
                                  retention_ratio=kw.get("retention_ratio", 0.2), num_inference_steps=self.steps,
                                  mag_ratios=self.mag_ratios())
        if name == "diffusers.taylorseer":
            ids = None if kw.get("identifiers", "explicit") == "default" else TAYLORSEER_IDENTIFIERS
            return TaylorSeerCacheConfig(cache_interval=kw.get("cache_interval", 5),
                                         disable_cache_before_step=kw.get("warmup", 3), max_order=kw.get("order", 1),
                                         taylor_factors_dtype=torch.float32, cache_identifiers=ids,
                                         use_lite_mode=bool(kw.get("lite", False)))
        if name == "diffusers.seacache":
            from diffusers import SeaCacheConfig

            video_cb = None if video else _pixart_latents  # Wan has a built-in adapter; PixArt gets the generic path
            return SeaCacheConfig(threshold=kw.get("threshold", 0.25), residual_order=kw.get("order", 1),
                                  max_consecutive_cached=kw.get("max_consecutive", 2), raw_vision_callback=video_cb)
        if name == "diffusers.fastercache":  # Wan calls cond / uncond separately: CFG skipping needs batched CFG
            return FasterCacheConfig(
                spatial_attention_block_skip_range=kw.get("spatial", 2), spatial_attention_timestep_skip_range=(-1, 700),
                current_timestep_callback=now, attention_weight_callback=lambda _: 0.5,
                tensor_format="BFCHW" if video else "BCHW", unconditional_batch_skip_range=kw.get("uncond", 5),
                unconditional_batch_timestep_skip_range=(-1, 650), is_guidance_distilled=video)
        cross = kw.get("cross")
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=kw.get("spatial", 2), spatial_attention_timestep_skip_range=(100, 800),
            cross_attention_block_skip_range=cross, cross_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=now)

    # -- install / clear ---------------------------------------------------------------------
    def install(self, spec: str) -> int:
        """Install the peer; return the number of modules it hooked (ValueError/RuntimeError if it cannot)."""
        name, kw = parse_peer(spec)
        self.clear()
        before = module_marks(self.denoiser)
        if name.startswith("diffusers."):
            if not hasattr(self.pipe, "transformer"):
                raise ValueError("diffusers' cache hooks serve transformer denoisers (blocks of a DiT), not a U-Net")
            self._cache_mixin()
            config = self._diffusers_config(name, kw)
            self.denoiser.enable_cache(config)
            self.kind, self._undo = "diffusers", self.denoiser.disable_cache
        elif name == "cachedit.dbcache":
            self._install_cache_dit(kw)
        elif name == "DeepCache":
            if not hasattr(self.pipe, "unet"):
                raise ValueError("the DeepCache library caches U-Net skip branches; this model has no U-Net")
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=self.pipe)
            helper.set_params(cache_interval=kw.get("interval", 3), cache_branch_id=kw.get("branch", 0))
            helper.enable()
            self.kind, self._undo = "deepcache", helper.disable
        else:
            if not hasattr(self.pipe, "unet"):
                raise ValueError("tomesd patches Stable Diffusion U-Net transformer blocks; this model has no U-Net")
            import tomesd

            tomesd.apply_patch(self.pipe, ratio=kw.get("ratio", 0.5), max_downsample=kw.get("max_downsample", 2))
            self.kind, self._undo = "tomesd", lambda: tomesd.remove_patch(self.pipe)
        return hooked_modules(self.denoiser, before)

    def _install_cache_dit(self, kw: dict):
        if not hasattr(self.pipe, "transformer"):
            raise ValueError("cache-dit caches DiT transformer blocks; it has no U-Net adapter")
        import cache_dit

        # Its defaults (Fn_compute_blocks=8, max_warmup_steps=8) cache nothing on the 6-block, 20-step
        # bundled models: 8 head blocks leave none to cache. Set like ours: first block, 2 warm-up steps.
        config = cache_dit.DBCacheConfig(
            residual_diff_threshold=kw.get("threshold", 0.08), Fn_compute_blocks=kw.get("fn", 1),
            Bn_compute_blocks=kw.get("bn", 0), max_warmup_steps=kw.get("warmup", 2),
            max_continuous_cached_steps=kw.get("max_cached", -1))
        order = kw.get("taylorseer", 0)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.enable_cache(self.pipe, cache_config=config, calibrator_config=calibrator)
        self.kind = "cachedit"
        self._undo = lambda: cache_dit.disable_cache(self.pipe)

    def clear(self):
        if self._undo is not None:
            undo, self._undo, self.kind = self._undo, None, None
            with contextlib.redirect_stdout(io.StringIO()):
                undo()

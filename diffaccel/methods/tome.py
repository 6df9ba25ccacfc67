"""Token Merging (ToMe for SD): attend over fewer, merged tokens in the large-resolution blocks.

In each transformer block whose grid is downsampled at most ``max_downsample`` times, the image
tokens are split into destinations (one per ``sx`` x ``sy`` cell) and sources (the rest); the
``ratio * N`` sources most similar (cosine, on the block input) to some destination are averaged
into it. The self-attention (optionally also the cross-attention and MLP) then runs on the
merged set and its output is copied back to every merged token ("unmerge"). With
``mode="kv"`` only keys and values are merged: every query is kept and nothing is unmerged
(ToDo / AsymRnR).

Unlike tomesd 0.1.3, no diffusers block is copied: only the block's attention / MLP modules
are wrapped through diffusers' HookRegistry. Merge is one row gather plus an accumulating
``index_put_``, unmerge a single row gather. The random destination choice comes from a
generator seeded by (seed, step, block), so the same seed gives the same image on every call
and every batch item gets the same choice whatever the batch size. With ``use_rand=False`` the
output matches ``tomesd.apply_patch(use_rand=False)`` at every ratio. The opt-in ``gate`` skips
merging in blocks too small for it to pay (a token-count rule per device type, never a timing:
the output depends only on the inputs, the seed and the config).

Example::

    import diffaccel
    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.ToMe(ratio=0.5)])
    image = pipe("a red circle").images[0]
    print(diffaccel.stats(pipe)["methods"]["tome"])  # merged / gated blocks, gate decisions
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffaccel.families import Capability
from diffaccel.methods.attention_intercept import count_module_backend
from diffaccel.methods.base import Installed, Method, hook_forward, register
from diffaccel.validate import boolean, fraction, integer, one_of, positive_int

HOOK_NAME = "diffaccel_tome"
MODES = ("qkv", "kv")
# Smallest token count of a block where merging pays, per device type (the gate's rule). Measured:
# on CPU (fp32, SD1.5) ToMe r=0.5 is 0.99-1.04x at 256 px (1024 tokens) and 1.09-1.21x at 512 px
# (4096 tokens), eval/results/bench_unet.md; with CUDA SDPA peers report ~1.0x at 4096 tokens and
# 1.22x at 16384 (tomesd's README). A fixed rule, not a timing: timings differ between runs,
# machines and loads, and an output must not.
GATE_MIN_TOKENS = {"cpu": 4096, "cuda": 16384}
GATE_MIN_TOKENS_OTHER = 16384


@register
@dataclass(frozen=True)
class ToMe(Method):
    """Token merging for the U-Net's and image DiTs' transformer blocks (Bolya & Hoffman, 2023).

    Args:
        ratio: share of a block's tokens merged away, at most 1 - 1/(sx*sy) (0.75 for 2x2).
        max_downsample: merge only in blocks whose grid is downsampled at most this much (1 =
            the full-resolution blocks, where attention costs most). None: the model's
            largest-grid transformer blocks, whatever their level (SDXL has none at level 1).
        sx, sy: destination stride: one destination token per sx x sy cell.
        use_rand: pick each cell's destination at random (reproducibly) instead of top-left.
        merge_attn / merge_crossattn / merge_mlp: which sub-layers run on merged tokens
            (mode "qkv" only; tomesd's defaults).
        mode: ``"qkv"`` merge the self-attention's input and unmerge its output (tomesd);
            ``"kv"`` keep every query and merge only keys/values, with no unmerge.
        gate: skip merging in blocks with fewer tokens than ``gate_min_tokens`` (where merging
            costs about as much as it saves). ``False`` (default) merges every chosen block, as
            tomesd does. The decision depends only on the block's token count and the device
            type, never on timings; ``stats`` lists it per block shape.
        gate_min_tokens: the gate's threshold; None takes the measured default for the device
            type (``GATE_MIN_TOKENS``: 4096 on CPU, 16384 on CUDA). Set it from your own
            measurement (e.g. ``eval/bench.py --suite unet``) to calibrate the gate explicitly.
        seed: base seed of the destination choice.
    """

    name: ClassVar[str] = "tome"
    requires: ClassVar[Capability] = Capability.TOKEN_MERGING
    context_parallel: ClassVar[str] = "none"

    ratio: float = 0.5
    max_downsample: int | None = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    mode: str = "qkv"
    gate: bool = False
    gate_min_tokens: int | None = None
    seed: int = 0

    def validate(self) -> None:
        positive_int(self.sx, "ToMe sx")
        positive_int(self.sy, "ToMe sy")
        if self.max_downsample is not None:
            positive_int(self.max_downsample, "ToMe max_downsample", "1 merges only the full-resolution blocks.")
        top = 1.0 - 1.0 / (self.sx * self.sy)
        try:
            fraction(self.ratio, "ToMe ratio", 0.0, top)
        except ValueError:
            raise ValueError(f"ToMe ratio must be a number in [0, {top:g}] (at most 1 - 1/(sx*sy): every "
                             f"{self.sx}x{self.sy} cell keeps one token), got {self.ratio!r}. 0.5 is the usual choice.") from None
        one_of(self.mode, MODES, "ToMe mode")
        for flag in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            boolean(getattr(self, flag), f"ToMe {flag}")
        integer(self.seed, "ToMe seed", "Any integer picks a reproducible set of destinations.")
        if self.mode == "kv" and (self.merge_crossattn or self.merge_mlp or not self.merge_attn):
            raise ValueError("ToMe mode='kv' merges only the self-attention's keys/values: leave merge_attn=True "
                             "and merge_crossattn / merge_mlp False, or use mode='qkv'.")
        if not isinstance(self.gate, bool):
            raise ValueError(f"ToMe gate must be True or False, got {self.gate!r}; set gate_min_tokens for the threshold.")
        if self.gate_min_tokens is not None:
            positive_int(self.gate_min_tokens, "ToMe gate_min_tokens", "It is the smallest block token count that merges.")
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("ToMe with merge_attn, merge_crossattn and merge_mlp all False merges nothing; enable one.")

    def apply(self, session) -> "ToMeInstalled":
        adapter = session.adapter
        blocks = adapter.transformer_blocks()
        if not blocks:
            raise ValueError(
                f"ToMe needs transformer blocks with self-attention over the image, and this "
                f"{type(adapter.denoiser).__name__} has none. Use a caching method (e.g. diffaccel.DeepCache) instead."
            )
        limit = min(b[2] for b in blocks) if self.max_downsample is None else self.max_downsample
        chosen = [b for b in blocks if b[2] <= limit]
        if not chosen:
            levels = sorted({b[2] for b in blocks})
            raise ValueError(f"ToMe max_downsample={self.max_downsample} selects no transformer block: this model's "
                             f"blocks are downsampled {levels}. Set max_downsample to at least {levels[0]}.")
        return ToMeInstalled(self, session, chosen)


def split_tokens(h: int, w: int, sx: int, sy: int, offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, source) token indices of an h x w grid, each in raster order.

    One destination per whole sx x sy cell, at ``offsets`` (cell-wise index in [0, sx*sy), row
    major within the cell) or top-left; rows/columns left over at the edges are all sources.
    """
    hs, ws = h // sy, w // sx
    rows = torch.arange(hs).view(-1, 1) * sy
    cols = torch.arange(ws).view(1, -1) * sx
    if offsets is not None:
        rows, cols = rows + offsets // sx, cols + offsets % sx
    is_dst = torch.zeros(h, w, dtype=torch.bool)
    is_dst[rows.expand(hs, ws), cols.expand(hs, ws)] = True
    is_dst = is_dst.flatten()
    return is_dst.nonzero().flatten(), (~is_dst).nonzero().flatten()


class TokenMerge:
    """Bipartite soft matching on ``metric`` (B, N, C): merge / unmerge as row gathers.

    The merged sequence is [kept sources (most to least similar order), destinations]; a merged
    destination is the mean of itself and the sources matched to it.
    """

    def __init__(self, metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, r: int):
        B, N, _ = metric.shape
        dev = metric.device
        dst, src = dst.to(dev), src.to(dev)
        self.B, self.N = B, N
        r = min(r, src.numel())
        with torch.no_grad():
            unit = metric / metric.norm(dim=-1, keepdim=True)
            scores = unit.index_select(1, src) @ unit.index_select(1, dst).transpose(-1, -2)  # (B, S, D)
            best, match = scores.max(dim=-1)
            order = best.argsort(dim=-1, descending=True)
            merged, kept = order[:, :r], order[:, r:]
            target = match.gather(1, merged)  # destination slot of each merged source, (B, r)
            U, D = kept.shape[1], dst.numel()
            self.M = U + D
            batch_n = torch.arange(B, device=dev).view(-1, 1) * N
            batch_m = torch.arange(B, device=dev).view(-1, 1) * self.M
            self.keep_rows = (torch.cat([src[kept], dst.expand(B, D)], 1) + batch_n).flatten()
            self.src_rows = (src[merged] + batch_n).flatten()
            self.into_rows = (U + target + batch_m).flatten()
            counts = torch.ones(B, D, device=dev).scatter_add_(1, target, torch.ones_like(target, dtype=torch.float))
            self.counts = counts.unsqueeze(-1)
            # Where each original token's value sits in the merged sequence.
            where = torch.empty(B, N, dtype=torch.long, device=dev)
            where.scatter_(1, src[kept], torch.arange(U, device=dev).expand(B, U))
            where[:, dst] = torch.arange(U, U + D, device=dev)
            where.scatter_(1, src[merged], U + target)
            self.unmerge_rows = (where + batch_m).flatten()
            self.U = U

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(self.B * self.N, x.shape[-1])
        out = flat.index_select(0, self.keep_rows)
        # index_put_(accumulate) rather than index_add_/scatter_add_: several times faster on CPU.
        out.index_put_((self.into_rows,), flat.index_select(0, self.src_rows), accumulate=True)
        out = out.view(self.B, self.M, -1)
        out[:, self.U:] /= self.counts.to(out.dtype)
        return out

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(self.B * self.M, y.shape[-1]).index_select(0, self.unmerge_rows).view(self.B, self.N, -1)


def _first(args, kwargs, name):
    return (args[0], args[1:], kwargs) if args else (kwargs[name], args, {k: v for k, v in kwargs.items() if k != name})


def _unmerge_output(plan: TokenMerge, out):
    if isinstance(out, torch.Tensor):
        return plan.unmerge(out)
    return type(out)(plan.unmerge(o) if isinstance(o, torch.Tensor) and o.dim() == 3 and o.shape[1] == plan.M else o for o in out)


def _attention_flops(attn, batch: int, n_q: int, n_kv: int) -> float:
    """Matmul FLOPs of one diffusers Attention call (projections + scores + weighted sum)."""
    inner, c_q, c_kv = attn.to_q.out_features, attn.to_q.in_features, attn.to_k.in_features
    return 2.0 * batch * (n_q * c_q * inner + 2 * n_kv * c_kv * inner + 2 * n_q * n_kv * inner + n_q * inner * c_q)


class ToMeInstalled(Installed):
    """Wraps each chosen block (to build the merge plan) and its attention / MLP modules."""

    def __init__(self, config: ToMe, session, blocks):
        super().__init__(config, session)
        self.reset_cache()
        attention = session.adapter.attention_modules()
        for index, (name, block, _) in enumerate(blocks):
            inside = [a for a in attention if a.name.startswith(name + ".")]
            spatial = next((a for a in inside if a.kind == "spatial"), None)
            if spatial is None:
                continue
            cross = next((a for a in inside if a.kind == "cross"), None)
            hook_forward(self, block, self._block_forward(name, index, spatial), HOOK_NAME)
            if config.merge_attn:
                hook_forward(self, spatial.module, self._self_attention_forward(name, spatial.module), HOOK_NAME)
            if config.merge_crossattn and cross is not None:
                hook_forward(self, cross.module, self._merged_forward(name, "hidden_states", self._cross_saving(cross.module)), HOOK_NAME)
            ff = getattr(block, "ff", None)
            if config.merge_mlp and isinstance(ff, torch.nn.Module):
                hook_forward(self, ff, self._merged_forward(name, "hidden_states", self._mlp_saving(ff)), HOOK_NAME)

    def reset_cache(self) -> None:
        self.plans = {}
        self.gate_seen: dict[str, dict] = {}

    # ---- plan ------------------------------------------------------------------------
    def _plan(self, hidden: torch.Tensor, h: int, w: int, index: int) -> TokenMerge | None:
        config: ToMe = self.config
        r = int(hidden.shape[1] * config.ratio)
        if r <= 0 or h // config.sy == 0 or w // config.sx == 0:
            return None
        offsets = None
        if config.use_rand:
            # Seeded per (seed, step, block): the same every call, the same for every batch item.
            seed = (config.seed * 1_000_003 + self.session.ctx.step) * 10_007 + index
            g = torch.Generator().manual_seed(seed % (2**63))
            offsets = torch.randint(config.sx * config.sy, (h // config.sy, w // config.sx), generator=g)
        dst, src = split_tokens(h, w, config.sx, config.sy, offsets)
        return TokenMerge(hidden, dst, src, r)

    def _block_forward(self, name: str, index: int, spatial):
        adapter = self.session.adapter

        def forward(original, *args, **kwargs):
            ctx = self.session.ctx
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not ctx.active or ctx.grid is None or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                return original(*args, **kwargs)
            layout = adapter.token_layout(spatial, ctx.grid)
            h, w = layout.height, layout.width
            if h * w != hidden.shape[1]:
                self.count("skipped_layout")
                return original(*args, **kwargs)
            if self.config.gate and not self._gate_allows(hidden):
                self.count("gated_blocks")
                return original(*args, **kwargs)
            self.plans[name] = self._plan(hidden, h, w, index)
            try:
                out = original(*args, **kwargs)
            finally:
                plan = self.plans.pop(name, None)
            if plan is not None:
                self.count("merged_blocks")
                n_dst = plan.M - plan.U  # the similarity matmul is the plan's FLOP cost
                self.count("flops_saved", -2.0 * plan.B * (plan.N - n_dst) * n_dst * hidden.shape[-1])
            return out

        return forward

    def _self_attention_forward(self, name: str, attn):
        kv_only = self.config.mode == "kv"

        def forward(original, *args, **kwargs):
            plan = self.plans.get(name) if self.session.ctx.active else None
            if plan is None or kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None:
                return original(*args, **kwargs)
            hidden, rest, kw = _first(args, kwargs, "hidden_states")
            B, N = plan.B, plan.N
            count_module_backend(self, attn)  # merged tokens go through the module's own processor
            if kv_only:
                kw["encoder_hidden_states"] = plan.merge(hidden)
                self.count("flops_saved", _attention_flops(attn, B, N, N) - _attention_flops(attn, B, N, plan.M))
                return original(hidden, *rest, **kw)
            self.count("flops_saved", _attention_flops(attn, B, N, N) - _attention_flops(attn, B, plan.M, plan.M))
            return _unmerge_output(plan, original(plan.merge(hidden), *rest, **kw))

        return forward

    def _merged_forward(self, name: str, arg_name: str, saving):
        def forward(original, *args, **kwargs):
            plan = self.plans.get(name) if self.session.ctx.active else None
            if plan is None:
                return original(*args, **kwargs)
            hidden, rest, kw = _first(args, kwargs, arg_name)
            self.count("flops_saved", saving(plan, kw))
            return _unmerge_output(plan, original(plan.merge(hidden), *rest, **kw))

        return forward

    @staticmethod
    def _cross_saving(attn):
        def saving(plan, kw):
            text = kw.get("encoder_hidden_states")
            n_text = text.shape[1] if isinstance(text, torch.Tensor) else plan.N
            return _attention_flops(attn, plan.B, plan.N, n_text) - _attention_flops(attn, plan.B, plan.M, n_text)
        return saving

    @staticmethod
    def _mlp_saving(ff):
        per_token = sum(2.0 * m.in_features * m.out_features for m in ff.modules() if isinstance(m, torch.nn.Linear))
        return lambda plan, kw: per_token * plan.B * (plan.N - plan.M)

    # ---- gate: a fixed rule on the block's shape and device --------------------------
    def _gate_allows(self, hidden: torch.Tensor) -> bool:
        config: ToMe = self.config
        device = hidden.device.type
        threshold = config.gate_min_tokens or GATE_MIN_TOKENS.get(device, GATE_MIN_TOKENS_OTHER)
        tokens = int(hidden.shape[1])
        merge = tokens >= threshold
        label = f"B={hidden.shape[0]} N={tokens} C={hidden.shape[2]} {hidden.dtype}".replace("torch.", "")
        self.gate_seen[label] = {"merge": merge, "tokens": tokens, "min_tokens": threshold, "device": device,
                                 "rule": f"{tokens} tokens {'>=' if merge else '<'} {threshold}"
                                         f" ({'gate_min_tokens' if config.gate_min_tokens else 'default for ' + device})"}
        return merge

    def stats(self) -> dict:
        out = dict(self.counters)
        if self.gate_seen:
            out["gate"] = dict(self.gate_seen)
        return out

"""What a denoiser family looks like, as data the methods can ask for.

Methods never import a model class: they ask an :class:`Adapter` for block lists, attention
modules (with their kind), the U-Net skip branches and the token layout of a call. Adapters
know no method. Adding a family is one adapter module in this package plus its entry in
:mod:`diffaccel.families`, which names the module; detection finds the adapters there.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffaccel.families import FAMILIES as _REGISTRY
from diffaccel.families import Family

FAMILIES: tuple[Family, ...] = tuple(_REGISTRY)
ATTENTION_KINDS = ("spatial", "temporal", "joint", "cross")  # see AttentionInfo.kind


@dataclass(frozen=True)
class TokenGrid:
    """The latent patch grid of one denoiser call: what a full self-attention sees.

    ``frames``/``height``/``width`` count latent *patches* (after patchify), ``text_tokens`` the
    text sequence length of the call (0 when unknown or not used).
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0

    @property
    def num_visual(self) -> int:
        return self.frames * self.height * self.width


@dataclass(frozen=True)
class TokenLayout:
    """How the sequence entering one attention module is laid out.

    ``frames``/``height``/``width`` describe the visual tokens in row-major (t, h, w) order.
    ``text_tokens`` counts text tokens concatenated into the same sequence (joint attention),
    ``text_position`` says whether they come ``"first"`` (CogVideoX, Flux) or ``"last"``
    (SD3, HunyuanVideo).
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "first"

    @property
    def num_visual(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.num_visual + self.text_tokens


@dataclass
class AttentionInfo:
    """One attention module of the denoiser.

    ``kind`` is one of ``spatial`` (self-attention over the visual grid, full 3D for video DiTs),
    ``temporal`` (self-attention along frames only), ``joint`` (text and visual tokens in one
    sequence) or ``cross`` (visual queries, text keys). ``downsample`` is the spatial reduction
    of the grid this module sees relative to the call's :class:`TokenGrid` (U-Net levels).
    """

    name: str
    module: torch.nn.Module
    kind: str
    block_index: int
    downsample: int = 1


@dataclass(frozen=True)
class TokenSequence:
    """Where a denoiser's visual token sequence lives, for methods that reorder it once per call
    (sliding-tile attention keeps it in tile order between ``enter`` and ``exit``).

    Between the two points the denoiser must treat visual tokens independently (norms, MLPs,
    modulation, cross-attention, dense self-attention are order-free) except for the
    position-dependent tensors listed here, which are reordered the same way.

    ``enter``: (module path, "output" or "input"): the module's output, or its first input,
    holds the visual tokens as the last ``T*H*W`` entries of dim 1 (text may precede them).
    ``exit``: module path whose first input holds the visual tokens (dim 1) to restore.
    ``tables``: (module path, dim) pairs: module outputs (a tensor or a tuple of tensors) with
    one entry per visual token along ``dim`` (rotary tables).
    ``call_tables``: (denoiser forward argument, dim) pairs: call inputs with one entry per
    visual token along ``dim`` (precomputed rotary tables, per-token timesteps); an input
    with fewer dims (a per-sample timestep) is left alone.
    """

    enter: tuple[str, str]
    exit: str
    tables: tuple[tuple[str, int], ...] = ()
    call_tables: tuple[tuple[str, int], ...] = ()


@dataclass
class SkipBranch:
    """A DeepCache branch point of a U-Net, numbered as DeepCache's ``cache_branch_id``.

    With skip branch ``b``: the shallow path runs down block ``down_block`` up to (and including) its
    layer ``layer``, and the matching up block ``up_block`` from layer ``up_layer``; everything
    deeper is reused from the last full step.
    """

    branch_id: int
    down_block: int
    layer: int
    up_block: int
    up_layer: int


# Submodules of a cross-attention that see the text alone (diffusers' Attention and the newer
# AttentionModuleMixin classes; add_* are Wan I2V's image-context projections).
_CROSS_TEXT_MODULES = ("to_k", "to_v", "norm_k", "add_k_proj", "add_v_proj", "norm_added_k")


@dataclass
class Adapter:
    """Base adapter. Subclasses set ``family``/``pipelines`` and implement the queries."""

    pipe: Any
    denoiser_attr: str = "transformer"
    cfg_mode: str = "batched"  # "batched": [uncond, cond] in one call; "separate": one call per CFG half
    pipelines: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[Family]
    # t / timestep_scale is the normalised time (1 = pure noise) of a denoiser call.
    timestep_scale: ClassVar[float] = 1000.0
    _attention_cache: list[AttentionInfo] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return type(self.pipe).__name__

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    # ---- structure -------------------------------------------------------------------
    def blocks(self) -> list[tuple[str, torch.nn.Module]]:
        """The denoiser's main blocks in execution order (the units block caching skips)."""
        raise NotImplementedError

    def attention_modules(self) -> list[AttentionInfo]:
        if self._attention_cache is None:
            self._attention_cache = self._classify_attention()
        return self._attention_cache

    # (name regex, kind) pairs, first match wins; attention modules matching none (e.g. a text
    # refiner's) are not offered to methods.
    attention_rules: ClassVar[tuple[tuple[str, str], ...]] = ()

    def _classify_attention(self) -> list[AttentionInfo]:
        blocks = self.blocks()
        out = []
        for name, module in self.denoiser.named_modules():
            if not hasattr(module, "processor"):
                continue
            kind = next((k for pattern, k in self.attention_rules if re.fullmatch(pattern, name)), None)
            if kind is None:
                continue
            index = next(i for i, (b, _) in enumerate(blocks) if name.startswith(b + "."))
            out.append(AttentionInfo(name, module, kind, index))
        return out

    # Modules whose output depends on the call's text (or image) conditioning alone, the same at
    # every step: projections of the prompt embeddings into the model width.
    text_projections: ClassVar[tuple[str, ...]] = ()
    # Whether cross-attention receives the call's text tensor itself at every step (so its key /
    # value projections see the same input); False where the model rebuilds it per call.
    cross_text_stable: ClassVar[bool] = True

    def text_modules(self) -> list[str]:
        """Paths of the denoiser's modules that are a function of the text alone: the text
        projections and, in every cross-attention, the key / value projections and the key norm
        (Wan, LTX), in the order they run."""
        names = dict(self.denoiser.named_modules())
        paths = [p for p in self.text_projections if names.get(p) is not None]
        if self.cross_text_stable:
            for info in self.attention_modules():
                if info.kind == "cross":
                    paths += [f"{info.name}.{proj}" for proj in _CROSS_TEXT_MODULES
                              if isinstance(getattr(info.module, proj, None), torch.nn.Module)]
        return paths

    def token_sequence(self) -> TokenSequence:
        """Where the visual tokens can be reordered once per call; raises ``ValueError`` saying
        why not where they cannot."""
        raise ValueError(f"{type(self.denoiser).__name__} ({self.family}) has no single visual token sequence "
                         f"that diffaccel can reorder once per call")

    def skip_branches(self) -> list[SkipBranch]:
        """U-Net only: DeepCache's skip branches. Other families have none."""
        return []

    def transformer_blocks(self) -> list[tuple[str, torch.nn.Module, int]]:
        """Transformer blocks holding a self-attention over the grid: (name, block, downsample)."""
        seen, out = set(), []
        for info in self.attention_modules():
            if info.kind != "spatial":
                continue
            block_name = info.name.rsplit(".", 1)[0]
            if block_name in seen:
                continue
            seen.add(block_name)
            out.append((block_name, self.denoiser.get_submodule(block_name), info.downsample))
        return out

    # ---- per-call layout -------------------------------------------------------------
    def grid_from_call(self, args: tuple, kwargs: dict) -> TokenGrid:
        """The latent patch grid of a denoiser call, from its arguments."""
        raise NotImplementedError

    def token_layout(self, info: AttentionInfo, grid: TokenGrid) -> TokenLayout:
        """Layout of the sequence entering ``info``'s module for a call with ``grid``."""
        d = info.downsample
        h, w = _down(grid.height, d), _down(grid.width, d)
        if info.kind == "temporal":
            return TokenLayout(grid.frames, 1, 1)
        if info.kind == "joint":
            return TokenLayout(grid.frames, h, w, grid.text_tokens, self.text_position)
        return TokenLayout(grid.frames, h, w)

    text_position: ClassVar[str] = "first"

    # What a block of ``blocks()`` returns, position by position, named by the forward argument
    # each output replaces: a bare tensor for ("hidden_states",), else a tuple in this order.
    # Block caching needs it to skip a block (return its inputs) or add a cached residual.
    block_outputs: ClassVar[tuple[str, ...]] = ("hidden_states",)
    # False when the denoiser reshapes activations between blocks (Latte's spatial/temporal
    # alternation): a residual spanning several blocks then has no single layout.
    blocks_keep_layout: ClassVar[bool] = True
    # Branch order of the two halves of a batched-CFG call (diffusers' usual order; DiT differs).
    batched_cfg_order: ClassVar[tuple[str, str]] = ("uncond", "cond")

    def normalised_time(self, timestep: float) -> float:
        return float(min(max(timestep / self.timestep_scale, 0.0), 1.0))

    def num_train_timesteps(self) -> int:
        return int(getattr(self.pipe.scheduler.config, "num_train_timesteps", 1000) or 1000)

    def fingerprint(self) -> dict:
        """Architecture identity: enough to refuse a profile made for another model."""
        cfg = dict(getattr(self.denoiser, "config", {}) or {})
        keep = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, list, tuple)) and not k.startswith("_")}
        return {
            "family": str(self.family),
            "denoiser": type(self.denoiser).__name__,
            "num_blocks": len(self.blocks()),
            "config": keep,
        }

    def describe(self) -> dict:
        kinds: dict[str, int] = {}
        for info in self.attention_modules():
            kinds[info.kind] = kinds.get(info.kind, 0) + 1
        return {
            "pipeline": self.name,
            "family": str(self.family),
            "denoiser": type(self.denoiser).__name__,
            "blocks": len(self.blocks()),
            "attention": kinds,
            "cfg_mode": self.cfg_mode,
        }


def _down(size: int, factor: int) -> int:
    """Spatial size after ``log2(factor)`` stride-2 convolutions with padding 1 (U-Net)."""
    for _ in range(int(round(math.log2(factor))) if factor > 1 else 0):
        size = (size + 1) // 2
    return size


def call_arg(args: tuple, kwargs: dict, name: str, position: int):
    """A forward argument given either by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    return None

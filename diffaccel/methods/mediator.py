"""Mediator (agent) attention, training-free: a few mediator tokens, pooled from the
queries, first gather from all keys, then every query reads from the mediators, so
attention costs O(N*m) instead of O(N^2). The number of mediators follows the step: few
early (coarse layout), more late (detail), as in "Step-wise Dynamic Attention Mediators";
the constants (s' = 0.3 s, shortcut 0.075 V) are AgentSD's.

Applies to spatial / joint self-attention (text tokens of joint attention are computed
densely). Grids with fewer than ``min_tokens`` visual tokens stay dense. Every attention it
computes (mediators <- keys, queries <- mediators, text rows) runs on the backend the user
selected for the module (torch SDPA or the diffusers attention-dispatch backend).

Example::

    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.MediatorAttention(mediator_ratio=(1 / 16, 1 / 4))])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from diffaccel.families import Capability
from diffaccel.kernels import mediator_attention, mediator_grid
from diffaccel.kernels.mediator import QUERY_SCALE_FACTOR, SHORTCUT
from diffaccel.methods.attention_intercept import SparseAttentionHook
from diffaccel.methods.base import Installed, Method, register
from diffaccel.validate import fraction, non_negative_int

KINDS = ("spatial", "joint")


@register
@dataclass(frozen=True)
class MediatorAttention(Method):
    """Mediator attention with a step-wise number of mediators.

    Attributes:
        mediator_ratio: (first, last) mediators per visual token; the ratio moves linearly
            from the first to the last sparse step (fewer early, more late). Mediators are
            average-pooled queries over the token grid, so the count is rounded to a grid.
        full_attention_fraction: the first fraction of the steps keeps full attention.
        query_scale_factor: s' / s for the query -> mediator softmax (AgentSD: 0.3).
        shortcut: weight of the ``+ c * V`` shortcut (AgentSD: 0.075).
        min_tokens: grids with fewer visual tokens stay dense.
    """

    name: ClassVar[str] = "mediator"
    requires: ClassVar[Capability] = Capability.SPARSE_ATTENTION
    # under Ulysses the routed call runs between diffusers' all-to-alls (whole sequence, a shard of
    # the heads: exact); ring splits the keys, so no rank could see a whole window
    context_parallel: ClassVar[str] = "ulysses"

    mediator_ratio: tuple[float, float] = (1 / 16, 1 / 4)
    full_attention_fraction: float = 0.0
    query_scale_factor: float = QUERY_SCALE_FACTOR
    shortcut: float = SHORTCUT
    min_tokens: int = 1024

    def validate(self) -> None:
        ratio = self.mediator_ratio
        if not (isinstance(ratio, (tuple, list)) and len(ratio) == 2):
            raise ValueError(f"MediatorAttention(mediator_ratio=...) must be (first, last), got {ratio!r}")
        for value in ratio:
            fraction(value, "MediatorAttention(mediator_ratio=...) entries", 0.0, 1.0, inclusive_high=False)
            if value <= 0:
                raise ValueError(f"MediatorAttention(mediator_ratio=...) entries must be > 0, got {ratio!r}")
        fraction(self.full_attention_fraction, "MediatorAttention(full_attention_fraction=...)",
                 hint="0 makes every step sparse; 0.3 keeps the first 30% of the steps dense.")
        fraction(self.query_scale_factor, "MediatorAttention(query_scale_factor=...)", 0.0, 10.0,
                 hint="AgentSD uses 0.3.")
        fraction(self.shortcut, "MediatorAttention(shortcut=...)", 0.0, 1.0, hint="AgentSD uses 0.075; 0 turns it off.")
        non_negative_int(self.min_tokens, "MediatorAttention(min_tokens=...)")

    def ratio_at(self, where: float) -> float:
        """Mediators per token at step fraction ``where`` (0 = first step)."""
        first, last = self.mediator_ratio
        start = self.full_attention_fraction
        progress = 0.0 if start >= 1.0 else min(1.0, max(0.0, (where - start) / (1.0 - start)))
        return first + (last - first) * progress

    def apply(self, session) -> Installed:
        self.validate()
        self.check_family(session.adapter.family)
        return MediatorAttentionInstalled(self, session)


class MediatorAttentionInstalled(Installed):
    """One mediator hook per spatial / joint self-attention module."""

    def __init__(self, config: MediatorAttention, session):
        super().__init__(config, session)
        self.hooks = [_MediatorHook(self, info) for info in session.adapter.attention_modules() if info.kind in KINDS]


class _MediatorHook(SparseAttentionHook):
    def plan(self, layout):
        where = self.sparse_phase(layout)
        if where is None:
            return None
        grid = (layout.frames, layout.height, layout.width)
        wanted = max(1, round(self.installed.config.ratio_at(where) * layout.num_visual))
        if math.prod(mediator_grid(grid, wanted)) >= layout.num_visual:  # no fewer mediators than tokens
            return None
        return grid, wanted

    def attend(self, q, k, v, layout, setting, call):
        grid, wanted = setting
        scale = call.scale
        mediators = math.prod(mediator_grid(grid, wanted))  # pooling rounds the count to a grid
        config = self.installed.config
        batch, heads, seq, dim = q.shape
        text = layout.text_tokens
        cost = 8.0 * batch * heads * mediators * seq * dim + 4.0 * batch * heads * text * seq * dim
        self.installed.count("flops_saved", max(0.0, 4.0 * batch * heads * seq * seq * dim - cost))
        self.installed.count("mediators_sum", mediators)
        # Its two mediator attentions and the text rows are dense attentions: the user's backend runs them.
        return mediator_attention(q, k, v, wanted, grid, text_tokens=text, scale=scale,
                                  query_scale_factor=config.query_scale_factor, shortcut=config.shortcut,
                                  attend=call.attend)

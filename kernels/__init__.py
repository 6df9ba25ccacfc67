"""diffaccel.kernels: attention kernels (Triton, FlexAttention, CPU paths) and the dense
references they are tested against. Imports only torch (and triton when present), so the
GPU benchmark can load this package without diffusers."""

from .mediator import mediator_attention, mediator_grid
from .sliding_tile import BACKENDS, sliding_tile_attention, sliding_tile_density

__all__ = ["BACKENDS", "sliding_tile_attention", "sliding_tile_density", "mediator_attention", "mediator_grid"]

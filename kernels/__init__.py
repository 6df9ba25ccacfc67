"""diffaccel.kernels: attention kernels (Triton, FlexAttention, CPU paths) and the dense
references they are tested against. Imports only torch (and triton when present), so the
GPU benchmark can load this package without diffusers."""

if __name__ == "kernels":
    # Python found this folder as the top-level `kernels` because the current directory is the
    # diffaccel repository root; it then hides the Hugging Face `kernels` package transformers needs.
    raise ImportError("the diffaccel repository's kernels/ folder shadows the `kernels` package that transformers "
                      "imports: run from another directory (the `diffaccel` command works anywhere), not "
                      "`python -m`/`python -c` in the repository root.")

from .mediator import mediator_attention, mediator_grid
from .sliding_tile import BACKENDS, sliding_tile_attention, sliding_tile_density

__all__ = ["BACKENDS", "sliding_tile_attention", "sliding_tile_density", "mediator_attention", "mediator_grid"]

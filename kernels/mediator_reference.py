"""Reference mediator attention: explicit pooling matrix and explicit softmax matrices,
independent of the pooling and SDPA calls the fast path uses. For tests."""

from __future__ import annotations

import math

import torch

from .mediator import QUERY_SCALE_FACTOR, SHORTCUT, check_mediator_args, mediator_grid


def _pool_matrix_1d(size: int, cells: int, dtype, device) -> torch.Tensor:
    """(cells, size): row i averages positions [floor(i*size/cells), ceil((i+1)*size/cells))
    -- the bins adaptive average pooling uses."""
    matrix = torch.zeros(cells, size, dtype=dtype, device=device)
    for i in range(cells):
        start, stop = (i * size) // cells, -(-((i + 1) * size) // cells)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def pooling_matrix(tokens: int, num_mediators: int, grid, dtype, device) -> torch.Tensor:
    """(m, N) matrix P with mediators = P @ q_video."""
    if grid is None:
        return _pool_matrix_1d(tokens, num_mediators, dtype, device)
    T, H, W = tuple(grid) if len(grid) == 3 else (1, *grid)
    cells = mediator_grid((T, H, W), num_mediators)
    pt, ph, pw = (_pool_matrix_1d(s, c, dtype, device) for s, c in zip((T, H, W), cells))
    return torch.einsum("at,bh,cw->abcthw", pt, ph, pw).reshape(math.prod(cells), tokens)


def mediator_attention_reference(q, k, v, num_mediators: int, grid=None, *, text_tokens: int = 0, scale=None,
                                 query_scale_factor: float = QUERY_SCALE_FACTOR, shortcut: float = SHORTCUT):
    video = check_mediator_args(q, k, v, num_mediators, grid, text_tokens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    pool = pooling_matrix(video, num_mediators, grid, q.dtype, q.device)
    q_video = q[:, :, text_tokens:]
    mediators = pool @ q_video
    gathered = torch.softmax(mediators @ k.transpose(-1, -2) * scale, dim=-1) @ v
    out = torch.softmax(q_video @ mediators.transpose(-1, -2) * (scale * query_scale_factor), dim=-1) @ gathered
    out = out + shortcut * v[:, :, text_tokens:]
    text_out = torch.softmax(q[:, :, :text_tokens] @ k.transpose(-1, -2) * scale, dim=-1) @ v
    return torch.cat([text_out, out], dim=2)

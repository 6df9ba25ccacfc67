"""Fidelity of an accelerated output to the unaccelerated one: PSNR and SSIM on raw tensors.

Both take images as float tensors or numpy arrays in [0, 1], shaped (H, W, C), (N, H, W, C),
(C, H, W) or (N, C, H, W); videos are compared frame by frame by passing the frames as the
batch. SSIM uses torchmetrics' implementation (Gaussian window 11, sigma 1.5), the one papers
report.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def to_nchw(images) -> torch.Tensor:
    """Float32 (N, C, H, W) tensor in [0, 1] from PIL images, arrays or tensors."""
    if isinstance(images, (list, tuple)):
        return torch.cat([to_nchw(i) for i in images])
    if not isinstance(images, (np.ndarray, torch.Tensor)):  # PIL image
        images = np.asarray(images, dtype=np.float32) / 255.0
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images).float()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch; inf for identical inputs."""
    x, y = to_nchw(a), to_nchw(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}.")
    mse = torch.mean((x - y) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(a, b, data_range: float = 1.0) -> float:
    """Mean structural similarity over the batch (1.0 for identical inputs)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = to_nchw(a), to_nchw(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}.")
    # A Gaussian window larger than the image is invalid; tiny bundled images need a smaller one.
    kernel = min(11, (min(x.shape[-2:]) // 2) * 2 - 1)
    sigma = 1.5 * kernel / 11
    return float(structural_similarity_index_measure(x, y, data_range=data_range, kernel_size=kernel, sigma=sigma))

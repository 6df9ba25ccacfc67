"""Fidelity of an accelerated output to the unaccelerated one: PSNR and SSIM on raw tensors.

Both take images as float tensors or numpy arrays in [0, 1], shaped (H, W, C), (N, H, W, C),
(C, H, W) or (N, C, H, W); videos are compared frame by frame by passing the frames as the
batch. SSIM uses torchmetrics' implementation (Gaussian window 11, sigma 1.5), the one papers
report; torchmetrics comes with the ``eval`` extra, and without it SSIM and FID are skipped.
"""
from __future__ import annotations

import importlib.util
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


EVAL_EXTRA = 'pip install "diffaccel[eval]"'
# What each package of the eval extra adds to an evaluation (the base install skips it, with one note).
EVAL_EXTRA_PARTS = {"torchmetrics": "SSIM and FID", "matplotlib": "the speed/quality plot",
                    "imageio_ffmpeg": "MP4 samples (GIF instead)"}


def available(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or the module is blocked
        return False


def eval_extra_note() -> str | None:
    """One line naming what this install skips for want of the eval extra, or None."""
    missing = [what for module, what in EVAL_EXTRA_PARTS.items() if not available(module)]
    return None if not missing else f"Skipped {', '.join(missing)}: they need the eval extra, {EVAL_EXTRA}."


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch; inf for identical inputs."""
    x, y = to_nchw(a), to_nchw(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}.")
    mse = torch.mean((x - y) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(a, b, data_range: float = 1.0) -> float:
    """Mean structural similarity over the batch (1.0 for identical inputs); needs torchmetrics."""
    if not available("torchmetrics"):
        raise MetricUnavailable(f"SSIM needs torchmetrics: {EVAL_EXTRA}.")
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = to_nchw(a), to_nchw(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}.")
    # A Gaussian window larger than the image is invalid; tiny bundled images need a smaller one.
    kernel = min(11, (min(x.shape[-2:]) // 2) * 2 - 1)
    sigma = 1.5 * kernel / 11
    return float(structural_similarity_index_measure(x, y, data_range=data_range, kernel_size=kernel, sigma=sigma))


# ---- metrics that need model weights: FID, CLIP score, LPIPS ----------------------------------
# Each loader raises MetricUnavailable with a one-line how-to when its weights are missing, so
# evaluations skip the metric and say how to enable it instead of crashing.

FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception


class MetricUnavailable(RuntimeError):
    """A metric cannot run here; the message says how to provide what it needs."""


def to_uint8_nchw(images) -> torch.Tensor:
    return (to_nchw(images).clamp(0, 1) * 255).round().to(torch.uint8)


def fid_feature_extractor(path: str | None = None) -> tuple[torch.nn.Module, str]:
    """(module mapping uint8 (N, 3, H, W) images to features, its description).

    ``path``: a TorchScript file of such a module, or torch-fidelity's FID Inception weights
    (``.pth``, needs the torch-fidelity package). Without a path, the Inception weights are looked
    up in the torch hub cache, where torchmetrics/torch-fidelity download them.
    """
    from pathlib import Path

    how_to = ("give --inception PATH: a TorchScript feature module, or torch-fidelity's "
              f"{FID_INCEPTION_FILE} (with `pip install torch-fidelity`)")
    if path is not None:
        if not Path(path).is_file():
            raise MetricUnavailable(f"FID skipped: {path} does not exist; {how_to}.")
        try:
            return torch.jit.load(path, map_location="cpu").eval(), f"TorchScript features from {path}"
        except RuntimeError:
            pass  # not TorchScript: try it as Inception weights
    else:
        path = str(Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_FILE)
        if not Path(path).is_file():
            raise MetricUnavailable(f"FID skipped: no Inception weights in the torch hub cache; {how_to}.")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                    feature_extractor_weights_path=path, antialias=False)
    except (ImportError, ModuleNotFoundError):
        raise MetricUnavailable(f"FID skipped: {path} needs the torch-fidelity package "
                                "(`pip install torch-fidelity`), or export the extractor to TorchScript.") from None
    return module, f"FID Inception-v3 (2048 features, antialias=False) from {path}"


class ColourGridFeatures(torch.nn.Module):
    """Weight-free FID features for the bundled synthetic images: the mean colour of each cell of
    a 4x4 grid (48 numbers). It sees colour, position and rough size, which is what the bundled
    captions vary; it is not Inception FID and its values are not comparable with published FIDs."""

    name = "colour-grid 4x4 (48 weight-free features; not Inception)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)


def make_fid(feature: torch.nn.Module):
    """torchmetrics FID on a custom feature module; reference features survive ``reset()``. It never
    syncs across ranks (no hidden collective): the evaluation runner feeds every sample to rank 0."""
    if not available("torchmetrics"):
        raise MetricUnavailable(f"FID skipped: it needs torchmetrics, {EVAL_EXTRA}.")
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature, reset_real_features=False, input_img_size=(3, 299, 299),
                                     sync_on_compute=False)


def load_fid_statistics(fid, path: str) -> None:
    """Set ``fid``'s reference from precomputed statistics: an .npz with ``mu``, ``sigma`` and the
    sample count ``n`` (states are sums, so mean and covariance are turned back into sums)."""
    data = np.load(path)
    mu = torch.as_tensor(data["mu"], dtype=torch.float64)
    sigma = torch.as_tensor(data["sigma"], dtype=torch.float64)
    n = int(data["n"])
    fid.real_features_sum = mu * n
    fid.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    fid.real_features_num_samples = torch.tensor(n)


class ClipScorer:
    """CLIP score as torchmetrics defines it, 100 * max(cos(image, text), 0), with a CLIP model
    from a local folder (torchmetrics' CLIPScore only takes hub names and breaks with
    transformers 5). Videos score the mean over their frames."""

    def __init__(self, path: str | None, device="cpu"):
        from pathlib import Path

        if path is None or not (Path(path) / "config.json").is_file():
            where = "no --clip given" if path is None else f"{path} holds no config.json"
            raise MetricUnavailable(f"CLIP score skipped: {where}; give --clip DIR, a local CLIP model folder "
                                    "(e.g. a saved openai/clip-vit-large-patch14 with its processor).")
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.name = getattr(self.model.config, "_name_or_path", None) or str(path)
        self.device = device

    @torch.no_grad()
    def score(self, images, prompt: str) -> float:
        """``images``: one image (H, W, 3) or a clip's frames (T, H, W, 3), floats in [0, 1]."""
        frames = to_uint8_nchw(images).permute(0, 2, 3, 1).numpy()
        inputs = self.processor(text=[prompt], images=list(frames), return_tensors="pt", padding=True)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        image, text = out.image_embeds, out.text_embeds
        cos = torch.nn.functional.cosine_similarity(image, text.expand_as(image), dim=-1)
        return float((100 * cos.clamp(min=0)).mean())


class LpipsScorer:
    """LPIPS (AlexNet) via the ``lpips`` package, only when it and its weights are present."""

    def __init__(self, device="cpu"):
        try:
            import lpips

            self.model = lpips.LPIPS(net="alex", verbose=False).eval().to(device)
        except Exception as err:  # missing package, or weights it would have to download
            raise MetricUnavailable(f"LPIPS skipped ({type(err).__name__}): `pip install lpips` and have its "
                                    "AlexNet weights in the torch hub cache.") from None
        self.device = device

    @torch.no_grad()
    def distance(self, a, b) -> float:
        x, y = (to_nchw(v).to(self.device) * 2 - 1 for v in (a, b))
        return float(self.model(x, y).mean())

"""Resolve a MODEL argument (bundled name, local directory or hub id) to a pipeline."""
from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown --device {device!r}; use cpu, cuda, cuda:1, mps or auto.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but no CUDA device is available; use --device cpu.")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(sorted(set(DTYPES)))}.")
    return DTYPES[dtype]


def load_pipeline(model: str, device: str | None = None, dtype=None):
    """Load ``model``: a bundled name (tiny-sd, tiny-dit, tiny-video), a local diffusers
    folder, or a hub id (needs network or a populated HF cache)."""
    from diffaccel.bundled.loader import BUNDLED_MODELS, load_bundled

    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if model in BUNDLED_MODELS:
        return load_bundled(model, device=device, dtype=dtype)
    import diffusers

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json).")
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), **kwargs)
    elif os.sep in model and not model.count("/") == 1 or model.startswith((".", "~")):
        raise FileNotFoundError(f"Model path {model!r} does not exist. Give a bundled name ({', '.join(BUNDLED_MODELS)}), "
                                "a local pipeline folder, or a hub id like 'org/name'.")
    else:
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(model, **kwargs)
        except Exception as err:  # offline, unknown id, gated repo: say what to do
            raise FileNotFoundError(
                f"Could not load {model!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
                f"Give a bundled name ({', '.join(BUNDLED_MODELS)}), a local pipeline folder, or a hub id that is "
                "reachable or already in the Hugging Face cache."
            ) from None
    return pipe.to(device)

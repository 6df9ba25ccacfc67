"""Denoiser family adapters: what each supported architecture looks like, as data."""
from .base import FAMILIES, ATTENTION_KINDS, Adapter, AttentionInfo, SkipBranch, TokenGrid, TokenLayout
from .detect import ADAPTERS, UnsupportedPipelineError, detect, supported_pipelines

__all__ = [
    "FAMILIES", "ATTENTION_KINDS", "Adapter", "AttentionInfo", "SkipBranch", "TokenGrid", "TokenLayout",
    "ADAPTERS", "UnsupportedPipelineError", "detect", "supported_pipelines",
]

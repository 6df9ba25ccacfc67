"""Recognise a pipeline's denoiser family and return its adapter."""
from __future__ import annotations

import importlib

from diffaccel.families import FAMILIES

from .base import Adapter


def _registered_adapters() -> tuple[type[Adapter], ...]:
    """The adapter classes of every registered family, from the module its registry entry names."""
    found = []
    for family, spec in FAMILIES.items():
        module = importlib.import_module(f"{__package__}.{spec.adapters}")
        classes = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Adapter)
                   and c.__module__ == module.__name__ and c.pipelines]
        wrong = [c.__name__ for c in classes if c.family != family]
        if wrong or not classes:
            raise RuntimeError(f"diffaccel.pipelines.{spec.adapters} must define the adapters of the {family} family "
                               f"(with pipelines and family = Family.{family.name}); check {wrong or 'the module'}.")
        found += classes
    return tuple(found)


ADAPTERS: tuple[type[Adapter], ...] = _registered_adapters()


class UnsupportedPipelineError(TypeError):
    """The object is not a pipeline diffaccel knows how to accelerate."""


def supported_pipelines() -> dict[str, list[str]]:
    """Family name -> pipeline class names, for docs and error messages."""
    table: dict[str, list[str]] = {}
    for adapter in ADAPTERS:
        table.setdefault(adapter.family, []).extend(adapter.pipelines)
    return table


def _supported_text() -> str:
    return "; ".join(f"{fam}: {', '.join(names)}" for fam, names in supported_pipelines().items())


def detect(pipe) -> Adapter:
    """The adapter for ``pipe``'s denoiser family, or an error naming what was found."""
    if not (hasattr(pipe, "components") and callable(pipe)):
        raise UnsupportedPipelineError(
            f"diffaccel expects a diffusers pipeline (e.g. StableDiffusionPipeline.from_pretrained(...)), "
            f"got an object of type {type(pipe).__name__}. Supported: {_supported_text()}."
        )
    # Walk the MRO so a user's subclass of a supported pipeline is recognised.
    for cls in type(pipe).__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.pipelines:
                instance = adapter(pipe)
                if getattr(pipe, instance.denoiser_attr, None) is None:
                    raise UnsupportedPipelineError(
                        f"{type(pipe).__name__} has no {instance.denoiser_attr!r} component loaded; "
                        "load the pipeline with its denoiser before calling diffaccel."
                    )
                return instance
    denoiser = next((n for n in ("unet", "transformer", "prior") if getattr(pipe, n, None) is not None), None)
    found = f"{type(pipe).__name__}" + (f" with a {type(getattr(pipe, denoiser)).__name__} denoiser" if denoiser else "")
    raise UnsupportedPipelineError(
        f"diffaccel does not support {found}. Supported families and pipelines: {_supported_text()}. "
        "If this pipeline uses one of these denoisers, please open an issue with its class name."
    )

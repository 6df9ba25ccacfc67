"""What every acceleration method provides, and the small tools they share.

A method is one file with a config dataclass subclassing :class:`Method`. The config validates
itself (``validate``) and installs itself on a pipeline (``apply(session) -> Installed``). The
:class:`Installed` handle is the apply/remove pair: ``remove()`` restores the model exactly,
``reset()`` clears per-call state (called at the start and end of every pipeline call),
``stats()`` describes the last call.

Methods read the call state from ``session.ctx`` (step, branch, t_norm, grid; see
:mod:`diffaccel.state`) and learn the architecture only from ``session.adapter``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

if TYPE_CHECKING:
    from diffaccel.state import Session

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method known by its ``name`` (for ``methods=["name"]`` and the CLI)."""
    METHODS[cls.name] = cls
    return cls


@dataclass
class Method:
    """Base of all method configs."""

    name: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ("unet", "image_dit", "video_dit")

    def validate(self) -> None:
        """Raise ValueError with an actionable message for a bad parameter."""

    def check_family(self, family: str) -> None:
        if family not in self.families:
            raise ValueError(
                f"{type(self).__name__} cannot accelerate pipelines of the {family} family; it supports "
                f"{', '.join(self.families)}. Pick a method for {family} (see diffaccel.METHODS) or a preset."
            )

    def apply(self, session: "Session") -> "Installed":
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


class Installed:
    """Handle of an applied method. Subclasses override what they need."""

    def __init__(self, config: Method, session: "Session"):
        self.config = config
        self.session = session
        self._undo: list[Callable[[], None]] = []
        self.counters: dict[str, float] = {}

    # per-call ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.counters = {}
        self.reset_cache()

    def reset_cache(self) -> None:
        """Drop cached activations (per-call state)."""

    def count(self, key: str, amount: float = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + amount

    def stats(self) -> dict:
        return dict(self.counters)

    # install / remove --------------------------------------------------------------------
    def on_remove(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.reset_cache()


def hook_forward(installed: Installed, module: torch.nn.Module, new_forward: Callable, hook_name: str) -> None:
    """Route ``module``'s forward through ``new_forward(original_forward, *args, **kwargs)``.

    Uses diffusers' HookRegistry (the mechanism behind its own cache hooks), so hooks compose
    with diffusers' and are removed cleanly; removal is registered on ``installed``.
    """
    from diffusers.hooks import HookRegistry, ModelHook

    class _Hook(ModelHook):
        def new_forward(self, mod, *args, **kwargs):
            return new_forward(self.fn_ref.original_forward, *args, **kwargs)

    had_forward, had_registry = "forward" in vars(module), hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(_Hook(), hook_name)

    def undo():
        registry.remove_hook(hook_name, recurse=False)
        if not registry.hooks and not had_registry:
            # HookRegistry leaves an instance ``forward`` (the class method, bound) and an empty
            # registry behind; drop both, or class-swapping patchers such as tomesd stop working.
            if not had_forward:
                vars(module).pop("forward", None)
            del module._diffusers_hook

    installed.on_remove(undo)


def swap_processor(installed: Installed, attention: torch.nn.Module, processor) -> None:
    """Install an attention processor, restoring the original one on removal."""
    original = attention.processor
    attention.set_processor(processor) if hasattr(attention, "set_processor") else setattr(attention, "processor", processor)
    installed.on_remove(lambda: attention.set_processor(original) if hasattr(attention, "set_processor") else setattr(attention, "processor", original))


def positive_int(value, what: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.{(' ' + hint) if hint else ''}")
    return value


def fraction(value, what: str, low: float = 0.0, high: float = 1.0, *, inclusive_high: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value and (value <= high if inclusive_high else value < high)
    if not ok:
        bound = "]" if inclusive_high else ")"
        raise ValueError(f"{what} must be a number in [{low}, {high}{bound}, got {value!r}.")
    return float(value)

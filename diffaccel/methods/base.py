"""What every acceleration method provides.

A method is one file with a frozen config dataclass subclassing :class:`Method` and its
installed handle, named ``<Config>Installed`` (:class:`~diffaccel.hooks.Installed`). The config
validates itself (``validate``), says which family capability it ``requires`` and installs
itself on a pipeline (``apply(session) -> Installed``). The handle is the apply/remove pair:
``remove()`` restores the model exactly, ``reset()`` clears per-call state (called at the start
and end of every pipeline call), ``stats()`` describes the last call; it keeps every piece of
state that changes, and reads per-call settings from ``call_config()``.

Methods read the call state from ``session.ctx`` (step, call_index, CFG layout, t_norm, grid;
see :mod:`diffaccel.state`), learn the architecture only from ``session.adapter``, and take
family-dependent defaults from the registry (:mod:`diffaccel.families`). Parameter checks are
in :mod:`diffaccel.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from diffaccel.families import Capability, Family, families_with, method_defaults
from diffaccel.hooks import Installed, hook_forward

if TYPE_CHECKING:
    from diffaccel.state import Session

__all__ = ["METHODS", "Method", "register", "Installed", "hook_forward"]

METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method known by its ``name`` (for ``methods=["name"]`` and the CLI)."""
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Method:
    """Base of all method configs (frozen: a config never changes once made)."""

    name: ClassVar[str] = ""
    # The family capability the method needs (None: it runs on every family).
    requires: ClassVar[Capability | None] = None
    # Keys of ``diffaccel.families.method_defaults(family, name)`` the method reads.
    family_defaults: ClassVar[tuple[str, ...]] = ()
    # Under diffusers' context parallelism: "any" (exact with Ulysses and ring on the sharded layout),
    # "ulysses" (needs whole-sequence attention calls) or "none" (see diffaccel.distributed).
    context_parallel: ClassVar[str] = "any"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "families" in vars(cls):
            raise TypeError(f"{cls.__name__} declares `families`; declare the Capability it `requires` instead "
                            "(families offer capabilities in diffaccel/families.py).")

    @classmethod
    def supported_families(cls) -> tuple[Family, ...]:
        return families_with(cls.requires)

    def validate(self) -> None:
        """Raise ValueError with an actionable message for a bad parameter."""

    def check_family(self, family: str) -> None:
        supported = self.supported_families()
        if family not in supported:
            raise ValueError(
                f"{type(self).__name__} cannot accelerate pipelines of the {family} family; it supports "
                f"{', '.join(supported)}. Pick a method for {family} (see diffaccel.METHODS) or a preset."
            )

    def defaults_for(self, family: str) -> Mapping[str, Any]:
        """This method's family-dependent default settings (see ``family_defaults``)."""
        return method_defaults(family, self.name, self.family_defaults)

    def apply(self, session: "Session") -> Installed:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"method": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

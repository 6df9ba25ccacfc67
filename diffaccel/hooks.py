"""Installed handles: what an applied method holds, and the undo stack that removes it exactly.

Every method config's ``apply(session)`` returns an :class:`Installed` handle (named
``<Config>Installed``). The handle owns everything that changes during calls; the config is
frozen. The session calls ``reset()`` at the start and end of every pipeline call, ``stats()``
after it, and ``remove()`` once; each change to the model is paired with its undo through
``on_remove`` (:func:`hook_forward` does it for forward hooks).

Per-call decisions that do not come from the config itself (a schedule planned for this call's
timesteps, a threshold chosen for a target) come from a :class:`ScheduleProvider` registered
on the session for the method's name: :meth:`Installed.call_config` asks it once per call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch

from diffaccel import compat

if TYPE_CHECKING:
    from diffaccel.methods.base import Method
    from diffaccel.state import Session


class ScheduleProvider(Protocol):
    """Chooses, per pipeline call, the settings a method runs with."""

    def config_for_call(self, config: "Method", session: "Session") -> "Method":
        """The config ``config``'s handle uses for the running call (a modified copy or itself)."""


class Installed:
    """Handle of an applied method. Subclasses override what they need."""

    def __init__(self, config: "Method", session: "Session"):
        self.config = config
        self.session = session
        self._undo: list[Callable[[], None]] = []
        self._call_config: "Method | None" = None
        self.counters: dict[str, float] = {}
        # Known to the session before the first hook goes in: if this handle's installation
        # fails half-way, the session still removes what it had installed.
        session.track(self)

    # Hooks hold bound methods of handles: a pickled or copied denoiser must not carry them along.
    def __reduce_ex__(self, protocol):
        raise TypeError(compat.not_picklable_message())

    def __deepcopy__(self, memo):
        raise TypeError(compat.not_copyable_message())

    # ---- per call ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.counters = {}
        self._call_config = None
        self.reset_cache()

    def reset_cache(self) -> None:
        """Drop cached activations (per-call state)."""

    def call_config(self) -> "Method":
        """The config for the running call: the provider's choice when one is registered for this
        method, else the config given to ``accelerate``. Asked once per call."""
        if self._call_config is None:
            provider = self.session.providers.get(self.config.name)
            self._call_config = self.config if provider is None else provider.config_for_call(self.config, self.session)
        return self._call_config

    def count(self, key: str, amount: float = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + amount

    def count_skipped(self, path: str, amount: float = 1) -> None:
        """Record that module ``path`` (``""``: the whole denoiser) was not computed ``amount`` times."""
        skipped = self.counters.setdefault("skipped_modules", {})
        skipped[path] = skipped.get(path, 0) + amount

    def stats(self) -> dict:
        return dict(self.counters)

    # ---- install / remove --------------------------------------------------------------------
    def on_remove(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.reset_cache()


def hook_forward(installed: Installed, module: torch.nn.Module, new_forward: Callable, hook_name: str) -> None:
    """Route ``module``'s forward through ``new_forward(original_forward, *args, **kwargs)`` until
    ``installed`` is removed (diffusers' HookRegistry, see :func:`diffaccel.compat.hook_forward`)."""
    installed.on_remove(compat.hook_forward(module, new_forward, hook_name))

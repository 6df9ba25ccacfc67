"""What an evaluation compares: named configurations of a pipeline.

A config spec is one of

* ``baseline`` — the pipeline untouched;
* a preset name — ``quality``, ``balanced``, ``fast``;
* a method list — ``deepcache:interval=3+tome:ratio=0.5`` (``+`` joins methods, ``:`` starts a
  method's parameters, ``,`` separates them; values are Python literals or plain words);
* ``profile:PATH@2.0`` — the schedule picked from a redundancy profile for a target speed-up;
* ``target@2.0`` — the same with the profile shipped for the model;
* ``fast@PATH`` — a preset whose StepCache schedules are planned from the profile at PATH (one made
  with ``diffaccel profile --step-graph N --verify M``) instead of the shipped one.

>>> parse_config("deepcache:interval=3,branch=1").methods[0].interval
3
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

BASELINE = "baseline"


@dataclass
class EvalConfig:
    spec: str  # as the user wrote it
    preset: str | None = None
    methods: list = field(default_factory=list)
    profile: str | None = None
    target_speedup: float | None = None

    @property
    def name(self) -> str:
        """File-system safe name used for folders and table rows."""
        return re.sub(r"[^A-Za-z0-9._+=-]", "_", self.spec.replace(":", "-").replace(",", "_"))

    @property
    def is_baseline(self) -> bool:
        return self.spec == BASELINE

    resolved: list | None = None  # the method configs the first apply installed

    def apply(self, pipe):
        """Put ``pipe`` in this configuration (replacing any previous acceleration).

        The first apply resolves presets and profile targets to method configs; later applies
        (timing re-applies every round) install copies of those, so a target is planned once.
        """
        import copy

        import diffaccel
        from diffaccel.api import session_of

        if self.is_baseline:
            self.resolved = []
            return diffaccel.disable(pipe)
        if self.resolved is not None:
            return diffaccel.accelerate(pipe, methods=copy.deepcopy(self.resolved))
        if self.preset is not None:
            diffaccel.accelerate(pipe, preset=self.preset, profile=self.profile)
        elif self.target_speedup is not None:
            diffaccel.accelerate(pipe, profile=self.profile, target_speedup=self.target_speedup)
        else:
            diffaccel.accelerate(pipe, methods=copy.deepcopy(self.methods))
        self.resolved = copy.deepcopy([handle.config for handle in session_of(pipe).installed])
        return pipe

    def method_dicts(self) -> list[dict] | None:
        return None if self.resolved is None else [m.to_dict() for m in self.resolved]


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain word such as schedule=uniform


def _method(text: str):
    from diffaccel.methods.base import METHODS

    name, _, params = text.partition(":")
    if name not in METHODS:
        raise KeyError(name)
    kwargs = {}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"Method parameter {item!r} in {text!r} needs the form key=value, e.g. deepcache:interval=3.")
        kwargs[key.strip()] = _value(value.strip())
    try:
        return METHODS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"Bad parameters for method {name!r} in {text!r}: {err}.") from None


def _target(text: str) -> float:
    from diffaccel.validate import at_least

    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"Speed-up target {text!r} is not a number (e.g. profile:prof.json@2.0).") from None
    return at_least(value, f"Speed-up target {text!r}", 1.0, "e.g. target@2.0 for twice as fast.")


def parse_config(spec: str) -> EvalConfig:
    """Parse one config spec (see the module doc); raise ValueError naming the choices."""
    from diffaccel.methods.base import METHODS
    from diffaccel.presets import PRESETS

    spec = spec.strip()
    if spec == BASELINE:
        return EvalConfig(spec)
    if spec in PRESETS:
        return EvalConfig(spec, preset=spec)
    if spec.startswith("profile:"):
        path, at, target = spec[len("profile:"):].rpartition("@")
        if not at or not path:
            raise ValueError(f"Config {spec!r}: write profile:PATH@SPEEDUP, e.g. profile:prof.json@2.0.")
        return EvalConfig(spec, profile=path, target_speedup=_target(target))
    if spec.startswith("target@"):
        return EvalConfig(spec, target_speedup=_target(spec[len("target@"):]))
    preset, at, path = spec.partition("@")
    if at and preset in PRESETS:
        if not path:
            raise ValueError(f"Config {spec!r}: write PRESET@PATH, e.g. fast@p.json (a profile from `diffaccel profile`).")
        return EvalConfig(spec, preset=preset, profile=path)
    try:
        return EvalConfig(spec, methods=[_method(part) for part in spec.split("+")])
    except KeyError as err:
        raise ValueError(
            f"Unknown config {spec!r} (no method {err.args[0]!r}). Use baseline, a preset ({', '.join(PRESETS)}), "
            f"methods joined by + ({', '.join(sorted(METHODS))}, e.g. deepcache:interval=3), "
            "profile:PATH@SPEEDUP, target@SPEEDUP or PRESET@PROFILE_PATH."
        ) from None


def parse_configs(text: str) -> list[EvalConfig]:
    """Split a comma-separated list of specs; the baseline is added (first) if missing.

    Method parameters also use commas, so a part shaped ``key=value`` continues the previous
    spec: ``baseline,deepcache:interval=3,branch=1,fast`` is three specs.
    """
    configs, current = [], ""
    for part in text.split(","):
        starts_new = "=" not in part.split(":", 1)[0] or part.startswith(("profile:", "target@"))
        if current and starts_new:
            configs.append(current)
            current = part
        else:
            current = f"{current},{part}" if current else part
    if current:
        configs.append(current)
    parsed = [parse_config(c) for c in configs]
    if not any(c.is_baseline for c in parsed):
        parsed.insert(0, parse_config(BASELINE))  # fidelity and speed-up are measured against it
    names = [c.name for c in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"Configs must be distinct, got {', '.join(names)}.")
    return sorted(parsed, key=lambda c: not c.is_baseline)  # baseline first: others compare to it

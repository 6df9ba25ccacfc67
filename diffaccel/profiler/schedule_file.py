"""The schedule file written by ``diffaccel schedule``: the chosen method configs, as JSON.

    methods = load_schedule("s.json")          # method configs, ready for accelerate
    pipe = diffaccel.accelerate(pipe, methods=methods)

DeepCache's full steps are stored as normalised times, so the file also works at other step
counts (re-plan with ``accelerate(pipe, profile=..., target_speedup=...)`` to keep the exact
speed-up there: the number of full steps is what sets it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from diffaccel.profiler.profile import ProfileError, write_json_atomic

SCHEDULE_FORMAT = "diffaccel-schedule"
SCHEDULE_VERSION = 1


def save_schedule(path, profile, chosen, plans, request: dict, steps: int) -> Path:
    data = {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION, "model": profile.model,
            "pipeline": profile.pipeline, "fingerprint": profile.fingerprint, "planned_for_steps": steps,
            "request": request, "chosen": chosen.describe(), "candidates": [p.describe() for p in plans]}
    path = Path(path)
    write_json_atomic(path, data)
    return path


def load_schedule(path) -> list:
    """Method configs of a schedule file (the chosen plan, with the methods it counts on, e.g. TextCache)."""
    from diffaccel.methods.base import METHODS

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_schedule needs the path of a schedule file, got {type(path).__name__} {path!r}.")
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(f"Schedule file {str(path)!r} does not exist; write one with `diffaccel schedule P.json --out {path}`.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as err:
        raise ProfileError(f"Schedule file {str(path)!r} is corrupted or not a file ({err}).") from None
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_FORMAT or data.get("version") != SCHEDULE_VERSION:
        raise ProfileError(f"{path} is not a version-{SCHEDULE_VERSION} diffaccel schedule file.")
    methods = []
    try:
        for config in [*data["chosen"].get("with", []), data["chosen"]["config"]]:
            config = dict(config)
            name = config.pop("method")
            methods.append(METHODS[name](**config))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ProfileError(f"Schedule file {str(path)!r} is corrupted: its chosen method config cannot be read "
                           f"({type(err).__name__}: {err}). Write it again with `diffaccel schedule`.") from None
    for method in methods:
        method.validate()
    return methods

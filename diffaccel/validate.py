"""Parameter checks shared by every method config, planner and command.

Each check returns the value when it is acceptable and otherwise raises ``ValueError`` with one
line naming the parameter, the allowed values, what was given and, where it helps, what to do.
Numbers must be real numbers (``True`` is not 1) and finite: nan and inf are refused everywhere,
because every comparison with nan is False and would otherwise slip through range checks.
Output paths are checked here too, before a command's expensive work starts, and written
atomically (:func:`write_atomic`).
"""
from __future__ import annotations

import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Collection


def _hint(hint: str) -> str:
    return f" {hint}" if hint else ""


def is_real(value: Any) -> bool:
    """A finite int or float (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(value: Any, what: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}.{_hint(hint)}")
    return value


def positive_int(value: Any, what: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.{_hint(hint)}")
    return value


def non_negative_int(value: Any, what: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}.{_hint(hint)}")
    return value


def fraction(value: Any, what: str, low: float = 0.0, high: float = 1.0, *, inclusive_high: bool = True,
             hint: str = "") -> float:
    """A number in [low, high] (or [low, high) with ``inclusive_high=False``)."""
    ok = is_real(value) and low <= value and (value <= high if inclusive_high else value < high)
    if not ok:
        bound = "]" if inclusive_high else ")"
        raise ValueError(f"{what} must be a number in [{low:g}, {high:g}{bound}, got {value!r}.{_hint(hint)}")
    return float(value)


def at_least(value: Any, what: str, low: float, hint: str = "") -> float:
    """A finite number >= ``low``."""
    if not (is_real(value) and value >= low):
        raise ValueError(f"{what} must be a finite number >= {low:g}, got {value!r}.{_hint(hint)}")
    return float(value)


def boolean(value: Any, what: str) -> bool:
    """True or False only: a string such as "no" would otherwise count as True."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}.")
    return value


def one_of(value: Any, choices: Collection, what: str, hint: str = "") -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}.{_hint(hint)}")
    return value


def time_range(value: Any, what: str) -> None:
    """None, or (low, high) normalised times with 0 <= low < high <= 1."""
    if value is None:
        return
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(is_real(v) for v in value)
    if not ok or not (0.0 <= value[0] < value[1] <= 1.0):
        raise ValueError(
            f"{what} must be (low, high) normalised times with 0 <= low < high <= 1 (1 = pure noise), got {value!r}; "
            "e.g. (0.1, 0.8) reuses in the middle of the trajectory."
        )


def int_triple(value: Any, what: str, odd: bool) -> None:
    """Three positive ints for (frames, height, width); odd ones when ``odd`` (centred windows)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 and (v % 2 == 1 or not odd) for v in value)
    if not ok:
        need = "odd positive ints (tiles, centred)" if odd else "positive ints (tokens)"
        raise ValueError(f"{what} must be 3 {need} for (frames, height, width), got {value!r}; "
                         f"for images use 1 frame, e.g. (1, 3, 3)")


def window(value: Any, what: str) -> None:
    """A (t, h, w) window of odd tile counts, or a list of them (one per head)."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)):
        for head, per_head in enumerate(value):
            int_triple(per_head, f"{what}[head {head}]", odd=True)
    else:
        int_triple(value, what, odd=True)


# ---- output paths: checked before any work, written atomically --------------------------------
def output_file(path: Any, what: str) -> Path:
    """A file a command will write (overwriting it is fine): refused now, before the expensive
    work, when it is a folder, lies under a file, or its folder cannot be written."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{what} must be a file path, got {path!r}.")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a folder; give a file path such as {str(p / 'out.json')!r}.")
    if p.exists() and not p.is_file():
        raise ValueError(f"{what} {str(p)!r} exists and is not a regular file; give another path.")
    _can_create_in(p.parent, what, p)
    return p


def output_folder(path: Any, what: str) -> Path:
    """A folder a command will write into (created when missing): refused now when it is a file,
    lies under a file, or cannot be written."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{what} must be a folder path, got {path!r}.")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is an existing file, not a folder; give a folder path (it is created if missing).")
    _can_create_in(p if p.is_dir() else p.parent, what, p)
    return p


def _can_create_in(folder: Path, what: str, target: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {str(target)!r} cannot be created: {str(existing)!r} is a file, not a folder.")
    if not _writable(existing):
        raise ValueError(f"{what} {str(target)!r} cannot be written: no permission to write in {str(existing)!r}; "
                         "choose a folder you can write to.")


def _writable(folder: Path) -> bool:
    """Tried, not guessed: os.access says yes to root on read-only mounts and pseudo file systems."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def write_atomic(path: Any, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` a temporary file beside ``path``, then rename it to ``path``: an interrupted
    or failed write leaves the old file (or none) and no temporary behind. The temporary keeps
    ``path``'s extension, so writers that pick the format from it (PNG, GIF) still can."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

"""The redundancy Profile: what changes how much between steps, for one model, as versioned JSON.

A profile is measured once per model (``diffaccel profile``) and reused for every step count and
scheduler: statistics are indexed by the *normalised time* (t / T_train or sigma, 1 = noise) of
the profiled steps, and :meth:`Profile.cumulative` turns them into "change accumulated since
pure noise" as a function of time, so the change between any two times of another schedule can
be read off by interpolation.

Layout of the JSON (``version`` 1)::

    {"format": "diffaccel-profile", "version": 1,
     "model": "tiny-sd", "pipeline": "StableDiffusionPipeline", "family": "unet",
     "fingerprint": {...adapter.fingerprint()...},
     "times": [t_0, ..., t_{S-1}],                   # normalised time of each profiled step
     "modules": [{"name": "down_blocks.0", "kind": "block"}, ...],
     "stats": {"rel_l1": {"mean": [[...]], "std": [[...]]}, "cosine": ..., "residual_rel_l1": ...},
                                                      # [step][module], null at step 0
     "costs": {"call": F, "modules": {path: flops}, "calls_per_step": 1, "denoiser_share": 0.9,
               ...each planner's entries, e.g. DeepCache's "deepcache_saved": {skip branch: flops}},
     "measured": {"prompts": 8, "steps": 25, "scheduler": "DDIMScheduler", ...},
     # optional (absent in older files, which still load; planners then fall back to drift):
     "reuse_error": {"deepcache": {"0": {"mean": [[e_age1, ..., e_ageK], ...], "std": ...}},  # [step][age-1]
                     "sigma": [[t, sigma], ...]},      # the scheduler's noise level over normalised time
     "calibration": {"deepcache": {"pairs": [[predicted_error, psnr_db], ...], ...}}}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffaccel.validate import is_real, write_atomic

PROFILE_FORMAT = "diffaccel-profile"
PROFILE_VERSION = 1
METRICS = ("rel_l1", "cosine", "residual_rel_l1", "residual_cosine")


class ProfileError(ValueError):
    """A profile that cannot be used: unreadable, unknown version, or made for another model."""


@dataclass
class Profile:
    model: str
    pipeline: str
    family: str
    fingerprint: dict
    times: list[float]
    modules: list[dict]
    stats: dict[str, dict[str, list]]
    costs: dict
    measured: dict = field(default_factory=dict)
    version: int = PROFILE_VERSION
    reuse_error: dict = field(default_factory=dict)  # measured output error of reuse (reuse_error.py)
    calibration: dict = field(default_factory=dict)  # (predicted error, measured PSNR) per method
    # Results planners derive from this profile (fitted constants), kept for its lifetime, not saved.
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- lookup ------------------------------------------------------------------------
    def module_index(self, name: str) -> int:
        for i, m in enumerate(self.modules):
            if m["name"] == name:
                return i
        raise KeyError(f"profile of {self.model} has no module {name!r}; it has {[m['name'] for m in self.modules]}")

    def series(self, module: str, metric: str = "rel_l1", what: str = "mean") -> list[float | None]:
        """Per-step values of ``metric`` for ``module`` (None at step 0: nothing to compare with)."""
        j = self.module_index(module)
        return [row[j] for row in self.stats[metric][what]]

    def kind_series(self, kind: str, metric: str = "rel_l1") -> list[float | None]:
        """Per-step mean of ``metric`` over all modules of ``kind`` (e.g. every cross attention)."""
        cols = [j for j, m in enumerate(self.modules) if m["kind"] == kind]
        if not cols:
            return []
        out = []
        for row in self.stats[metric]["mean"]:
            vals = [row[j] for j in cols if row[j] is not None]
            out.append(sum(vals) / len(vals) if vals else None)
        return out

    def cumulative(self, values: list[float | None]) -> "Cumulative":
        return Cumulative(self.times, values)

    def drift(self, module: str, metric: str = "rel_l1") -> "Cumulative":
        return Cumulative(self.times, self.series(module, metric))

    # ---- compatibility -----------------------------------------------------------------
    def check_matches(self, adapter) -> None:
        """Raise ProfileError naming the differences if the profile was made for another architecture."""
        mine, theirs = _plain(self.fingerprint), _plain(adapter.fingerprint())
        if mine == theirs:
            return
        diffs = [k for k in sorted(set(mine) | set(theirs)) if k != "config" and mine.get(k) != theirs.get(k)]
        a, b = mine.get("config", {}), theirs.get("config", {})
        diffs += [f"config.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        shown = ", ".join(f"{d}: profile {_get(mine, d)!r} vs model {_get(theirs, d)!r}" for d in diffs[:4])
        raise ProfileError(
            f"This profile was measured on {self.model} ({self.pipeline}), a different architecture from the "
            f"{adapter.name} given ({shown}{', ...' if len(diffs) > 4 else ''}). Profile this model with "
            "`diffaccel profile MODEL --out profile.json` and use that file."
        )

    # ---- persistence -------------------------------------------------------------------
    def to_json(self) -> dict:
        data = {"format": PROFILE_FORMAT, **asdict(self)}
        del data["memo"]
        data["stats"] = {m: {k: [[_round(v) for v in row] for row in rows] for k, rows in s.items()} for m, s in self.stats.items()}
        data["reuse_error"] = _round_all(self.reuse_error)
        return data

    def save(self, path) -> Path:
        path = Path(path)
        write_json_atomic(path, self.to_json())
        return path


class Cumulative:
    """Change accumulated from the start of the trajectory, as a piecewise-linear function of time.

    ``values[i]`` is the change measured between profiled steps i-1 and i (times decrease). The
    change between two times of *another* schedule is ``at(t_b) - at(t_a)``; outside the profiled
    range the edge rate (change per unit time) is extended.
    """

    def __init__(self, times: list[float], values: list[float | None]):
        self.times = [float(t) for t in times]
        steps = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
        self.cum = [0.0]
        for v in steps[1:]:
            self.cum.append(self.cum[-1] + v)

    def _rate(self, i: int) -> float:
        dt = self.times[i - 1] - self.times[i]
        return (self.cum[i] - self.cum[i - 1]) / dt if dt > 0 else 0.0

    def at(self, t: float) -> float:
        ts, cum = self.times, self.cum
        if len(ts) < 2:
            return 0.0
        if t >= ts[0]:
            return -(t - ts[0]) * self._rate(1)
        if t <= ts[-1]:
            return cum[-1] + (ts[-1] - t) * self._rate(len(ts) - 1)
        for i in range(1, len(ts)):
            if t >= ts[i]:
                span = ts[i - 1] - ts[i]
                w = (ts[i - 1] - t) / span if span > 0 else 1.0
                return cum[i - 1] + w * (cum[i] - cum[i - 1])
        return cum[-1]

    def on(self, times: list[float]) -> list[float]:
        return [self.at(t) for t in times]


def load_profile(path_or_profile, adapter=None) -> Profile:
    """Load and validate a profile file (or pass a Profile through); check it fits ``adapter``."""
    if isinstance(path_or_profile, Profile):
        profile = path_or_profile
        check_contents(profile, f"the Profile of {profile.model}")
    elif not isinstance(path_or_profile, (str, os.PathLike)):
        raise TypeError(f"profile must be a path to a profile JSON (from `diffaccel profile MODEL --out p.json`) or a "
                           f"diffaccel Profile, got {type(path_or_profile).__name__} {path_or_profile!r}.")
    else:
        path = Path(path_or_profile)
        if not path.is_file():
            raise ProfileError(f"Profile file {str(path)!r} does not exist. Create one with `diffaccel profile MODEL --out {path}`.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ProfileError(f"Profile file {str(path)!r} is corrupted (not valid JSON: {err}). Re-create it with `diffaccel profile`.") from None
        profile = from_json(data, str(path))
    if adapter is not None:
        profile.check_matches(adapter)
    return profile


def from_json(data, where: str = "profile") -> Profile:
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{where} is not a diffaccel profile (no \"format\": \"{PROFILE_FORMAT}\"). Create one with `diffaccel profile`.")
    version = data.get("version")
    if version != PROFILE_VERSION:
        raise ProfileError(
            f"{where} has profile format version {version!r}; this diffaccel reads version {PROFILE_VERSION}. "
            "Re-create the profile with this diffaccel (`diffaccel profile`) or use the diffaccel that wrote it."
        )
    names = ("model", "pipeline", "family", "fingerprint", "times", "modules", "stats", "costs")
    missing = [n for n in names if n not in data]
    if missing:
        raise ProfileError(f"{where} is corrupted: missing {', '.join(missing)}. Re-create it with `diffaccel profile`.")
    profile = Profile(**{n: data[n] for n in names}, measured=data.get("measured", {}), version=version,
                      reuse_error=data.get("reuse_error") or {}, calibration=data.get("calibration") or {})
    check_times(profile.times, where)
    steps, cols = len(profile.times), len(profile.modules)
    for metric, s in profile.stats.items():
        rows = s.get("mean") if isinstance(s, dict) else None
        if not isinstance(rows, list) or len(rows) != steps or any(not isinstance(r, list) or len(r) != cols for r in rows):
            raise ProfileError(f"{where} is corrupted: stats[{metric!r}] is not a {steps} x {cols} table (steps x modules).")
    for skip_branch, table in (profile.reuse_error.get("deepcache") or {}).items():
        rows = table.get("mean") if isinstance(table, dict) else None
        if not isinstance(rows, list) or len(rows) != steps or any(not isinstance(r, list) or not r for r in rows):
            raise ProfileError(f"{where} is corrupted: reuse_error of DeepCache skip branch {skip_branch} is not a {steps}-step "
                               "table (steps x ages). Re-create it with `diffaccel profile`.")
    if "rel_l1" not in profile.stats or not isinstance(profile.costs.get("call"), (int, float)):
        raise ProfileError(f"{where} is corrupted: it lacks rel_l1 statistics or the per-call cost.")
    check_contents(profile, where)
    return profile


def check_contents(profile: Profile, where: str) -> None:
    """The numbers planners rely on: step times that run from noise down, positive costs."""
    check_times(profile.times, where)
    call, share = profile.costs.get("call"), profile.costs.get("denoiser_share", 1.0)
    if not (is_real(call) and call > 0):
        raise ProfileError(f"{where} is corrupted: costs.call (FLOPs of one denoiser call) must be a positive number, "
                           f"got {call!r}. Re-create it with `diffaccel profile`.")
    if not (is_real(share) and 0.0 < share <= 1.0):
        raise ProfileError(f"{where} is corrupted: costs.denoiser_share (the denoiser's share of wall time) must be in "
                           f"(0, 1], got {share!r}. Re-create it with `diffaccel profile`.")


def check_times(times, where: str) -> None:
    """Reversed or constant times would not fail anywhere: the planners would read the change
    between steps backwards (or as zero) and pick a far worse schedule without a word."""
    real = isinstance(times, list) and len(times) >= 2 and all(is_real(t) and 0.0 <= t <= 1.0 for t in times)
    if not real:
        raise ProfileError(f"{where} is corrupted: times must list at least 2 normalised step times in [0, 1], got "
                           f"{str(times)[:80]}. Re-create it with `diffaccel profile`.")
    if any(b > a for a, b in zip(times, times[1:])) or not times[0] > times[-1]:
        raise ProfileError(f"{where} is corrupted: its step times must run from noise (1) down to 0, never increasing and "
                           f"not all equal, got {_short(times)}. Re-create it with `diffaccel profile`.")


def _short(values: list) -> str:
    return str(values) if len(values) <= 6 else f"[{', '.join(map(str, values[:3]))}, ..., {', '.join(map(str, values[-2:]))}]"


def write_json_atomic(path: Path, data) -> None:
    """Write then rename, so an interrupted or failed run never leaves a half-written file."""
    text = json.dumps(data, indent=1, allow_nan=False)  # fails (nan) before anything is written
    write_atomic(path, lambda tmp: tmp.write_text(text))


def _round(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return float(f"{v:.5g}")


def _round_all(obj):
    if isinstance(obj, float) or obj is None:
        return _round(obj)
    if isinstance(obj, dict):
        return {k: _round_all(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round_all(v) for v in obj]
    return obj


def _plain(obj):
    """Fingerprints compared as JSON would store them (tuples become lists)."""
    return json.loads(json.dumps(obj, default=str))


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d

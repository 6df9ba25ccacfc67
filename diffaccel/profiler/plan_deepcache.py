"""DeepCache planner: how many full steps a target needs, and which steps they are."""
from __future__ import annotations

import math

from diffaccel.profiler.plan_common import Plan, UnreachableTarget, wall_speedup
from diffaccel.profiler.profile import Profile, ProfileError

def deepcache_source(profile: Profile, branch: int) -> str:
    """The recorded block whose output the cached deep path hands to the shallow path."""
    ups = [m["name"] for m in profile.modules if m["kind"] == "block" and m["name"].startswith("up_blocks.")]
    depth = branch // 3
    index = len(ups) - 2 - depth
    return f"up_blocks.{index}" if index >= 0 else "mid_block"


def deepcache_staleness(cum: list[float], full: list[int]) -> float:
    total, last = 0.0, 0
    fulls = set(full)
    for s in range(len(cum)):
        if s in fulls:
            last = s
        else:
            total += cum[s] - cum[last]
    return total


def choose_full_steps(cum: list[float], k: int) -> list[int]:
    """The k full steps (step 0 included) minimising summed staleness: DP over segment starts."""
    n = len(cum)
    k = max(1, min(k, n))
    prefix = [0.0]
    for c in cum:
        prefix.append(prefix[-1] + c)

    def seg(f, g):  # cost of steps f+1..g-1 served by full step f
        return (prefix[g] - prefix[f + 1]) - (g - f - 1) * cum[f]

    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(k + 1)]  # best[j][f]: j full steps chosen, the last at f
    back = [[-1] * (n + 1) for _ in range(k + 1)]
    best[1][0] = 0.0
    for j in range(2, k + 1):
        for g in range(j - 1, n):
            for f in range(j - 2, g):
                if best[j - 1][f] < inf:
                    v = best[j - 1][f] + seg(f, g)
                    if v < best[j][g]:
                        best[j][g], back[j][g] = v, f
    last = min(range(n), key=lambda f: best[k][f] + seg(f, n) if best[k][f] < inf else inf)
    steps, j = [], k
    while last >= 0 and j >= 1:
        steps.append(last)
        last, j = back[j][last], j - 1
    return sorted(steps)


def plan_deepcache(profile: Profile, times: list[float], target: float | None, branch: int = 0,
                   full_steps: list[int] | None = None) -> Plan:
    """DeepCache plan for ``times``; ``full_steps`` evaluates a given schedule instead of choosing."""
    from diffaccel.methods.deepcache import DeepCache

    saved = profile.costs.get("deepcache_saved", {}).get(str(branch))
    if saved is None:
        raise ProfileError(f"The profile has no DeepCache costs for branch {branch} (branches: {sorted(profile.costs.get('deepcache_saved', {}))}).")
    full, n = float(profile.costs["call"]), len(times)
    cost = lambda k: k * full + (n - k) * (full - saved)  # noqa: E731
    if full_steps is None:
        k = max((k for k in range(1, n + 1) if n * full / cost(k) >= target - 1e-9), default=None)
        if k is None:
            raise UnreachableTarget(f"DeepCache reaches at most {n * full / cost(1):.2f}x here")
        cum = profile.drift(deepcache_source(profile, branch)).on(times)
        full_steps = choose_full_steps(cum, k)
    else:
        full_steps = sorted({0, *full_steps})
        cum = profile.drift(deepcache_source(profile, branch)).on(times)
    speedup = n * full / cost(len(full_steps))
    error = deepcache_staleness(cum, full_steps) * saved / full
    config = DeepCache(branch=branch, schedule=[float(times[s]) for s in full_steps])
    computed = [s in set(full_steps) for s in range(n)]
    return Plan("deepcache", config, speedup, wall_speedup(profile, speedup), error, computed)



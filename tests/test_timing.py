"""Timing logic on injected timings: when rounds stop, spread, busy-machine warnings, the
FLOPs-ideal flag. No clock is read here: every time is given."""
import pytest

from diffaccel.evaluation import report, timing
from diffaccel.evaluation.timing import TimingPlan


def scripted_rounds(series: dict[str, list[float]], plan: TimingPlan, seconds_per_round: float = 1.0):
    """Run timing_rounds with ``run`` returning the next scripted time per config and a fake clock."""
    feeds = {name: iter(values) for name, values in series.items()}
    calls = []

    def run(name):
        calls.append(name)
        value = next(feeds[name])
        return {"e2e": value, "denoiser": value / 2}

    def clock():  # each run takes an equal share of a round's seconds
        return len(calls) * seconds_per_round / len(series)

    times, reason = timing.timing_rounds(list(series), run, plan, clock=clock)
    return times, reason, calls


def test_steady_timings_stop_after_the_minimum_rounds():
    series = {"baseline": [1.00, 1.01, 0.99] + [1.0] * 30, "fast": [0.50, 0.51, 0.50] + [0.5] * 30}
    times, reason, calls = scripted_rounds(series, TimingPlan(min_rounds=3))
    assert reason == "stable" and len(times["baseline"]["e2e"]) == 3 and len(times["fast"]["denoiser"]) == 3
    assert calls[:4] == ["baseline", "fast", "fast", "baseline"]  # interleaved, order rotated every round


def test_noisy_timings_take_more_rounds_until_the_median_settles():
    noisy = [1.0, 1.6, 0.9, 1.3, 1.0, 1.0, 1.01, 0.99, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] + [1.0] * 20
    times, reason, _ = scripted_rounds({"baseline": noisy, "fast": [0.5] * 35}, TimingPlan(min_rounds=3, budget_s=1e9))
    n = len(times["baseline"]["e2e"])
    assert reason == "stable" and 3 < n < 25
    assert timing.is_stable(times["baseline"]["e2e"], 0.05) and not timing.is_stable(noisy[:n - 1], 0.05)


def test_the_time_budget_and_the_round_cap_end_an_unsettled_run():
    chaos = [1.0, 2.0] * 40
    _, reason, calls = scripted_rounds({"a": chaos, "b": chaos}, TimingPlan(min_rounds=3, budget_s=5.5))
    assert reason == "time budget" and len(calls) == 2 * 6  # 1 s per round: the round that passes 5.5 s is the last
    _, reason, calls = scripted_rounds({"a": chaos, "b": chaos}, TimingPlan(min_rounds=3, budget_s=1e9, max_rounds=7))
    assert reason == "max rounds" and len(calls) == 2 * 7
    _, reason, calls = scripted_rounds({"a": chaos, "b": chaos}, TimingPlan(min_rounds=4, budget_s=0))
    assert reason == "time budget" and len(calls) == 2 * 4  # budget 0: exactly the minimum


def test_median_interval_and_spread():
    assert timing.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # few samples: the whole range
    values = [float(v) for v in range(1, 26)]
    low, high = timing.median_interval(values)
    assert (low, high) == (8.0, 19.0)  # ranks 8 and 19 of 25 (1-based): the ~95% interval
    s = timing.spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["median_s"], s["q1_s"], s["q3_s"], s["iqr_s"], s["min_s"]) == (3.0, 2.0, 4.0, 2.0, 1.0)
    assert timing.spread([0.5])["iqr_s"] is None and report.latency_text(0.5, None) == "0.500 (1 round)"


def test_busy_reasons_name_spread_load_and_unsettled_medians():
    calm = {"baseline": [1.0, 1.0, 1.01], "fast": [0.5, 0.5, 0.51]}
    assert timing.busy_reasons(calm, "stable", [2.1, 2.3], threads=2, cpus=2, tolerance=0.05) == []
    spread = {"baseline": [1.0, 1.5, 2.0], "fast": [0.5, 0.5, 0.51]}
    reasons = timing.busy_reasons(spread, "time budget", [2.0], threads=2, cpus=2, tolerance=0.05)
    assert any(r.startswith("baseline: rounds spread over 33%") for r in reasons)
    assert any("medians not within +-5% after 3 rounds (time budget)" in r for r in reasons)
    loaded = timing.busy_reasons(calm, "stable", [2.0, 6.4], threads=2, cpus=2, tolerance=0.05)
    assert loaded == ["load average 6.4 on 2 cores while timing with 2 threads"]
    one = timing.busy_reasons({"baseline": [1.0]}, "time budget", [3.0], threads=1, cpus=2, tolerance=0.05)
    assert one == ["load average 3.0 on 2 cores while timing with 1 thread"]  # one round: no spread to judge
    assert timing.busy_reasons(calm, "stable", [], threads=2, cpus=2, tolerance=0.05) == []  # no load average here


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="At least one timing round"):
        TimingPlan(min_rounds=0)
    with pytest.raises(ValueError, match="timing budget"):
        TimingPlan(budget_s=float("nan"))


def entry(median, iqr, flops, denoiser_flops):
    spread = {"median_s": median, "iqr_s": iqr, "min_s": median * 0.95, "q1_s": 0, "q3_s": 0}
    return {"e2e": spread, "denoiser": spread, "flops": flops, "denoiser_flops": denoiser_flops,
            "flops_saved_estimate": None, "e2e_s": [median], "denoiser_s": [median]}


def test_a_speedup_above_the_flops_ideal_is_flagged_everywhere_it_is_printed():
    base = entry(1.0, 0.02, 100, 80)
    honest = report.speed_summary(entry(0.5, 0.01, 50, 30), base)  # ideal 2x end to end, 2.67x denoiser
    assert not honest["above_ideal"] and honest["speedup"] == 2.0 and honest["ideal_speedup"] == 2.0
    too_fast = report.speed_summary(entry(0.2, 0.01, 50, 30), base)  # 5x where FLOPs allow 2x
    assert too_fast["above_ideal"]
    assert report.speedup_text(too_fast["speedup"], too_fast["ideal_speedup"]) == "5.00x (above FLOPs ideal 2.00x)"
    assert report.speedup_text(2.0, 2.0) == "2.00x"
    assert report.latency_text(0.5, 0.01) == "0.500 (2%)"


def test_busy_results_carry_a_warning_line():
    results = {"timing": {"busy": ["load average 6.4 on 2 cores while timing with 2 threads"]}}
    assert report.timing_warning(results).startswith("Timings unreliable, the machine was busy: load average 6.4")
    assert report.timing_warning({"timing": {"busy": []}}) is None


def test_grid_captions_carry_the_flags():
    from diffaccel.commands.demo import caption

    base = entry(1.0, 0.02, 100, 80)
    results = {"timing": {"busy": []}, "configs": {
        "baseline": {"speed": report.speed_summary(base, base)},
        "fast": {"speed": report.speed_summary(entry(0.2, 0.01, 50, 30), base), "psnr": 31.25}}}
    assert caption("fast", results) == "fast\n5.00x IQR 5%\n> FLOPs ideal\n31.2 dB"
    results["timing"]["busy"] = ["load average 6.4 on 2 cores while timing with 2 threads"]
    assert caption("baseline", results) == "baseline\n1.00x? IQR 2%\n"

"""``diffaccel schedule P.json --target-speedup 2``: pick the schedule that meets a target."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("profile", help="profile JSON from `diffaccel profile`")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-speedup", type=float, help="wanted speed-up in denoiser FLOPs, e.g. 2")
    goal.add_argument("--max-error", type=float, help="fastest schedule whose predicted error (the profile's error units) stays below this")
    goal.add_argument("--min-psnr", type=float, help="fastest schedule whose predicted PSNR vs the unaccelerated output "
                      "(calibrated when profiling) is at least this many dB; a method whose PSNR was measured "
                      "(verified StepCache schedules) goes before one whose PSNR is fitted")
    parser.add_argument("--steps", type=int, help="plan for this many steps (default: the profiled count)")
    parser.add_argument("--out", help="schedule JSON to write (default: print only)")


def main(args) -> int:
    from diffaccel.profiler.calibrate_psnr import plan_for_min_psnr, predicted_psnr
    from diffaccel.profiler.profile import load_profile
    from diffaccel.profiler.schedule import plan_all, plan_for_max_error, step_times
    from diffaccel.profiler.schedule_file import save_schedule
    from diffaccel.validate import output_file

    if args.out:
        output_file(args.out, "--out")  # before planning and printing: a bad path leaves nothing behind
    profile = load_profile(args.profile)
    steps = len(step_times(profile, args.steps))
    if args.target_speedup is not None:
        chosen, plans = plan_all(profile, args.target_speedup, args.steps)
        request = {"target_speedup": args.target_speedup}
    elif args.min_psnr is not None:
        chosen, plans = plan_for_min_psnr(profile, args.min_psnr, args.steps)
        request = {"min_psnr": args.min_psnr}
    else:
        chosen, plans = plan_for_max_error(profile, args.max_error, args.steps)
        request = {"max_error": args.max_error}
    print(f"{profile.model} ({profile.pipeline}), {steps} steps")
    print(f"{'method':<16}{'speed-up':>10}{'wall':>8}{'error':>10}{'PSNR':>8}  schedule")
    for plan in plans:
        mark = "*" if plan is chosen else " "
        print(f"{mark}{plan.method:<15}{plan.speedup:>9.2f}x{plan.wall_speedup:>7.2f}x{plan.error:>10.4f}"
              f"{_db(predicted_psnr(profile, plan)):>8}  {_summary(plan)}")
    print(f"predicted speed-up: {chosen.speedup:.2f}x denoiser FLOPs, {chosen.wall_speedup:.2f}x wall ({chosen.method})")
    value = predicted_psnr(profile, chosen)
    if chosen.psnr is not None:
        print(f"measured PSNR vs the unaccelerated output: {_db(value)} dB (pooled over the profile's verification "
              "prompts this schedule ran on; of its worst seed set where it was validated on more)")
    elif value is not None:
        calibrated = profile.calibration[chosen.method].get("steps")
        note = f" (calibrated at {calibrated} steps)" if calibrated and calibrated != steps else ""
        print(f"predicted PSNR vs the unaccelerated output: {_db(value)} dB{note}")
    if args.out:
        print(f"wrote {save_schedule(args.out, profile, chosen, plans, request, steps)}")
    return 0


def _db(value) -> str:
    return "-" if value is None else ("inf" if value == float("inf") else f"{value:.1f}")


def _summary(plan) -> str:
    from diffaccel.profiler.schedule import summary

    return summary(plan) + "".join(f" + {m.name}" for m in plan.with_methods)

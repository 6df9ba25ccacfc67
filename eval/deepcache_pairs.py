"""Per-prompt view of schedule_eval's equal-cost DeepCache rows (trained tiny-sd, 20 DDIM steps).

For N = 2, 3, 4: uniform full steps every N vs the shipped profile's plan with the same number of
full steps, PSNR against the baseline on the same 8 held-out prompts as eval/schedule_eval.py.

    python eval/deepcache_pairs.py      # ~15 s on one core
"""
import statistics

import torch

import diffaccel
from diffaccel.bundled.dataset import all_image_captions
from diffaccel.bundled.loader import bundled_dir, default_call_kwargs
from diffaccel.metrics import psnr
from diffaccel.profiler.plan_deepcache import plan_deepcache
from diffaccel.profiler.profile import load_profile


def main():
    torch.set_num_threads(1)
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs("tiny-sd")
    captions = all_image_captions("heldout")
    prompts = captions[::max(1, len(captions) // 8)][:8]
    pipe.scheduler.set_timesteps(kwargs["num_inference_steps"])
    times = [float(t) / 1000 for t in pipe.scheduler.timesteps]
    profile = load_profile(bundled_dir() / "tiny-sd" / "profile.json")
    schedules = {}
    for n in (2, 3, 4):
        uniform = list(range(0, len(times), n))
        planned = plan_deepcache(profile, times, None, full_steps=uniform)  # its predicted error
        cost_matched = plan_deepcache(profile, times, planned.speedup * 0.999)  # same number of full steps
        schedules[f"u{n}"], schedules[f"p{n}"] = uniform, [i for i, c in enumerate(cost_matched.computed) if c]
        print(f"N={n}: uniform {uniform} predicted {planned.error:.4f}; planned {schedules[f'p{n}']} predicted {cost_matched.error:.4f}")

    def generate(prompt):
        with torch.no_grad():
            out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(100), output_type="pt", **kwargs)
        return out.images.float().clamp(0, 1)

    values = {k: [] for k in schedules}
    for prompt in prompts:
        base = generate(prompt)
        for name, full in schedules.items():
            diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(schedule=full)])
            values[name].append(psnr(generate(prompt), base))
            diffaccel.disable(pipe)
    for n in (2, 3, 4):
        a, b = values[f"u{n}"], values[f"p{n}"]
        diff = [y - x for x, y in zip(a, b)]
        print(f"N={n}: uniform {statistics.mean(a):.2f} dB, planned {statistics.mean(b):.2f} dB; planned wins on "
              f"{sum(d > 0 for d in diff)}/{len(diff)} prompts; per-prompt difference {[round(d, 1) for d in diff]}; "
              f"standard error of the mean difference {statistics.stdev(diff) / len(diff) ** 0.5:.1f} dB")


if __name__ == "__main__":
    main()

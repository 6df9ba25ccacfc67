"""diffaccel under diffusers' context parallelism: every config on N ranks vs the same config in one process.

    torchrun --nproc_per_node 2 eval/context_parallel.py                       # 2 GPUs (NCCL), Ulysses and ring
    torchrun --nproc_per_node 2 eval/context_parallel.py --device cpu --modes ulysses   # CPU, gloo

Each rank builds the same random-weight Wan and Flux transformers (small, real architectures),
runs every preset and DiT method once without parallelism (the 1-process reference: no
collective is issued) and once under ``ContextParallelConfig(ulysses_degree=N)`` or
``(ring_degree=N)``, and rank 0 prints per config: max |CP - 1 process| against the same number
for the unaccelerated model (CP's own error), whether the ranks agree exactly, and whether the
decisions (computed / reused counts) equal the 1-process ones. Methods that cannot be exact
report their refusal. Ring needs an attention backend that returns the log-sum-exp (a GPU
backend such as flash / cuDNN; the native CPU path has none).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

SPARSE = dict(min_tokens=0, full_attention_fraction=0.0)
CONFIGS = {
    "quality": dict(preset="quality"), "balanced": dict(preset="balanced"), "fast": dict(preset="fast"),
    "adaptive_cache": dict(methods=[("adaptive_cache", dict(threshold=0.3, warmup=1, max_consecutive=2))]),
    "pab": dict(methods=[("pab", {})]),
    "faster_cache": dict(methods=[("faster_cache", dict(attention_interval=2, cfg_interval=2, cfg_range=(0.0, 1.0)))]),
    "sliding_tile": dict(methods=[("sliding_tile", dict(tile=(1, 4, 4), window=(1, 3, 3), **SPARSE))]),
    "mediator": dict(methods=[("mediator", SPARSE)]),
}


def build(name: str, device, dtype):
    import diffusers as D

    torch.manual_seed(0)
    if name == "wan":
        tr = D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                                     out_channels=16, text_dim=64, freq_dim=32, ffn_dim=256, num_layers=4,
                                     rope_max_seq_len=64)
        vae = D.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
        pipe = D.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                             scheduler=D.FlowMatchEulerDiscreteScheduler())
    else:
        tr = D.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                      attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                      pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
        vae = D.AutoencoderKL(block_out_channels=(8,), latent_channels=16, norm_num_groups=8, layers_per_block=1)
        pipe = D.FluxPipeline(scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                              text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def call(name: str, pipe, steps: int, device, dtype):
    g = torch.Generator("cpu").manual_seed(0)
    emb = lambda n, d, s: torch.randn(1, n, d, generator=torch.Generator("cpu").manual_seed(s)).to(device, dtype)  # noqa: E731
    kw = dict(num_inference_steps=steps, generator=g, output_type="latent", height=128, width=128)
    if name == "wan":
        kw.update(prompt_embeds=emb(16, 64, 1), negative_prompt_embeds=emb(16, 64, 2), guidance_scale=4.0, num_frames=9)
    else:
        kw.update(prompt_embeds=emb(16, 64, 1), pooled_prompt_embeds=emb(1, 32, 3)[:, 0], negative_prompt_embeds=emb(16, 64, 2),
                  negative_pooled_prompt_embeds=emb(1, 32, 4)[:, 0], true_cfg_scale=4.0)
    out = pipe(**kw)
    return (out.frames if hasattr(out, "frames") else out.images).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--models", default="wan,flux")
    p.add_argument("--modes", default="ulysses,ring")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    import diffaccel
    from diffusers import ContextParallelConfig

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.accelerator.device_count = lambda *a, **k: 1  # diffusers' CP divides by it (0 on a CPU-only box)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16

    def methods(case):
        case = dict(case)
        if "methods" in case:
            case["methods"] = [diffaccel.METHODS[n](**kw) for n, kw in case["methods"]]
        return case

    for name in args.models.split(","):
        for mode in args.modes.split(","):
            plain, sharded = build(name, device, dtype), build(name, device, dtype)
            if mode == "ring" and device.type == "cuda":  # ring merges partial results by their log-sum-exp
                for pipe in (plain, sharded):
                    pipe.transformer.set_attention_backend("_native_cudnn")
            try:
                sharded.transformer.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": world}))
                base_cp = call(name, sharded, args.steps, device, dtype)
            except Exception as err:  # noqa: BLE001 - e.g. ring without an LSE-returning backend
                if rank == 0:
                    print(f"{name} {mode}: the unaccelerated model does not run under CP here: {str(err)[:160]}")
                continue
            cp_error = (base_cp - call(name, plain, args.steps, device, dtype)).abs().max().item()
            if rank == 0:
                print(f"\n{name}, {mode} x{world}, {args.dtype}: CP's own error (unaccelerated) {cp_error:.2e}")
                print("| config | max abs CP - 1 process | ranks agree | decisions as 1 process |")
                print("| --- | --- | --- | --- |")
            for label, case in CONFIGS.items():
                try:
                    diffaccel.accelerate(sharded, **methods(case))
                except ValueError as err:
                    if rank == 0:
                        print(f"| {label} | refused: {str(err)[:110]} | | |")
                    continue
                out = call(name, sharded, args.steps, device, dtype)
                stats = diffaccel.stats(sharded)["methods"]
                diffaccel.accelerate(plain, **methods(case))
                ref = call(name, plain, args.steps, device, dtype)
                ref_stats = diffaccel.stats(plain)["methods"]
                gathered = [torch.empty_like(out) for _ in range(world)]
                dist.all_gather(gathered, out)
                same = all(torch.equal(gathered[0], g) for g in gathered)
                strip = lambda s: {m: {k: v for k, v in c.items() if k != "flops_saved"} for m, c in s.items()}  # noqa: E731
                if rank == 0:
                    print(f"| {label} | {(out - ref).abs().max().item():.2e} | {same} | {strip(stats) == strip(ref_stats)} |")
                diffaccel.disable(sharded)
                diffaccel.disable(plain)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

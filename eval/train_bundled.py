#!/usr/bin/env python
"""Train the bundled models (tiny-sd, tiny-dit, tiny-video) from scratch, offline.

    python eval/train_bundled.py --model all --out assets              # CUDA if present
    python eval/train_bundled.py --model tiny-sd --minutes 100 --vae-minutes 20 --device cpu

Order per model: its VAE (the image VAE is shared by tiny-sd and tiny-dit and trained
once), then the denoiser on latents of a pre-generated synthetic dataset (see
diffaccel/bundled/dataset.py), with a ~50-step LR warm-up then constant LR, EMA, bf16
autocast on CUDA, fixed seeds. Each stage checkpoints into --work every --ckpt-every
steps and at its end, so an interrupted run resumes where it stopped (the time budget
counts across resumes). At the end the diffusers pipeline folder is written to
--out/<name> (save_pretrained, safetensors), reloaded from there with its pipeline
class, and its prompt-following measured with the pixel analyser on unseen noise seeds,
separately for seen and held-out caption combinations -> --out/<name>/train_report.json.

Works from a checkout on PYTHONPATH without installing diffaccel (see import_bundled).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
NAMES = ("tiny-sd", "tiny-dit", "tiny-video")
EVAL_DATA_SEED = 777  # captions of the evaluation set (training data uses --seed)
EVAL_NOISE_SEED = 100_000  # generation seeds: far from any seed training uses
WARMUP_STEPS = 50
P_UNCOND = 0.1  # caption dropped -> the pipeline's "" embedding, for classifier-free guidance


def import_bundled():
    """diffaccel.bundled, also from a bare checkout on PYTHONPATH.

    diffaccel/__init__ imports diffaccel.kernels / diffaccel.pipelines, which exist only
    in an installed package (package-dir mapping). The bundled code needs neither, so
    without an install we register an empty `diffaccel` package over the source folder.
    """
    try:
        import diffaccel.bundled  # noqa: F401
    except Exception:  # ImportError, or anything else the full package needs and lacks
        for key in [k for k in sys.modules if k == "diffaccel" or k.startswith("diffaccel.")]:
            del sys.modules[key]
        package = types.ModuleType("diffaccel")
        package.__path__ = [str(REPO / "diffaccel")]
        sys.modules["diffaccel"] = package
    from diffaccel.bundled import analyser, dataset, loader, models
    return analyser, dataset, loader, models


analyser, dataset, loader, models = import_bundled()


def log(*parts):
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ---------------------------------------------------------------- training loop

def save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_loop(tag, model, loss_fn, args, lr, budget_s, max_steps, extra_state=None):
    """Optimise `model` with loss_fn(model, step, generator) until the step or time budget
    is spent; resumes from --work/<tag>.pt. Returns (EMA model, state dict)."""
    ckpt = Path(args.work) / f"{tag}.pt"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    ema = copy.deepcopy(model).requires_grad_(False)
    state = {"step": 0, "elapsed_s": 0.0, "loss": None, "done": False, **(extra_state or {})}
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=args.device, weights_only=False)
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        state.update(saved["state"])
        log(f"{tag}: resumed at step {state['step']} ({state['elapsed_s']:.0f} s spent)")
    if state["done"]:
        return ema, state

    def checkpoint():
        save_atomic({"model": model.state_dict(), "ema": ema.state_dict(),
                     "opt": opt.state_dict(), "state": state}, ckpt)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.type == "cuda")
    model.train()
    start, recent = time.time() - state["elapsed_s"], []
    speed_from = (state["step"], time.time())
    while state["step"] < max_steps and state["elapsed_s"] < budget_s:
        step = state["step"]
        for group in opt.param_groups:  # short warm-up, then constant (DESIGN §6)
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS)
        # Batches depend only on (seed, step): a resumed run sees the same data.
        gen = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + step)
        with autocast:
            loss = loss_fn(model, step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        recent.append(loss.detach())
        state["step"] = step + 1
        state["elapsed_s"] = time.time() - start
        if state["step"] % args.log_every == 0:
            state["loss"] = float(torch.stack(recent).mean())
            recent = []
            rate = (state["step"] - speed_from[0]) / max(time.time() - speed_from[1], 1e-9)
            log(f"{tag}: step {state['step']} loss {state['loss']:.4f} {rate:.2f} steps/s")
        if state["step"] % args.ckpt_every == 0:
            checkpoint()
    if recent:
        state["loss"] = float(torch.stack(recent).mean())
    run_steps = state["step"] - speed_from[0]
    state["steps_per_s"] = run_steps / max(time.time() - speed_from[1], 1e-9) if run_steps else None
    state["done"] = True
    checkpoint()
    log(f"{tag}: done, {state['step']} steps in {state['elapsed_s']:.0f} s, loss {state['loss']}")
    return ema, state


# ---------------------------------------------------------------- data

def image_pool(args):
    images, captions = dataset.make_images(args.pool, seed=args.seed, split="train")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x.to(args.device), captions


def video_pool(args):
    clips, captions = dataset.make_videos(args.video_pool, seed=args.seed, split="train")
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # B C T H W
    return x.to(args.device), captions


def batch_index(n, batch, gen, device):
    return torch.randint(0, n, (batch,), generator=gen, device=device)


# ---------------------------------------------------------------- VAEs

def kl_per_element(posterior):
    mean, logvar = posterior.mean, posterior.logvar
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def vae_loss_fn(pool, batch, kl_weight):
    """Pixel MSE weighted 5x on object pixels (they carry colour and shape but are ~15% of
    the image; DESIGN §6: a plain loss let the VAE shift colours), plus a small KL."""
    def loss_fn(vae, step, gen):
        x = pool[batch_index(len(pool), batch, gen, pool.device)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample.float()
        corner = x[(...,) + (slice(0, 1),) * (x.dim() - 2)]  # the background colour
        is_object = ((x - corner).abs().sum(1, keepdim=True) > 0.1).float()
        weighted = ((recon - x) ** 2 * (1.0 + 4.0 * is_object)).mean()
        return weighted + kl_weight * kl_per_element(posterior)
    return loss_fn


@torch.no_grad()
def encode_all(vae, pool, chunk=256):
    means = [vae.encode(pool[i:i + chunk]).latent_dist.mean.float() for i in range(0, len(pool), chunk)]
    return torch.cat(means)


@torch.no_grad()
def vae_reconstruction_following(vae, args, video):
    """Prompt-following of VAE reconstructions: the ceiling the denoiser can reach."""
    n = args.eval_n
    if video:
        clips, captions = dataset.make_videos(n, seed=EVAL_DATA_SEED)
        x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
    else:
        images, captions = dataset.make_images(n, seed=EVAL_DATA_SEED)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    vae.eval()
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 64].to(args.device)).latent_dist.mean).sample
                       for i in range(0, n, 64)]).float().clamp(-1, 1).add(1).div(2).cpu()
    recon = recon.permute(0, 2, 3, 4, 1) if video else recon.permute(0, 2, 3, 1)
    return analyser.prompt_following(list(recon.numpy()), captions, video=video)


def train_image_vae(args):
    """The AutoencoderKL shared by tiny-sd and tiny-dit; its scaling_factor set from data."""
    vae = models.build_image_vae().to(args.device)
    pool, captions = image_pool(args)
    ema, state = train_loop("image-vae", vae, vae_loss_fn(pool, args.vae_batch, args.kl_weight),
                            args, args.vae_lr, args.vae_minutes * 60, args.vae_steps)
    ema.eval()
    latents = encode_all(ema, pool)
    ema.register_to_config(scaling_factor=float(1.0 / latents.std()))
    state["scaling_factor"] = ema.config.scaling_factor
    state["reconstruction_following"] = vae_reconstruction_following(ema, args, video=False)
    log("image-vae reconstructions:", state["reconstruction_following"])
    return ema, state, latents * ema.config.scaling_factor, captions


def train_video_vae(args):
    """The AutoencoderKLWan of tiny-video; latents_mean / latents_std set from data."""
    vae = models.build_video_vae().to(args.device)
    pool, captions = video_pool(args)
    ema, state = train_loop("video-vae", vae, vae_loss_fn(pool, args.video_vae_batch, args.kl_weight),
                            args, args.vae_lr, args.vae_minutes * 60, args.vae_steps)
    ema.eval()
    latents = encode_all(ema, pool, chunk=64)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    ema.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    state["latents_mean"], state["latents_std"] = mean.tolist(), std.tolist()
    state["reconstruction_following"] = vae_reconstruction_following(ema, args, video=True)
    log("video-vae reconstructions:", state["reconstruction_following"])
    return ema, state, (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), captions


# ---------------------------------------------------------------- denoisers

@torch.no_grad()
def caption_table(name, pipe, captions, device):
    """Text embeddings exactly as the pipeline computes them, for every distinct caption
    and for "" (the unconditional branch); returns (table, mask or None, index per item)."""
    distinct = sorted(set(captions)) + [""]
    where = {c: i for i, c in enumerate(distinct)}
    if name == "tiny-sd":
        table, mask = pipe.encode_prompt(distinct, device, 1, False)[0], None
    elif name == "tiny-dit":
        table, mask, _, _ = pipe.encode_prompt(distinct, do_classifier_free_guidance=False,
                                               device=device, clean_caption=False)
    else:
        table, _ = pipe.encode_prompt(distinct, do_classifier_free_guidance=False,
                                      max_sequence_length=512, device=device)
        mask = None
    index = torch.tensor([where[c] for c in captions], device=device)
    return table.float(), mask, index


def denoiser_loss_fn(name, pipe, latents, table, mask, index, batch):
    uncond = len(table) - 1
    if name != "tiny-video":
        alphas_cumprod = pipe.scheduler.alphas_cumprod.to(latents.device, torch.float32)

    def loss_fn(model, step, gen):
        pick = batch_index(len(latents), batch, gen, latents.device)
        x0 = latents[pick]
        rows = torch.where(torch.rand(batch, generator=gen, device=x0.device) < P_UNCOND,
                           torch.full_like(pick, uncond), index[pick])
        context = table[rows]
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        if name == "tiny-video":  # flow matching: x_s = (1 - s) x0 + s noise, predict noise - x0
            sigma = torch.rand(batch, generator=gen, device=x0.device)
            xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
            pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=context).sample
            return torch.nn.functional.mse_loss(pred.float(), noise - x0)
        t = torch.randint(0, len(alphas_cumprod), (batch,), generator=gen, device=x0.device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # epsilon prediction, DDPM forward process
        if name == "tiny-sd":
            pred = model(xt, t, encoder_hidden_states=context).sample
        else:
            pred = model(xt, encoder_hidden_states=context, encoder_attention_mask=mask[rows],
                         timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return torch.nn.functional.mse_loss(pred.float(), noise)
    return loss_fn


def denoiser_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def train_model(name, args, vaes):
    """Train one bundled model's denoiser (and its VAE if not yet done); write its folder."""
    video = name == "tiny-video"
    key = "video" if video else "image"
    if key not in vaes:
        vaes[key] = train_video_vae(args) if video else train_image_vae(args)
    vae, vae_state, latents, captions = vaes[key]
    pipe = models.build_pipeline(name, vae=copy.deepcopy(vae).cpu(), seed=args.seed).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    table, mask, index = caption_table(name, pipe, captions, args.device)
    model = denoiser_of(pipe)
    batch = args.video_batch if video else args.batch
    lr = args.unet_lr if name == "tiny-sd" else args.dit_lr
    ema, state = train_loop(name, model, denoiser_loss_fn(name, pipe, latents, table, mask, index, batch),
                            args, lr, args.minutes * 60, args.steps)
    model.load_state_dict(ema.state_dict())  # ship the EMA weights
    model.eval()
    out = Path(args.out) / loader.BUNDLED_MODELS[name].folder
    pipe.to("cpu").save_pretrained(out, safe_serialization=True)
    report = {"model": name, "batch": batch, "lr": lr, "denoiser": state, "vae": vae_state}
    return out, report


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(name, folder, args):
    """Reload the saved folder with its pipeline class and measure prompt-following on
    unseen noise seeds: seen caption combinations and held-out ones, separately."""
    import diffusers

    info = loader.BUNDLED_MODELS[name]
    pipe = getattr(diffusers, info.pipeline_class).from_pretrained(str(folder)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    call = loader.default_call_kwargs(name)
    video = info.num_frames is not None
    results = {}
    for split in dataset.SPLITS:
        make = dataset.make_videos if video else dataset.make_images
        _, captions = make(args.eval_n, seed=EVAL_DATA_SEED, split=split)
        outputs = []
        for i in range(0, len(captions), args.eval_batch):
            chunk = captions[i:i + args.eval_batch]
            gens = [torch.Generator(args.device).manual_seed(EVAL_NOISE_SEED + i + j)
                    for j in range(len(chunk))]
            result = pipe(chunk, generator=gens, output_type="np", **call)
            outputs.extend(list(result.frames if video else result.images))
        results["seen_captions" if split == "train" else "heldout_captions"] = \
            analyser.prompt_following(outputs, captions, video=video)
        if split == "train" and args.samples:
            save_samples(outputs[:16], folder / "samples.png", video)
    chance = {k: v for k, v in analyser.CHANCE.items() if k in results["seen_captions"]}
    return {"prompt_following": results, "chance": chance, "call_kwargs": call,
            "eval_data_seed": EVAL_DATA_SEED, "eval_noise_seeds_from": EVAL_NOISE_SEED}


def save_samples(outputs, path, video):
    from PIL import Image

    rows = [np.concatenate(list(o), axis=1) if video else o for o in outputs]
    grid = np.concatenate(rows, axis=0 if video else 1)
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(path)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all", choices=NAMES + ("all",))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--out", default=str(REPO / "assets"), help="pipeline folders go to OUT/<name>")
    p.add_argument("--work", default=str(REPO / ".train"), help="checkpoints (resume from here)")
    p.add_argument("--minutes", type=float, default=90.0, help="time budget per denoiser")
    p.add_argument("--vae-minutes", type=float, default=20.0, help="time budget per VAE")
    p.add_argument("--steps", type=int, default=10**9, help="step cap per denoiser")
    p.add_argument("--vae-steps", type=int, default=10**9, help="step cap per VAE")
    p.add_argument("--batch", type=int, default=None, help="image denoiser batch (512 cuda, 64 cpu)")
    p.add_argument("--video-batch", type=int, default=None, help="video denoiser batch (256 cuda, 16 cpu)")
    p.add_argument("--vae-batch", type=int, default=None, help="image VAE batch (512 cuda, 32 cpu)")
    p.add_argument("--video-vae-batch", type=int, default=None, help="video VAE batch (128 cuda, 4 cpu)")
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--dit-lr", type=float, default=5e-4)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--pool", type=int, default=20000, help="training images generated up front")
    p.add_argument("--video-pool", type=int, default=4000, help="training clips generated up front")
    p.add_argument("--eval-n", type=int, default=200, help="evaluation samples per caption split")
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", action="store_true", help="also write OUT/<name>/samples.png")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    # On a GPU these models are launch-bound: a larger batch costs little time per step.
    for key, gpu, cpu in (("batch", 512, 64), ("video_batch", 256, 16), ("vae_batch", 512, 32),
                          ("video_vae_batch", 128, 4)):
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    Path(args.work).mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    environment = {"device": str(args.device), "torch": torch.__version__, "python": platform.python_version(),
                   "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
                   "cpu_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    names = NAMES if args.model == "all" else (args.model,)
    vaes, failed = {}, []
    for name in names:
        started = time.time()
        try:
            folder, report = train_model(name, args, vaes)
            report.update(evaluate(name, folder, args))
        except Exception as error:  # keep going: the other models still get trained
            import traceback

            traceback.print_exc()
            failed.append(name)
            log(f"{name}: FAILED: {error!r}")
            continue
        report["environment"] = environment
        report["wall_s_this_run"] = time.time() - started
        report["args"] = {k: str(v) for k, v in vars(args).items()}
        (folder / "train_report.json").write_text(json.dumps(report, indent=2))
        log(f"{name}: prompt-following {json.dumps(report['prompt_following'])}")
    if failed:
        log("failed:", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()

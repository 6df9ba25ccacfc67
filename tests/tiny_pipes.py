"""Tiny real diffusers pipelines for every supported family, built from config dicts.

No hub, no tokenizer files: text encoders and tokenizers are left out and the pipelines are
called with precomputed prompt embeddings (``run(name, pipe, seed)``), which is what every
one of these pipeline classes accepts. Latents are returned (``output_type="latent"``) so a
test spends its time in the denoiser, the part diffaccel changes.
"""
from __future__ import annotations

import torch
import diffusers as D

TXT = 8  # text tokens


def _vae2d(latent_channels=4):
    return D.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                           up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels,
                           norm_num_groups=8, layers_per_block=1)


def _emb(batch, n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, dim, generator=g)


def build_sd(cls=D.StableDiffusionPipeline):
    unet = D.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4 if cls is not D.StableDiffusionInpaintPipeline else 9,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=8)
    return cls(vae=_vae2d(), text_encoder=None, tokenizer=None, unet=unet,
               scheduler=D.DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)


def build_sdxl(cls=D.StableDiffusionXLPipeline):
    unet = D.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=8, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 16,
        use_linear_projection=True)
    return cls(vae=_vae2d(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
               unet=unet, scheduler=D.EulerDiscreteScheduler())


def build_pixart():
    tr = D.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=16, norm_num_groups=8)
    return D.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_vae2d(), transformer=tr,
                                 scheduler=D.DPMSolverMultistepScheduler())


def build_dit():
    tr = D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                 sample_size=8, patch_size=2, norm_num_groups=8)
    return D.DiTPipeline(transformer=tr, vae=_vae2d(), scheduler=D.DDIMScheduler(steps_offset=1, clip_sample=False))


def build_sd3():
    tr = D.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16,
                                 dual_attention_layers=(0,))
    return D.StableDiffusion3Pipeline(transformer=tr, scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=_vae2d(),
                                      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                      text_encoder_3=None, tokenizer_3=None)


def build_flux():
    tr = D.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    return D.FluxPipeline(scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=_vae2d(4), text_encoder=None,
                          tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)


def build_cogvideox():
    tr = D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                       sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=TXT)
    vae = D.AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                   norm_num_groups=2, temporal_compression_ratio=4)
    return D.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                               scheduler=D.CogVideoXDDIMScheduler(steps_offset=1, clip_sample=False))


def build_latte():
    tr = D.LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                   norm_type="ada_norm_single", num_embeds_ada_norm=1000, caption_channels=16,
                                   video_length=3)
    return D.LattePipeline(tokenizer=None, text_encoder=None, vae=_vae2d(), transformer=tr,
                           scheduler=D.DDIMScheduler(steps_offset=1, clip_sample=False))


def build_hunyuan():
    tr = D.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                          patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                          rope_axes_dim=(2, 2, 4), guidance_embeds=True)
    vae = D.AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                      norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4)
    return D.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae,
                                  scheduler=D.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                  text_encoder_2=None, tokenizer_2=None)


def build_wan():
    tr = D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=32)
    vae = D.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return D.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=D.FlowMatchEulerDiscreteScheduler(),
                         transformer=tr)


def build_ltx():
    tr = D.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                      num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                      num_layers=2, caption_channels=16)
    vae = D.AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                  decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                  decoder_layers_per_block=(1, 1, 1, 1, 1),
                                  spatio_temporal_scaling=(True, True, False, False),
                                  decoder_spatio_temporal_scaling=(True, True, False, False),
                                  decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                  upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1)
    return D.LTXPipeline(scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=tr)


BUILDERS = {
    "sd": build_sd,
    "sd_img2img": lambda: build_sd(D.StableDiffusionImg2ImgPipeline),
    "sd_inpaint": lambda: build_sd(D.StableDiffusionInpaintPipeline),
    "sdxl": build_sdxl,
    "pixart": build_pixart,
    "dit": build_dit,
    "sd3": build_sd3,
    "flux": build_flux,
    "cogvideox": build_cogvideox,
    "latte": build_latte,
    "hunyuan": build_hunyuan,
    "wan": build_wan,
    "ltx": build_ltx,
}


def build(name: str):
    torch.manual_seed(0)
    pipe = BUILDERS[name]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # from_pretrained does this; models built from configs start in train mode
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(name: str, batch: int = 1, steps: int = 3, seed: int = 0, guidance: float = 4.0) -> dict:
    """Arguments for one short call of the tiny pipeline ``name`` (prompt embeddings, latents out)."""
    g = torch.Generator().manual_seed(seed)
    kw: dict = dict(num_inference_steps=steps, generator=g, output_type="latent")
    e = lambda n=TXT, d=16, s=1: _emb(batch, n, d, seed * 7 + s)
    if name in ("sd", "sd_img2img", "sd_inpaint"):
        kw.update(prompt_embeds=e(), negative_prompt_embeds=e(s=2), guidance_scale=guidance, height=16, width=16)
        if name != "sd":
            img = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 100))
            kw.update(image=img, strength=0.9)
            kw.pop("height"), kw.pop("width")
            if name == "sd_inpaint":
                kw.update(mask_image=torch.ones(batch, 1, 16, 16), height=16, width=16)
    elif name == "sdxl":
        kw.update(prompt_embeds=e(), negative_prompt_embeds=e(s=2), pooled_prompt_embeds=_emb(batch, 1, 16, 3)[:, 0],
                  negative_pooled_prompt_embeds=_emb(batch, 1, 16, 4)[:, 0], guidance_scale=guidance, height=16, width=16)
    elif name == "pixart":
        mask = torch.ones(batch, TXT)
        kw.update(prompt_embeds=e(), prompt_attention_mask=mask, negative_prompt_embeds=e(s=2),
                  negative_prompt_attention_mask=mask, guidance_scale=guidance, height=16, width=16,
                  use_resolution_binning=False, negative_prompt=None)
    elif name == "dit":
        kw = dict(class_labels=list(range(batch)), num_inference_steps=steps, generator=g, output_type="latent",
                  guidance_scale=guidance)
    elif name == "sd3":
        kw.update(prompt_embeds=e(), negative_prompt_embeds=e(s=2), pooled_prompt_embeds=_emb(batch, 1, 8, 3)[:, 0],
                  negative_pooled_prompt_embeds=_emb(batch, 1, 8, 4)[:, 0], guidance_scale=guidance, height=16, width=16)
    elif name == "flux":
        kw.update(prompt_embeds=e(), pooled_prompt_embeds=_emb(batch, 1, 8, 3)[:, 0], height=16, width=16,
                  negative_prompt_embeds=e(s=2), negative_pooled_prompt_embeds=_emb(batch, 1, 8, 4)[:, 0],
                  true_cfg_scale=guidance if guidance > 1 else 1.0)
    elif name == "cogvideox":
        kw.update(prompt_embeds=e(), negative_prompt_embeds=e(s=2), guidance_scale=guidance, height=16, width=16,
                  num_frames=9)
    elif name == "latte":
        kw.update(prompt_embeds=e(), negative_prompt_embeds=e(s=2), guidance_scale=guidance, height=16, width=16,
                  video_length=3, decode_chunk_size=1, mask_feature=False, negative_prompt=None)
    elif name == "hunyuan":
        kw.update(prompt_embeds=e(), pooled_prompt_embeds=_emb(batch, 1, 8, 3)[:, 0],
                  prompt_attention_mask=torch.ones(batch, TXT), negative_prompt_embeds=e(s=2),
                  negative_pooled_prompt_embeds=_emb(batch, 1, 8, 4)[:, 0],
                  negative_prompt_attention_mask=torch.ones(batch, TXT),
                  true_cfg_scale=guidance if guidance > 1 else 1.0, height=16, width=16, num_frames=5)
    elif name == "wan":
        kw.update(prompt_embeds=e(), negative_prompt_embeds=e(s=2), guidance_scale=guidance, height=16, width=16,
                  num_frames=5)
    elif name == "ltx":
        mask = torch.ones(batch, TXT)
        kw.update(prompt_embeds=e(), prompt_attention_mask=mask, negative_prompt_embeds=e(s=2),
                  negative_prompt_attention_mask=mask, guidance_scale=guidance, height=32, width=32, num_frames=9)
    return kw


def run(name: str, pipe, **kw) -> torch.Tensor:
    out = pipe(**call_kwargs(name, **kw))
    for attr in ("images", "frames"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0]


def observe(pipe):
    """Attach a diffaccel session with no method (accelerate() refuses methods=[]): the call
    state is tracked and outputs stay plain. Returns ``pipe``."""
    from diffaccel.pipelines import detect
    from diffaccel.state import attach

    attach(pipe, detect(pipe), [])
    return pipe

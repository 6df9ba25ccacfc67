"""Builders of the three bundled pipelines, from config dicts, with the real diffusers classes.

- tiny-sd:    StableDiffusionPipeline  (UNet2DConditionModel with cross-attention,
              AutoencoderKL 32x32 -> 4x8x8, frozen random CLIPTextModel, word-level CLIPTokenizer)
- tiny-dit:   PixArtAlphaPipeline      (PixArtTransformer2DModel, the same AutoencoderKL,
              frozen random T5EncoderModel, word-level T5Tokenizer)
- tiny-video: WanPipeline              (WanTransformer3DModel: full 3D attention over
              (T, H, W) tokens, AutoencoderKLWan 9x32x32 -> 4x5x8x8, frozen random
              UMT5EncoderModel, word-level T5Tokenizer)

Sizes follow DESIGN §6: 32x32 pixels, 8x8 latents, narrow channels, few heads, so that
thousands of training steps fit in minutes. The text encoders stay random and frozen:
every caption word gets a distinct embedding and the denoiser learns to read them.
Tokenizers are built offline from the dataset's vocabulary (whole words only).

>>> pipe = build_pipeline("tiny-sd")
>>> type(pipe).__name__
'StableDiffusionPipeline'
"""

from __future__ import annotations

import torch

from .dataset import all_image_captions, all_video_captions

TEXT_WIDTH = 64  # hidden size of every bundled text encoder
MAX_TOKENS = 16  # longest caption is 11 words, + start/end tokens

VAE_CONFIG = dict(  # AutoencoderKL: 32x32x3 <-> 8x8x4 (two downsamplings)
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=16,
    scaling_factor=1.0,  # replaced by 1 / std of the trained VAE's latents
)
UNET_CONFIG = dict(  # attention_head_dim is the number of heads in this class (DESIGN §6)
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[32, 64, 64], norm_num_groups=16,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=2,
)
PIXART_CONFIG = dict(  # patch 1 on 8x8 latents: 64 tokens
    sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=6,
    num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
    caption_channels=TEXT_WIDTH, interpolation_scale=1, use_additional_conditions=False,
)
WAN_VAE_CONFIG = dict(  # 9x32x32x3 <-> 5x8x8x4: 2x temporal, 4x spatial compression
    base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True], scale_factor_temporal=2, scale_factor_spatial=4,
    latents_mean=[0.0] * 4, latents_std=[1.0] * 4,  # replaced by the trained VAE's statistics
)
WAN_CONFIG = dict(  # patch (1, 2, 2) on 5x8x8 latents: 80 tokens in one 3D attention
    patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=32, in_channels=4,
    out_channels=4, text_dim=TEXT_WIDTH, freq_dim=64, ffn_dim=256, num_layers=6,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
TEXT_ENCODER_LAYERS = 2
SD_SCHEDULER = dict(  # Stable Diffusion's noise schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)
PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                        beta_schedule="linear")
WAN_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)  # small latents need no shift


def caption_words() -> list[str]:
    """Every word of every caption either model family can be asked (train and held-out)."""
    captions = (all_image_captions("train") + all_image_captions("heldout")
                + all_video_captions("train") + all_video_captions("heldout"))
    return sorted({w for c in captions for w in c.split()})


def clip_tokenizer():
    """A CLIPTokenizer whose BPE merges turn each caption word into exactly one token.

    The merges are learned the way BPE learns them (most frequent adjacent pair first,
    ties by name) on the caption words until every word is one symbol, so that encoding
    replays them; check_whole_words confirms it.
    """
    from transformers import CLIPTokenizer

    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in caption_words()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in sorted({s for w in words for s in w}):
        vocab[symbol] = len(vocab)
    merges = []
    while any(len(w) > 1 for w in words):
        counts = {}
        for w in words:
            for pair in zip(w[:-1], w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        words = [merge_pair(w, best) for w in words]
    try:
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    except TypeError:  # tokenizers releases that want "a b" strings instead of pairs
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[" ".join(m) for m in merges],
                                  model_max_length=MAX_TOKENS)
    check_whole_words(tokenizer)
    return tokenizer


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def t5_tokenizer():
    """A T5Tokenizer (unigram) whose pieces are exactly the caption words."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in caption_words()]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    check_whole_words(tokenizer)
    return tokenizer


def check_whole_words(tokenizer) -> None:
    for word in caption_words():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise RuntimeError(f"{type(tokenizer).__name__}: word {word!r} became {ids}")


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def clip_text_encoder(tokenizer, seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=TEXT_ENCODER_LAYERS, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_WIDTH,
    )
    return frozen(CLIPTextModel(config))


def t5_text_encoder(tokenizer, umt5: bool = False, seed: int = 2):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=32, d_ff=2 * TEXT_WIDTH,
        num_layers=TEXT_ENCODER_LAYERS, num_heads=2, relative_attention_num_buckets=8,
        dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, is_encoder_decoder=False,
    )
    return frozen(model_class(config))


def build_image_vae(config: dict | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or VAE_CONFIG))


def build_video_vae(config: dict | None = None):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**(config or WAN_VAE_CONFIG))


def build_pipeline(name: str, vae=None, denoiser=None, seed: int = 0):
    """A fresh pipeline for a bundled name; pass a trained vae / denoiser to use them."""
    import diffusers

    torch.manual_seed(seed)
    if name == "tiny-sd":
        tokenizer = clip_tokenizer()
        return diffusers.StableDiffusionPipeline(
            vae=vae or build_image_vae(), text_encoder=clip_text_encoder(tokenizer),
            tokenizer=tokenizer, unet=denoiser or diffusers.UNet2DConditionModel(**UNET_CONFIG),
            scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    if name == "tiny-dit":
        tokenizer = t5_tokenizer()
        return diffusers.PixArtAlphaPipeline(
            tokenizer=tokenizer, text_encoder=t5_text_encoder(tokenizer), vae=vae or build_image_vae(),
            transformer=denoiser or diffusers.PixArtTransformer2DModel(**PIXART_CONFIG),
            scheduler=diffusers.DPMSolverMultistepScheduler(**PIXART_SCHEDULER))
    if name == "tiny-video":
        tokenizer = t5_tokenizer()
        return diffusers.WanPipeline(
            tokenizer=tokenizer, text_encoder=t5_text_encoder(tokenizer, umt5=True),
            vae=vae or build_video_vae(),
            transformer=denoiser or diffusers.WanTransformer3DModel(**WAN_CONFIG),
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**WAN_SCHEDULER))
    raise ValueError(f"unknown bundled model {name!r}; use tiny-sd, tiny-dit or tiny-video")

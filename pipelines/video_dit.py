"""Video DiT family: CogVideoX, Latte, HunyuanVideo, Wan, LTX-Video."""
from __future__ import annotations

from dataclasses import dataclass


from diffaccel.families import Family

from .base import Adapter, AttentionInfo, TokenGrid, TokenLayout, TokenSequence, call_arg
from .image_dit import _text_len


def _pair(p) -> tuple[int, int, int]:
    """(pt, ph, pw) from a config's patch sizes."""
    return tuple(int(v) for v in p)


@dataclass
class CogVideoXAdapter(Adapter):
    family = Family.VIDEO_DIT
    pipelines = ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline")
    # CogVideoX concatenates [text, video] before each full 3D attention.
    attention_rules = ((r"transformer_blocks\.\d+\.attn1", "joint"),)
    block_outputs = ("hidden_states", "encoder_hidden_states")
    text_projections = ("patch_embed.text_proj",)

    def blocks(self):
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.denoiser.transformer_blocks)]

    def token_sequence(self):
        # patch_embed returns [text, video] (positional embeddings already added inside it);
        # CogVideoX-5b's rotary table comes precomputed from the pipeline, one row per video token.
        return TokenSequence(enter=("patch_embed", "output"), exit="proj_out", call_tables=(("image_rotary_emb", 0),))

    def grid_from_call(self, args, kwargs):
        x = call_arg(args, kwargs, "hidden_states", 0)  # (B, F, C, H, W)
        cfg = self.denoiser.config
        p, pt = int(cfg.patch_size), int(cfg.patch_size_t or 1)
        return TokenGrid(-(-int(x.shape[1]) // pt), int(x.shape[3]) // p, int(x.shape[4]) // p, _text_len(args, kwargs))


@dataclass
class _ChannelsFirstVideo(Adapter):
    """Video DiTs taking latents (B, C, F, H, W)."""

    family = Family.VIDEO_DIT

    def patch(self) -> tuple[int, int, int]:
        cfg = self.denoiser.config
        return 1, int(cfg.patch_size), int(cfg.patch_size)

    def grid_from_call(self, args, kwargs):
        x = call_arg(args, kwargs, "hidden_states", 0)
        pt, ph, pw = self.patch()
        return TokenGrid(int(x.shape[2]) // pt, int(x.shape[3]) // ph, int(x.shape[4]) // pw, _text_len(args, kwargs, 2))


@dataclass
class LatteAdapter(_ChannelsFirstVideo):
    pipelines = ("LattePipeline",)
    blocks_keep_layout = False  # (b f) n d for spatial blocks, (b n) f d for temporal ones
    text_projections = ("caption_projection",)
    cross_text_stable = False  # the text is repeated per frame inside every forward
    attention_rules = (
        (r"transformer_blocks\.\d+\.attn1", "spatial"),
        (r"transformer_blocks\.\d+\.attn2", "cross"),
        (r"temporal_transformer_blocks\.\d+\.attn1", "temporal"),
    )

    def blocks(self):
        # Latte alternates one spatial and one temporal block.
        out = []
        for i, (s, t) in enumerate(zip(self.denoiser.transformer_blocks, self.denoiser.temporal_transformer_blocks)):
            out += [(f"transformer_blocks.{i}", s), (f"temporal_transformer_blocks.{i}", t)]
        return out

    def grid_from_call(self, args, kwargs):
        x = call_arg(args, kwargs, "hidden_states", 0)
        p = int(self.denoiser.config.patch_size)
        return TokenGrid(int(x.shape[2]), int(x.shape[3]) // p, int(x.shape[4]) // p, _text_len(args, kwargs, 2))

    def token_sequence(self):
        raise ValueError("Latte folds frames into the batch for its spatial blocks and regroups tokens by position "
                         "for its temporal blocks; use permute_once=False")

    def token_layout(self, info: AttentionInfo, grid: TokenGrid) -> TokenLayout:
        # Latte's spatial blocks attend within each frame; its temporal blocks along frames.
        if info.kind == "spatial":
            return TokenLayout(1, grid.height, grid.width)
        return super().token_layout(info, grid)


@dataclass
class HunyuanVideoAdapter(_ChannelsFirstVideo):
    pipelines = ("HunyuanVideoPipeline",)
    cfg_mode: str = "separate"
    text_position = "last"  # [video, text] in both dual- and single-stream blocks
    block_outputs = ("hidden_states", "encoder_hidden_states")
    attention_rules = (
        (r"transformer_blocks\.\d+\.attn", "joint"),
        (r"single_transformer_blocks\.\d+\.attn", "joint"),
    )

    def patch(self):
        cfg = self.denoiser.config
        return int(cfg.patch_size_t), int(cfg.patch_size), int(cfg.patch_size)

    def token_sequence(self):
        if getattr(self.denoiser.config, "image_condition_type", None) == "token_replace":
            # HunyuanVideo-I2V modulates the first frame's tokens (hidden_states[:, :first_frame_num_tokens])
            # differently inside every block: a position-dependent term tile order would scatter.
            raise ValueError("HunyuanVideo with image_condition_type='token_replace' (I2V) treats the first frame's "
                             "tokens apart inside every block; its tokens cannot be kept in tile order")
        # x_embedder returns the video tokens alone; rope returns (cos, sin), one row per token.
        return TokenSequence(enter=("x_embedder", "output"), exit="proj_out", tables=(("rope", 0),))

    def blocks(self):
        tr = self.denoiser
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(tr.transformer_blocks)] + [
            (f"single_transformer_blocks.{i}", b) for i, b in enumerate(tr.single_transformer_blocks)
        ]


@dataclass
class WanAdapter(_ChannelsFirstVideo):
    pipelines = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")
    text_projections = ("condition_embedder.text_embedder", "condition_embedder.image_embedder")
    cfg_mode: str = "separate"  # the pipeline calls the transformer once per branch
    attention_rules = ((r"blocks\.\d+\.attn1", "spatial"), (r"blocks\.\d+\.attn2", "cross"))

    def patch(self):
        return _pair(self.denoiser.config.patch_size)

    def token_sequence(self):
        # The patch embedding is a Conv3d flattened inline, so the first block's input is where the
        # token sequence first exists. rope returns (cos, sin) of shape (1, N, 1, D); Wan 2.2 TI2V
        # passes per-token timesteps (B, N), which also set the output modulation before proj_out.
        return TokenSequence(enter=("blocks.0", "input"), exit="proj_out", tables=(("rope", 1),),
                             call_tables=(("timestep", 1),))

    def blocks(self):
        return [(f"blocks.{i}", b) for i, b in enumerate(self.denoiser.blocks)]


@dataclass
class LTXVideoAdapter(Adapter):
    family = Family.VIDEO_DIT
    pipelines = ("LTXPipeline", "LTXImageToVideoPipeline")
    text_projections = ("caption_projection",)
    attention_rules = ((r"transformer_blocks\.\d+\.attn1", "spatial"), (r"transformer_blocks\.\d+\.attn2", "cross"))

    def blocks(self):
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.denoiser.transformer_blocks)]

    def token_sequence(self):
        # Latents arrive packed (B, N, C) and proj_in is token-wise; rope returns (cos, sin) of
        # shape (B, N, D); image-to-video passes per-token timesteps (B, N) (conditioning mask).
        return TokenSequence(enter=("proj_in", "output"), exit="proj_out", tables=(("rope", 1),),
                             call_tables=(("timestep", 1),))

    def grid_from_call(self, args, kwargs):
        # Latents arrive packed (B, N, C); the grid is passed alongside as keyword arguments.
        cfg = self.denoiser.config
        pt, p = int(cfg.patch_size_t), int(cfg.patch_size)
        f, h, w = (kwargs.get(k) for k in ("num_frames", "height", "width"))
        if f is None or h is None or w is None:
            x = call_arg(args, kwargs, "hidden_states", 0)
            return TokenGrid(1, 1, int(x.shape[1]), _text_len(args, kwargs))
        return TokenGrid(int(f) // pt, int(h) // p, int(w) // p, _text_len(args, kwargs))

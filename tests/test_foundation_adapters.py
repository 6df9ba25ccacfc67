"""detect(): the right adapter, block counts and attention classification for every family."""
import pytest
import torch

import tiny_pipes as T
from diffaccel.pipelines import TokenGrid, detect

# name -> (adapter class, family, blocks, {attention kind: count}, skip branches, cfg mode)
EXPECTED = {
    "sd": ("UNetAdapter", "unet", 5, {"spatial": 4, "cross": 4}, 3, "batched"),
    "sd_img2img": ("UNetAdapter", "unet", 5, {"spatial": 4, "cross": 4}, 3, "batched"),
    "sd_inpaint": ("UNetAdapter", "unet", 5, {"spatial": 4, "cross": 4}, 3, "batched"),
    "sdxl": ("UNetAdapter", "unet", 5, {"spatial": 8, "cross": 8}, 3, "batched"),
    "pixart": ("PixArtAdapter", "image_dit", 2, {"spatial": 2, "cross": 2}, 0, "batched"),
    "dit": ("DiTAdapter", "image_dit", 2, {"spatial": 2}, 0, "batched"),
    "sd3": ("SD3Adapter", "image_dit", 2, {"joint": 2, "spatial": 1}, 0, "batched"),
    "flux": ("FluxAdapter", "image_dit", 3, {"joint": 3}, 0, "separate"),
    "cogvideox": ("CogVideoXAdapter", "video_dit", 2, {"joint": 2}, 0, "batched"),
    "latte": ("LatteAdapter", "video_dit", 4, {"spatial": 2, "cross": 2, "temporal": 2}, 0, "batched"),
    "hunyuan": ("HunyuanVideoAdapter", "video_dit", 2, {"joint": 2}, 0, "separate"),
    "wan": ("WanAdapter", "video_dit", 2, {"spatial": 2, "cross": 2}, 0, "separate"),
    "ltx": ("LTXVideoAdapter", "video_dit", 2, {"spatial": 2, "cross": 2}, 0, "batched"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_detect_structure(name):
    cls, family, n_blocks, kinds, n_branches, cfg_mode = EXPECTED[name]
    adapter = detect(T.build(name))
    assert type(adapter).__name__ == cls
    assert adapter.family == family
    assert len(adapter.blocks()) == n_blocks
    found = {}
    for info in adapter.attention_modules():
        found[info.kind] = found.get(info.kind, 0) + 1
        assert adapter.denoiser.get_submodule(info.name) is info.module
        assert 0 <= info.block_index < n_blocks
    assert found == kinds
    assert len(adapter.skip_branches()) == n_branches
    assert adapter.cfg_mode == cfg_mode


def test_unet_levels_and_branches():
    adapter = detect(T.build("sd"))
    assert adapter.level_downsample() == {"down_blocks.0": 1, "down_blocks.1": 2, "mid_block": 2, "up_blocks.0": 2, "up_blocks.1": 1}
    ids = [(b.branch_id, b.down_block, b.layer, b.up_block) for b in adapter.skip_branches()]
    # block 0: one resnet + downsampler -> ids 0, 1; block 1: one resnet, no downsampler -> id 3
    assert ids == [(0, 0, 0, 1), (1, 0, 1, 1), (3, 1, 0, 0)]


def _capture_attention_lengths(pipe, adapter):
    """Run hooks recording the sequence length each classified attention module receives."""
    seen, handles = {}, []
    for info in adapter.attention_modules():
        def hook(module, args, kwargs, info=info):
            hidden = args[0] if args else kwargs["hidden_states"]
            text = kwargs.get("encoder_hidden_states")
            n = hidden.shape[1] + (text.shape[1] if info.kind == "joint" and text is not None else 0)
            seen.setdefault(info.name, n)
        handles.append(info.module.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


# Odd latent grids: 3 frames x 5 x 7 patches where the family has frames.
ODD_CALLS = {
    "pixart": dict(height=80, width=112),  # with vae_scale_factor 8 (set below): latent 10x14 -> 5x7 patches
    "sd3": dict(height=80, width=112),
    "cogvideox": dict(height=80, width=112, num_frames=9),  # VAE /8 -> 10x14, patch 2 -> 5x7, 3 latent frames
    "wan": dict(height=80, width=112, num_frames=9),  # VAE /8 -> 10x14, patch 2 -> 5x7; 3 latent frames
    "latte": dict(height=80, width=112, video_length=3),
    "ltx": dict(height=160, width=224, num_frames=17),
}


@pytest.mark.parametrize("name", list(ODD_CALLS))
def test_token_layout_matches_real_sequences(name):
    pipe = T.build(name)
    if name in ("pixart", "sd3", "latte"):
        pipe.vae_scale_factor = 8  # the tiny VAE downsamples by 1; output is latent, so only the factor matters
    adapter = detect(pipe)
    from diffaccel.api import session_of

    T.observe(pipe)
    seen, handles = _capture_attention_lengths(pipe, adapter)
    kwargs = T.call_kwargs(name, steps=2)
    kwargs.update(ODD_CALLS[name])
    pipe(**kwargs)
    grid = session_of(pipe).ctx.grid
    for h in handles:
        h.remove()
    assert grid is not None
    checked = 0
    for info in adapter.attention_modules():
        if info.kind == "cross" or info.name not in seen:
            continue
        assert adapter.token_layout(info, grid).seq_len == seen[info.name], (info.name, grid)
        checked += 1
    assert checked > 0


def test_odd_video_grid_is_3x5x7():
    for name, x in (("cogvideox", torch.zeros(1, 3, 4, 10, 14)), ("wan", torch.zeros(1, 4, 3, 10, 14)),
                    ("latte", torch.zeros(1, 4, 3, 10, 14)), ("hunyuan", torch.zeros(1, 4, 3, 10, 14))):
        adapter = detect(T.build(name))
        text = torch.zeros(1, 8, 16)
        grid = adapter.grid_from_call((x,), {"encoder_hidden_states": text, "timestep": torch.tensor([1])})
        assert (grid.frames, grid.height, grid.width, grid.text_tokens) == (3, 5, 7, 8), name


def test_layout_of_each_kind():
    adapter = detect(T.build("latte"))
    grid = TokenGrid(3, 5, 7, 8)
    by_kind = {info.kind: adapter.token_layout(info, grid) for info in adapter.attention_modules()}
    assert (by_kind["spatial"].frames, by_kind["spatial"].num_visual) == (1, 35)  # per-frame spatial blocks
    assert (by_kind["temporal"].frames, by_kind["temporal"].num_visual) == (3, 3)
    cog = detect(T.build("cogvideox"))
    layout = cog.token_layout(cog.attention_modules()[0], grid)
    assert (layout.seq_len, layout.text_position) == (3 * 5 * 7 + 8, "first")


def test_unet_odd_latent_levels():
    """A 13x11 latent: stride-2 convs give 7x6 at level 2; the layout must say so."""
    pipe = T.build("sd")
    adapter = detect(pipe)
    seen, handles = _capture_attention_lengths(pipe, adapter)
    sample, text = torch.randn(1, 4, 13, 11), torch.randn(1, 8, 16)
    args, kwargs = (sample, torch.tensor(10)), {"encoder_hidden_states": text}
    with torch.no_grad():
        pipe.unet(*args, **kwargs)
    for h in handles:
        h.remove()
    grid = adapter.grid_from_call(args, kwargs)
    for info in adapter.attention_modules():
        if info.kind == "spatial":
            assert adapter.token_layout(info, grid).seq_len == seen[info.name], info.name

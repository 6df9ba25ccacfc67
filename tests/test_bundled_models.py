"""Bundled pipelines: built with the real diffusers classes, saved, reloaded offline, run."""

import numpy as np
import pytest
import torch

from diffaccel.bundled import loader, models

PROMPTS = {"tiny-sd": "a red circle in the center on a black background",
           "tiny-dit": "a blue square at the top left on a white background",
           "tiny-video": "a green triangle moving left on a black background"}


def generate(pipe, name, steps=2):
    call = {**loader.default_call_kwargs(name), "num_inference_steps": steps}
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    result = pipe([PROMPTS[name]] * 2, generator=gens, output_type="np", **call)
    return result.frames if name == "tiny-video" else result.images


@pytest.mark.parametrize("name", list(loader.BUNDLED_MODELS))
def test_build_save_reload_generate(name, tmp_path):
    pipe = models.build_pipeline(name)
    assert type(pipe).__name__ == loader.BUNDLED_MODELS[name].pipeline_class
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / name)
    assert list((tmp_path / name).rglob("*.safetensors"))
    import diffusers

    reloaded = getattr(diffusers, loader.BUNDLED_MODELS[name].pipeline_class).from_pretrained(tmp_path / name)
    reloaded.set_progress_bar_config(disable=True)
    out = generate(reloaded, name)
    expected = (2, 9, 32, 32, 3) if name == "tiny-video" else (2, 32, 32, 3)
    assert out.shape == expected and np.isfinite(out).all()
    assert np.allclose(out, generate(pipe, name), atol=1e-5)  # reload changed nothing


def test_every_caption_word_is_one_token():
    for tokenizer in (models.clip_tokenizer(), models.t5_tokenizer()):
        models.check_whole_words(tokenizer)  # raises if not
        caption = "a red circle in the center on a black background"
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(caption.split()) and tokenizer.unk_token_id not in ids


def test_unknown_bundled_name_lists_valid_ones():
    with pytest.raises(ValueError, match="tiny-sd, tiny-dit, tiny-video"):
        loader.load_bundled("tiny-nope")


def shipped(name):
    """The shipped bundled pipeline, progress bars off (skips the test when it is not in assets/)."""
    if not (loader.bundled_dir() / name / "model_index.json").exists():
        pytest.skip(f"{name} not trained into {loader.bundled_dir()} yet (eval/gpu_train.sh)")
    pipe = loader.load_bundled(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", list(loader.BUNDLED_MODELS))
def test_shipped_bundled_model_loads_and_generates(name):
    pipe = shipped(name)
    out = generate(pipe, name)
    assert np.isfinite(out).all() and out.std() > 0.01


SHAPES = {"tiny-sd": (1, 32, 32, 3), "tiny-dit": (1, 32, 32, 3), "tiny-video": (1, 9, 32, 32, 3)}


@pytest.mark.parametrize("name", list(loader.BUNDLED_MODELS))
def test_a_prompt_alone_gives_the_bundled_models_own_output(name):
    import diffaccel

    pipe = shipped(name)
    steps = []
    hook = pipe.scheduler.__class__.step
    pipe.scheduler.step = lambda *a, **k: steps.append(1) or hook(pipe.scheduler, *a, **k)
    pick = (lambda o: o.frames) if name == "tiny-video" else (lambda o: o.images)
    own = pipe("a red circle", output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.asarray(pick(own)).shape == SHAPES[name]
    assert len(steps) == loader.BUNDLED_MODELS[name].steps  # 20, not the class's 50
    given = pipe("a red circle", output_type="np", generator=torch.Generator().manual_seed(0),
                 **loader.default_call_kwargs(name))
    assert np.array_equal(pick(own), pick(given))  # the defaults are exactly default_call_kwargs
    steps.clear()
    pipe("a red circle", num_inference_steps=3, output_type="latent")
    assert len(steps) == 3  # what the caller gives wins

    bundled = type(pipe)
    diffaccel.accelerate(pipe)  # its class swap subclasses the bundled class and keeps the defaults
    steps.clear()
    out = pipe("a red circle", output_type="np")
    assert np.asarray(pick(out)).shape == SHAPES[name] and len(steps) == loader.BUNDLED_MODELS[name].steps
    assert diffaccel.stats(pipe)["steps"] == loader.BUNDLED_MODELS[name].steps
    diffaccel.disable(pipe)
    assert type(pipe) is bundled and type(pipe).__name__ == loader.BUNDLED_MODELS[name].pipeline_class

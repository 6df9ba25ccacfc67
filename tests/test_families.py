"""The family registry is complete: every family has its adapters, every preset and every default
its methods read; a missing entry is a clear error. This is the test that fails when a new family
(an adapter file plus a diffaccel/families.py entry) forgets something."""
import dataclasses
import json

import pytest

import diffaccel
from diffaccel.families import FAMILIES, PRESET_NAMES, Family, family_spec, method_defaults
from diffaccel.methods.base import METHODS
from diffaccel.pipelines import ADAPTERS, supported_pipelines
from diffaccel.presets import preset_methods


@pytest.mark.parametrize("family", list(Family))
def test_every_family_is_registered_with_adapters(family):
    spec = family_spec(family)
    assert spec.family is family
    adapters = [a for a in ADAPTERS if a.family is family]
    assert adapters and all(a.pipelines for a in adapters)
    assert supported_pipelines()[family]


@pytest.mark.parametrize("family", list(Family))
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_family_has_every_preset(family, preset):
    methods = preset_methods(preset, family)
    assert methods, f"preset {preset} of {family} chooses no method"
    for method in methods:
        method.validate()
        method.check_family(family)


@pytest.mark.parametrize("family", list(Family))
def test_every_method_has_the_defaults_it_reads(family):
    for name, cls in METHODS.items():
        if family in cls.supported_families() and cls.family_defaults:
            defaults = cls().defaults_for(family)
            assert set(cls.family_defaults) <= set(defaults), (name, family)


def test_every_method_runs_on_some_family():
    for cls in METHODS.values():
        assert cls.supported_families(), cls.__name__


def test_a_missing_preset_or_default_is_a_clear_error(monkeypatch):
    spec = FAMILIES[Family.VIDEO_DIT]
    monkeypatch.setitem(FAMILIES, Family.VIDEO_DIT, dataclasses.replace(
        spec, presets={k: v for k, v in spec.presets.items() if k != "fast"}, method_defaults={}))
    with pytest.raises(ValueError, match=r"video_dit family has no 'fast' preset.*diffaccel/families.py"):
        preset_methods("fast", "video_dit")
    with pytest.raises(ValueError, match=r"video_dit family has no default tile, window for method 'sliding_tile'"):
        method_defaults("video_dit", "sliding_tile", ("tile", "window"))
    with pytest.raises(ValueError, match="Unknown model family 'audio'"):
        family_spec("audio")


def test_family_names_are_the_strings_profiles_and_stats_use():
    assert Family.UNET == "unet" and f"{Family.VIDEO_DIT}" == "video_dit"
    assert json.loads(json.dumps({"family": Family.IMAGE_DIT})) == {"family": "image_dit"}
    assert diffaccel.PRESETS["balanced"]["unet"] == diffaccel.PRESETS["balanced"][Family.UNET]


def test_method_classes_declare_capabilities_not_family_lists():
    with pytest.raises(TypeError, match="declare the Capability it `requires`"):
        @dataclasses.dataclass(frozen=True)
        class Legacy(diffaccel.Method):
            families = ("unet",)

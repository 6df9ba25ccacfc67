"""README's Python examples run as written: the API example on every bundled model, the rest as is."""
import contextlib
import io
import re
from pathlib import Path

import pytest

from diffaccel.bundled.loader import BUNDLED_MODELS, bundled_dir

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
SHOWN = 'load_bundled("tiny-dit")'  # the model the API example names; it must work with each


def run(code: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    return printed.getvalue()


def test_readme_has_the_api_example():
    assert sum(SHOWN in block for block in BLOCKS) == 1


@pytest.mark.parametrize("model", list(BUNDLED_MODELS))
def test_api_example_runs_on_each_bundled_model(model):
    if not (bundled_dir() / model / "model_index.json").is_file():
        pytest.skip(f"{model} is not in assets/ (eval/train_bundled.py makes it)")
    block = next(b for b in BLOCKS if SHOWN in b)
    printed = run(block.replace(SHOWN, f'load_bundled("{model}")'))
    assert "'steps': 20" in printed and "flops_saved_fraction" in printed  # stats of a 20-step call


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if SHOWN not in b])
def test_other_examples_run_as_written(index):
    run(BLOCKS[index])

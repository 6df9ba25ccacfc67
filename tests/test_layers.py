"""The import contracts in .importlinter hold (layers point one way; kernels and adapters stay
leaves), checked with import-linter on the package as it is installed.

diffaccel.kernels and diffaccel.pipelines live in the repository's kernels/ and pipelines/
folders (setuptools package-dir), which import-linter cannot see from diffaccel/. The check
runs on a copy of the sources laid out as the installed package.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def _installed_layout(tmp_path: Path) -> Path:
    package = tmp_path / "src" / "diffaccel"
    shutil.copytree(ROOT / "diffaccel", package, ignore=SKIP)
    for folder in ("kernels", "pipelines"):
        shutil.copytree(ROOT / folder, package / folder, ignore=SKIP)
    return package


def _lint(package: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-c",
                                                    "from importlinter.cli import lint_imports_command as c; c()"]
    return subprocess.run([*command, "--no-cache", str(ROOT / ".importlinter")], cwd=package.parent, text=True,
                          capture_output=True, env={"PYTHONPATH": str(package.parent), "PATH": ""}, timeout=300)


def test_import_contracts_hold(tmp_path):
    result = _lint(_installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("methods/deepcache.py", "\n\ndef _bad():\n    from diffaccel.api import accelerate  # noqa: F401\n",
     "diffaccel.methods.deepcache -> diffaccel.api"),
    ("kernels/mediator.py", "\nimport diffaccel.state  # noqa: E402,F401\n", "diffaccel.kernels.mediator -> diffaccel.state"),
    ("pipelines/base.py", "\n\ndef _bad():\n    import diffaccel.methods.pab  # noqa: F401\n",
     "diffaccel.pipelines.base -> diffaccel.methods.pab"),
], ids=["method-imports-api", "kernel-imports-core", "adapter-imports-method"])
def test_a_wrong_way_import_breaks_the_layers(tmp_path, module, line, broken):
    package = _installed_layout(tmp_path)
    path = package / module
    path.write_text(path.read_text() + line)
    result = _lint(package)
    assert result.returncode == 1
    assert broken in result.stdout


def test_eval_scripts_use_public_names_only():
    """eval/ scripts measure diffaccel as a user would run it: no private name of diffaccel (a module,
    function or attribute starting with "_") is imported or read there."""
    import ast

    bad = []
    for path in sorted((ROOT / "eval").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diffaccel":
                names = node.module.split(".") + [a.name for a in node.names]
                bad += [f"{path.name}:{node.lineno} {node.module}" for n in names if n.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_diffaccel"):
                bad.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not bad, bad

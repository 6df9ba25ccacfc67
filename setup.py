"""Which packages go into the wheel; everything else is in pyproject.toml.

Packages are found, not listed: a hand-written list silently drops a new subpackage from the
wheel while the editable install keeps working. The repository's top-level kernels/ and
pipelines/ folders install as diffaccel.kernels / diffaccel.pipelines, and assets/ (the
bundled trained models) as diffaccel.assets package data.
"""
from setuptools import find_packages, setup

MAPPED = {"diffaccel.kernels": "kernels", "diffaccel.pipelines": "pipelines"}

packages = find_packages(include=["diffaccel", "diffaccel.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages + ["diffaccel.assets"],
    package_dir={**MAPPED, "diffaccel.assets": "assets"},
    package_data={"diffaccel.assets": ["**/*"]},
)

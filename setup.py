"""The wheel's one build step (all metadata is in pyproject.toml): ship the checkout's shipped files as package data.

configs/ (model presets, training configs, stories, the byte tokenizer) and models/demo (the embedded default
model) stay where they are in the checkout; the wheel holds copies under onestory_jax/shipped/, in the same
layout, where onestory_jax/config_files.py (SHIPPED_DIR) finds them when it is installed. pyproject.toml says why
this is a build step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("configs", "models/demo")  # checkout folders, copied to onestory_jax/shipped/<same path>


class BuildPyWithShippedFiles(build_py):
    """build_py, then the SHIPPED folders copied afresh into the build's onestory_jax/shipped/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's own folders
            return
        for folder in SHIPPED:
            dest = Path(self.build_lib) / "onestory_jax" / "shipped" / folder
            shutil.rmtree(dest, ignore_errors=True)  # no stale file from an earlier build in the same build/
            shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildPyWithShippedFiles})

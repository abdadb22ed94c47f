"""The wheel: `pip install .` outside the checkout gets the presets, the byte tokenizer, the demo story and
the embedded default model as package data, and the console scripts; every third-party import is a declared
dependency, and the torch pins of pyproject.toml and the Makefile agree.

The wheel is built (no network: --no-build-isolation, --no-deps) from a copy of the files it is made of, so the
checkout gets no build/ folder.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHIPPED = "onestory_jax/shipped"  # where setup.py puts configs/ and models/demo in the wheel
SCRIPTS = {
    "onestory-sample": "onestory_jax.cli.sample:run",
    "onestory-train": "onestory_jax.cli.train:run",
    "onestory-convert": "onestory_jax.cli:convert",
}


def _files(folder: Path) -> list[str]:
    """Paths of the files under a checkout folder, relative to the checkout, without caches."""
    return sorted(str(p.relative_to(ROOT)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    """The wheel built from a copy of the checkout's packaged files."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("onestory_jax", "configs", "models/demo"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (built,) = (tmp / "dist").glob("onestory_jax-*.whl")
    with zipfile.ZipFile(built) as z:
        yield z


def test_wheel_ships_configs_tokenizer_story_and_demo_model(wheel):
    names = set(wheel.namelist())
    for key in (
        "configs/tiny.yaml",
        "configs/demo.yaml",
        "configs/wan2.1-i2v-14b-480p.yaml",
        "configs/train/tiny.yaml",
        "configs/stories/demo.yaml",
        "configs/tokenizers/bytes/tokenizer.json",
        "models/demo/onestory/config.yaml",
        "models/demo/tokenizer/tokenizer.json",
    ):
        assert f"{SHIPPED}/{key}" in names, key
    missing = [f for f in _files(ROOT / "configs") + _files(ROOT / "models" / "demo") if f"{SHIPPED}/{f}" not in names]
    assert not missing, missing


def test_wheel_holds_every_module(wheel):
    names = set(wheel.namelist())
    missing = [f for f in _files(ROOT / "onestory_jax") if f.endswith(".py") and f not in names]
    assert not missing, missing  # a subpackage without __init__.py would be left out by packages.find


def test_console_scripts_are_declared_and_importable(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == SCRIPTS
    for target in SCRIPTS.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_every_third_party_import_is_declared():
    """Each distribution that onestory_jax/ imports from is a dependency or in an extra (array_record was not)."""
    declared = {_norm(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    declared |= {_norm(Requirement(r).name) for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra}
    providers = packages_distributions()
    undeclared = {}
    for module in sorted(_imported_modules(ROOT / "onestory_jax")):
        dists = {_norm(d) for d in providers.get(module, [])}
        if not dists & declared:
            undeclared[module] = sorted(dists) or "not installed"
    assert not undeclared, undeclared


def test_torch_pins_agree():
    """The Makefile installs torch==X first; every extra asks for the same range, capped at X (pyproject.toml says why)."""
    (pin,) = re.findall(r"pip install -q (?:--no-compile )?torch==([\w.]+)", (ROOT / "Makefile").read_text())
    torch = {
        str(Requirement(r).specifier)
        for extra in PYPROJECT["project"]["optional-dependencies"].values()
        for r in extra
        if Requirement(r).name == "torch"
    }
    assert len(torch) == 1, torch
    (spec,) = torch
    assert f"<={pin}" in spec.split(","), (spec, pin)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules(package: Path) -> set[str]:
    """Top-level names of the third-party modules imported anywhere in `package` (inside functions too)."""
    found = set()
    for file in package.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"onestory_jax"}

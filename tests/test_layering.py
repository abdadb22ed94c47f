"""The package layering of docs/design.md: no module imports a layer above its own.

    CLIs, bench                      sample.py, train.py, bench/
    cli | studio                     (console scripts, the web studio; neither imports the other)
    sampling | training | eval       (siblings: none imports another)
    models, diffusion, data, convert
    errors, io, config, config_files, sharding, checkpoint, locking

Two checks per package: every module is imported in a fresh process whose importer refuses the
layers above (what runs at import time), and every import statement, those inside functions
included, is read from the source (what runs later).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIERS = [
    ("errors", "io", "config", "config_files", "sharding", "checkpoint", "locking"),
    ("models", "diffusion"),
    ("data", "convert"),  # data and convert read models (prompts, components); models never reads data
    ("sampling", "training", "eval"),
    ("cli", "studio"),
]
APART = (3, 4)  # tiers whose packages must not import one another
PACKAGES = [f"onestory_jax.{name}" for tier in TIERS for name in tier]


def blocked(package: str) -> tuple[str, ...]:
    """The packages `package` must not import: every higher tier, and its siblings in the tiers kept APART."""
    name = package.removeprefix("onestory_jax.")
    level = next(i for i, tier in enumerate(TIERS) if name in tier)
    above = [n for tier in TIERS[level + 1 :] for n in tier]
    siblings = [n for n in TIERS[level] if n != name] if level in APART else []
    return tuple(f"onestory_jax.{n}" for n in above + siblings)


# One interpreter imports the third-party libraries once, then forks a child per package, whose importer
# refuses the layers above (16 fresh interpreters each importing jax took 49 s of the suite).
IMPORT_EACH = """
import importlib, json, os, pkgutil, sys

import einops, flax.linen, grain, jax.numpy, numpy, optax, orbax.checkpoint, yaml  # no project module

class Refuse:
    def __init__(self, blocked):
        self.blocked = blocked

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in self.blocked):
            raise ImportError(f"{name} is above the layer under test")
        return None

def import_all(package, blocked):
    sys.meta_path.insert(0, Refuse(blocked))
    root = importlib.import_module(package)
    for m in pkgutil.walk_packages(getattr(root, "__path__", []), package + "."):
        importlib.import_module(m.name)

results = {}
for package, blocked in json.loads(sys.argv[1]).items():
    read, write = os.pipe()
    if (pid := os.fork()) == 0:
        os.close(read)
        try:
            import_all(package, tuple(blocked))
            message = ""
        except BaseException as e:
            message = f"{type(e).__name__}: {e}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        results[package] = f.read()
    os.waitpid(pid, 0)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def import_errors() -> dict[str, str]:
    """{package: the error importing each of its modules in a fresh process refusing the layers above, or ""}."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    packages = json.dumps({p: blocked(p) for p in PACKAGES})
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH, packages], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_a_layer_needs_nothing_above_it(package, import_errors):
    assert not import_errors[package], import_errors[package]


def _files(package: str) -> list[Path]:
    path = ROOT / package.replace(".", "/")
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every project import in a module, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "onestory_jax":
            out += [(node.lineno, f"onestory_jax.{a.name}") for a in node.names]  # `from onestory_jax import eval`
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return [(line, m) for line, m in out if m.startswith("onestory_jax.")]


def upward_imports(package: str) -> list[str]:
    """'file:line -> module' for every import of `package`'s source that reaches a blocked package."""
    refused = blocked(package)
    found = []
    for file in _files(package):
        for line, module in _imported(ast.parse(file.read_text(), str(file))):
            if any(module == b or module.startswith(b + ".") for b in refused):
                found.append(f"{file.relative_to(ROOT)}:{line} -> {module}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_statement_reaches_a_layer_above(package):
    found = upward_imports(package)
    assert not found, "\n".join(found)


def test_benchmarks_import_the_library_not_the_tests():
    hacks = [
        f"{f.name}:{i}"
        for f in sorted((ROOT / "bench").glob("*.py"))
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if "sys.path.insert" in line or "torch_refs" in line
    ]
    assert not hacks, hacks


def test_one_onestory_forward():
    """Only models/onestory.py assembles the model (select, condition, DiT): loss and sampler call it."""
    modules = {"WanDiT", "OneStoryMemory"}
    found = [
        f"{file.relative_to(ROOT)}:{node.lineno} {node.id}"
        for package in ("onestory_jax.training", "onestory_jax.sampling", "onestory_jax.eval")
        for file in _files(package)
        for node in ast.walk(ast.parse(file.read_text()))
        if isinstance(node, ast.Name) and node.id in modules
    ]
    assert not found, found

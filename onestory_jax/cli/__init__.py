"""Command-line entry points: the console scripts of pyproject.toml's [project.scripts].

`onestory-sample` (cli/sample.py) and `onestory-train` (cli/train.py) are the checkout's `python sample.py` and
`python train.py` (thin wrappers of the same `main`), and `onestory-convert` is `python -m onestory_jax.convert`.
"""

from __future__ import annotations

from onestory_jax.errors import run_cli


def convert() -> None:
    """The `onestory-convert` console script."""
    from onestory_jax.convert.__main__ import main

    run_cli(main)

"""A model loaded once, and stories rendered into run folders with it: what `sample.py` does per story
(lock the folder, refuse one it did not write, keep re-rolls, re-roll, render), reusable by a
long-running process such as the studio (`python -m onestory_jax.studio`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from onestory_jax.config import Config
from onestory_jax.config_files import to_dict
from onestory_jax.models.frozen import Components
from onestory_jax.sampling.story import Story


@dataclasses.dataclass
class SamplingModel:
    """Everything a render needs, loaded once (`open_model`)."""

    cfg: Config
    params: dict[str, Any]
    comps: Components
    mesh: jax.sharding.Mesh
    model_id: str  # resume.model_identity: a saved shot is reused only by the same model


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default: a second story of the same size starts without
    compiling. Its place: $JAX_COMPILATION_CACHE_DIR, else $ONESTORY_CACHE/jax, else ~/.cache/onestory_jax/jax."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        root = Path(os.environ.get("ONESTORY_CACHE", Path.home() / ".cache" / "onestory_jax"))
        jax.config.update("jax_compilation_cache_dir", str(root / "jax"))


def open_model(
    checkpoint: Path | None,
    config: str | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    tokenizer: Path | None = None,
    allow_random: bool = False,
) -> SamplingModel:
    """Load a model folder (or a preset's random weights, seeded by `seed`) for sampling, as sample.py does."""
    from onestory_jax.sampling.components import load_for_sampling
    from onestory_jax.sampling.resume import model_identity

    enable_compilation_cache()
    cfg, params, comps, mesh = load_for_sampling(checkpoint, config, list(overrides), seed, tokenizer, allow_random=allow_random)
    return SamplingModel(cfg, params, comps, mesh, model_identity(checkpoint, to_dict(cfg), seed, tokenizer))


def render_into(
    model: SamplingModel,
    story: Story,
    out: Path,
    redo: int | None = None,
    reroll_seed: int | None = None,
    progress: bool = True,
    on_start: Callable[[Story], None] | None = None,
    lock: bool = True,
) -> dict[str, Any]:
    """Render (or resume) `story` into `out` under its folder lock; returns the manifest. The story's
    settings.lora must be merged into `model` already (sample.py merges them when it loads).

    As `sample.py`: a folder holding files sample.py did not write is refused, shots re-rolled there
    keep their seeds until edited, `redo` (1-based) regenerates that shot and every later one, with
    `reroll_seed` as shot `redo`'s new seed (None: the seed it had). `on_start(story)` sees the story
    exactly as rendered (sampler filled, re-rolls applied) before denoising starts. `lock=False`: the
    caller holds `out`'s lock already (and has checked it with `check_not_foreign`), as sample.py does
    for all its --out folders before loading the model.
    """
    from onestory_jax.errors import UserError
    from onestory_jax.locking import folder_lock
    from onestory_jax.sampling.feasibility import check_story_fits
    from onestory_jax.sampling.pipeline import render_story
    from onestory_jax.sampling.resume import check_not_foreign, with_rerolls
    from onestory_jax.sampling.story import reroll, with_sampler
    from onestory_jax.sharding import activate

    if redo is not None and not 1 <= redo <= len(story.shots):
        raise UserError(f"redo {redo}: the story has shots 1..{len(story.shots)}")
    check_story_fits(story, model.cfg)
    with folder_lock(out, "--out") if lock else contextlib.nullcontext():
        check_not_foreign(out)
        story = with_rerolls(out, with_sampler(story, model.cfg.sampler), model.model_id)
        if redo is not None and reroll_seed is not None:
            story = reroll(story, redo - 1, reroll_seed)
        if on_start is not None:
            on_start(story)
        with activate(model.mesh):
            return render_story(
                model.cfg,
                model.params,
                model.comps,
                story,
                out,
                progress=progress,
                mesh=model.mesh,
                model_id=model.model_id,
                redo=redo,
            )

"""Does a story's memory carry the recalled character? Metrics on recall shots.

A recall shot is a shot j showing a character c that an earlier shot showed but shot j - 1 does
not: its caption is referential ("The same square returns ..."), so only memory knows c's colour.
On those shots:

  selection_accuracy  fraction whose chosen memory frames (sample.py's manifest) include a frame
                      of a shot that shows c: the memory *could* carry c's identity
  recall_colour       fraction whose shot comes out in c's colour: the model *did* carry it

and `named_colour`: on the shots whose caption names the colour (first appearances), the fraction
that come out in it. It needs no memory, only text following and a decoder that keeps colour: the
ceiling of `recall_colour` for a given model.

The colour of a shot is the hue check (`eval.hue.shot_colour`), the primary number; the `_strict`
variants use the evaluator's ray-distance attribute check (`regions.dominant_colour`), which also
fails on blur.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from onestory_jax.data import synthetic
from onestory_jax.eval.hue import shot_colour

Hits = list[bool]


def recall_shots(story: synthetic.SyntheticStory) -> list[tuple[int, int]]:
    """(shot j, character c), 0-based: c is in shot j and in an earlier shot, but not in shot j - 1."""
    shots = story.shots
    return [
        (j, c)
        for j in range(1, len(shots))
        for c in shots[j].characters
        if c not in shots[j - 1].characters and any(c in s.characters for s in shots[:j])
    ]


def named_shots(story: synthetic.SyntheticStory) -> list[tuple[int, int]]:
    """(shot j, character c) where shot j's caption names c's colour."""
    return [
        (j, c)
        for j, shot in enumerate(story.shots)
        for c in shot.characters
        if story.characters[c].colour in re.findall(r"[a-z]+", shot.caption.lower())
    ]


def selection_hits(story: synthetic.SyntheticStory, manifest: dict[str, Any]) -> Hits:
    """Per recall shot: do its chosen memory frames (manifest["shots"][j]["memory"], shots 1-based)
    include a frame of a shot showing the recalled character?"""
    shots = story.shots
    return [any(c in shots[m["shot"] - 1].characters for m in manifest["shots"][j]["memory"]) for j, c in recall_shots(story)]


def hue_hits(story: synthetic.SyntheticStory, frames: list[np.ndarray], pairs: list[tuple[int, int]]) -> Hits:
    """Per (shot j, character c): does shot j (frames uint8 [T, H, W, 3]) come out in c's colour?"""
    return [shot_colour(frames[j]) == story.characters[c].colour for j, c in pairs]


def strict_hits(result: dict[str, Any], pairs: list[tuple[int, int]]) -> Hits:
    """Per (shot j, character c): is c's dominant colour its own under the evaluator's strict check?"""
    per_shot = result["attribute_accuracy"]["per_shot"]
    return [next(a["predicted"] == a["truth"] for a in per_shot[j]["characters"] if a["character"] == c) for j, c in pairs]


def mean_or_none(hits: Hits) -> float | None:
    return float(np.mean(hits)) if hits else None


def recall_metrics(
    story: synthetic.SyntheticStory, frames: list[np.ndarray], result: dict[str, Any] | None, manifest: dict[str, Any] | None
) -> dict[str, float | None]:
    """selection_accuracy, recall_colour and named_colour of one story (None where it has no such
    shot), with the strict check's `_strict` numbers when the evaluator's `result` is given."""
    recall, named = recall_shots(story), named_shots(story)
    out = {
        "recall_colour": mean_or_none(hue_hits(story, frames, recall)),
        "named_colour": mean_or_none(hue_hits(story, frames, named)),
    }
    if manifest is not None:
        out["selection_accuracy"] = mean_or_none(selection_hits(story, manifest))
    if result is not None:
        out["recall_colour_strict"] = mean_or_none(strict_hits(result, recall))
        out["named_colour_strict"] = mean_or_none(strict_hits(result, named))
    return out

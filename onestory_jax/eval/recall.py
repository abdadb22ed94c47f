"""Does a story's memory carry the recalled character? Metrics on recall shots (issue 12).

A recall shot is a shot j showing a character c that an earlier shot showed but shot j - 1 does
not (insert-and-recall: the first character returns after the inserted one). On those shots:

  selection_accuracy  fraction whose chosen memory frames (sample.py's manifest) include a frame
                      of a shot that shows c: the memory *could* carry c's identity
  recall_colour       fraction whose recalled character comes out in its own colour (the
                      evaluator's attribute check): the model *did* carry it

and, on every shot, `named_colour`: the fraction of characters whose colour the caption names
(a first appearance, or a returning one described in full) that come out in that colour. It needs
no memory, only text following and a decoder sharp enough to keep the colour: the ceiling of
`recall_colour` for a given model.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from onestory_jax.data import synthetic


def recall_shots(story: synthetic.SyntheticStory) -> list[tuple[int, int]]:
    """(shot j, character c), 0-based: c is in shot j and in an earlier shot, but not in shot j - 1."""
    shots = story.shots
    return [(j, c) for j in range(1, len(shots)) for c in shots[j].characters
            if c not in shots[j - 1].characters and any(c in s.characters for s in shots[:j])]


def selection_hits(story: synthetic.SyntheticStory, manifest: dict[str, Any]) -> list[bool]:
    """Per recall shot: do its chosen memory frames (manifest["shots"][j]["memory"], shots 1-based)
    include a frame of a shot showing the recalled character?"""
    shots = story.shots
    return [any(c in shots[m["shot"] - 1].characters for m in manifest["shots"][j]["memory"])
            for j, c in recall_shots(story)]


def colour_hits(story: synthetic.SyntheticStory, result: dict[str, Any]) -> list[bool]:
    """Per recall shot: is the recalled character's dominant colour its own (evaluate_story's result)?"""
    per_shot = result["attribute_accuracy"]["per_shot"]
    return [next(a["predicted"] == a["truth"] for a in per_shot[j]["characters"] if a["character"] == c)
            for j, c in recall_shots(story)]


def named_colour_hits(story: synthetic.SyntheticStory, result: dict[str, Any]) -> list[bool]:
    """Per character of every shot whose caption names its colour: does it come out in that colour?"""
    return [a["predicted"] == a["truth"] for shot, attrs in zip(story.shots, result["attribute_accuracy"]["per_shot"])
            for a in attrs["characters"] if a["truth"] in re.findall(r"[a-z]+", shot.caption.lower())]


def recall_metrics(story: synthetic.SyntheticStory, result: dict[str, Any], manifest: dict[str, Any]) -> dict[str, float | None]:
    """selection_accuracy, recall_colour and named_colour of one story (None where it has no such shot)."""
    mean = lambda hits: float(np.mean(hits)) if hits else None
    return {"selection_accuracy": mean(selection_hits(story, manifest)), "recall_colour": mean(colour_hits(story, result)),
            "named_colour": mean(named_colour_hits(story, result))}

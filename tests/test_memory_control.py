"""Memory the user controls: `references:` images as memory frames before shot 1, and per-shot
`memory: {pin, exclude}` (parsing, their slots, and a story on the embedded default that keeps what
an edit of a later shot's memory does not touch)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_runs import cli_output

from onestory_jax.errors import UserError
from onestory_jax.sampling.memory_bank import control_masks, item_slots
from onestory_jax.sampling.story import parse_story

MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"


def story(tmp_path, shots, references=None):
    Image.new("RGB", (64, 64), (220, 40, 40)).save(tmp_path / "red.png")
    data = {"shots": shots, **({"references": references} if references is not None else {})}
    return parse_story(data, "s.yaml", tmp_path)


def test_pins_and_excludes_are_parsed_to_items(tmp_path):
    s = story(
        tmp_path,
        ["a", "b", {"caption": "c", "memory": {"pin": ["hero", 1], "exclude": "2:0"}}],
        [{"path": "red.png", "name": "hero"}, "red.png"],
    )
    assert [r.name for r in s.references] == ["hero", "ref2"]
    assert s.shots[2].pin == ("hero", "1") and s.shots[2].exclude == ("2:0",)


@pytest.mark.parametrize(
    "shot3_memory,message",
    [
        ({"pin": [3]}, "shot 3 is not an earlier shot"),
        ({"exclude": ["4:0"]}, "shot 4 is not an earlier shot"),
        ({"pin": ["villain"]}, "references: hero"),
        ({"pin": [1], "exclude": ["1"]}, "both pinned and excluded"),
        ({"pin": [True]}, "not a shot number"),
        ({"keep": [1]}, "unknown field"),
        ({"pin": [120]}, 'an unquoted 2:0 reads as 120 in YAML: quote it, "2:0"'),
    ],
)
def test_bad_memory_items_are_one_line(tmp_path, shot3_memory, message):
    with pytest.raises(UserError, match=message):
        story(tmp_path, ["a", "b", {"caption": "c", "memory": shot3_memory}], [{"path": "red.png", "name": "hero"}])


@pytest.mark.parametrize(
    "references,message",
    [
        ([{"path": "red.png", "name": "2"}], "not empty or a shot number"),
        ([{"path": "red.png", "name": "x"}, {"path": "red.png", "name": "x"}], "two references"),
        ([{"path": "missing.png"}], "does not exist"),
        ("red.png", "must be a list"),
    ],
)
def test_bad_references_are_one_line(tmp_path, references, message):
    with pytest.raises(UserError, match=message):
        story(tmp_path, ["a"], references)


def test_items_map_to_bank_slots():
    # 2 references, then 3 latent frames a shot: shot 2 is slots 5..7
    assert item_slots("hero", ["hero", "ref2"], 3) == [0]
    assert item_slots("2", ["hero", "ref2"], 3) == [5, 6, 7]
    assert item_slots("2:1", ["hero", "ref2"], 3) == [6]
    with pytest.raises(UserError, match="latent frames 0..2"):
        item_slots("2:3", [], 3)
    pinned, excluded = control_masks([(), ("1",)], [(), ("hero",)], ["hero"], 2)
    assert pinned.tolist() == [[False] * 5, [False, True, True, False, False]]
    assert excluded[1].tolist() == [True, False, False, False, False] and not excluded[0].any()


@pytest.mark.skipif(not (MODEL / "onestory").is_dir(), reason="models/demo is not in this tree")
def test_a_pinned_reference_is_used_and_a_later_edit_keeps_earlier_shots(tmp_path, capsys):
    shots = [
        "A red square hops across a snowy field.",
        "A blue circle slides through a desert.",
        {"caption": "The same square returns to a snowy field.", "memory": {"pin": ["hero"]}},
    ]
    Image.new("RGB", (64, 64), (50, 70, 230)).save(tmp_path / "hero.png")

    def render(shots):
        data = {"settings": {"steps": 4}, "references": [{"path": "hero.png", "name": "hero"}], "shots": shots}
        (tmp_path / "s.json").write_text(json.dumps(data))
        code, _, err = cli_output(
            "sample", ["--checkpoint", MODEL, "--story", tmp_path / "s.json", "--out", tmp_path / "out", "--no-progress"], capsys
        )
        assert code == 0, err
        return json.loads((tmp_path / "out" / "manifest.json").read_text())["shots"]

    first = render(shots)
    assert first[0]["memory"][0]["reference"] == "hero"  # shot 1's memory is the reference
    assert first[2]["memory"][0] == {**first[2]["memory"][0], "reference": "hero", "pinned": True}
    assert first[2]["memory_control"] == {"pin": ["hero"], "exclude": []}
    latents = [np.load(tmp_path / "out" / f"shot_{i:02d}.npy") for i in (1, 2, 3)]
    mp4_times = [(tmp_path / "out" / f"shot_{i:02d}.mp4").stat().st_mtime_ns for i in (1, 2, 3)]
    shots[2] = {**shots[2], "memory": {"exclude": ["hero", "2"]}}
    second = render(shots)
    assert [s["resumed"] for s in second] == [True, True, False]
    assert "memory_exclude" in second[2]["generated_because"] and "memory_pin" in second[2]["generated_because"]
    assert all("reference" not in m and m["shot"] != 2 for m in second[2]["memory"])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "shot_02.npy"), latents[1])
    now = [(tmp_path / "out" / f"shot_{i:02d}.mp4").stat().st_mtime_ns for i in (1, 2, 3)]
    assert now[:2] == mp4_times[:2] and now[2] != mp4_times[2]  # kept shots' mp4s are not rewritten
    assert np.abs(np.load(tmp_path / "out" / "shot_03.npy") - latents[2]).max() > 1e-3
    (tmp_path / "out" / ".story.k2j4x.mp4").write_bytes(b"")  # a killed run's temporary
    assert len(render(shots[:2])) == 2  # the story shortened: shot 3's files and the temporary go
    assert sorted(p.name for p in (tmp_path / "out").glob("*shot_03*")) == []
    assert not (tmp_path / "out" / ".story.k2j4x.mp4").exists() and (tmp_path / "out" / "shot_02.npy").is_file()

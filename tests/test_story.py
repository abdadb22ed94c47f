"""Story files: valid files parse; schema errors name the field and the shot number."""

import json

import pytest

from onestory_jax.errors import UserError
from onestory_jax.sampling.story import load_story, parse_story

GOOD = {"settings": {"width": 64, "height": 48, "frames": 17}, "shots": [{"caption": "a"}, {"caption": "b", "seed": 3}]}


def test_valid_story_and_defaults(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(GOOD))
    story = load_story(p)
    assert story.latent_frames == 5 and story.memory.strategy == "onestory"
    assert story.shot_seed(0) == 0 and story.shot_seed(1) == 3
    assert load_story("configs/stories/demo.yaml").shots[0].caption.startswith("A red")


@pytest.mark.parametrize("patch,message", [
    ({"shots": []}, "shots"),
    ({"shots": [{"caption": "a"}, {"caption": ""}]}, r"shots\[2\]\.caption"),
    ({"shots": [{"caption": "a"}, {"caption": "b", "seed": "x"}]}, r"shots\[2\]\.seed"),
    ({"shots": [{"caption": "a", "colour": 1}]}, r"shots\[1\]\.colour"),
    ({"settings": {"width": 70}}, r"settings\.width.*multiple of 16"),
    ({"settings": {"frames": 16}}, r"settings\.frames.*4k\+1"),
    ({"settings": {"steps": "many"}}, r"settings\.steps"),
    ({"memory": {"strategy": "magic"}}, r"memory\.strategy"),
    ({"memory": {"budget": 5}}, r"memory\.budget"),
    ({"start_image": "missing.png"}, "start_image"),
    ({"plot": "twist"}, "plot"),
    ({"settings": {"guidance": float("nan")}}, r"settings\.guidance: must be a finite number"),
    ({"settings": {"guidance": float("inf")}}, r"settings\.guidance: must be a finite number"),
    ({"settings": {"shift": float("nan")}}, r"settings\.shift: must be a finite number"),
    ({"settings": {"shift": -1}}, r"settings\.shift: must be > 0"),
])
def test_schema_errors_name_the_field(patch, message):
    with pytest.raises(UserError, match=message):
        parse_story({**GOOD, **patch})


def test_non_finite_numbers_in_a_story_file_are_refused(tmp_path):
    """JSON's NaN and YAML's .inf both parse to floats; they must not reach the sampler."""
    (tmp_path / "nan.json").write_text('{"settings": {"guidance": NaN}, "shots": ["a"]}')
    (tmp_path / "inf.yaml").write_text("settings: {shift: .inf}\nshots: [a]\n")
    with pytest.raises(UserError, match=r"nan\.json: settings\.guidance: must be a finite number, got nan"):
        load_story(tmp_path / "nan.json")
    with pytest.raises(UserError, match=r"inf\.yaml: settings\.shift: must be a finite number, got inf"):
        load_story(tmp_path / "inf.yaml")


def test_unreadable_story_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("shots: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_story(p)
    with pytest.raises(UserError, match="does not exist"):
        load_story(tmp_path / "nope.yaml")

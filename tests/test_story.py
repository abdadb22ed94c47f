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
])
def test_schema_errors_name_the_field(patch, message):
    with pytest.raises(UserError, match=message):
        parse_story({**GOOD, **patch})


def test_unreadable_story_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("shots: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_story(p)
    with pytest.raises(UserError, match="does not exist"):
        load_story(tmp_path / "nope.yaml")

"""The studio's logic without a browser or a model: story <-> table, memory pins, references, the
manifest's memory frames as thumbnails, a render's per-shot progress (onestory_jax/studio)."""

import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from onestory_jax.errors import UserError
from onestory_jax.sampling.story import parse_story
from onestory_jax.studio import memory_view as mv
from onestory_jax.studio import story_edit as se

STORY = {
    "settings": {"steps": 4, "seed": 3},
    "memory": {"strategy": "onestory", "budget": 1},
    "shots": [
        {"caption": "A red square."},
        {"caption": "A blue circle.", "seed": 9},
        {"caption": "The square again.", "continue": True, "memory": {"pin": ["2:0", 1], "exclude": ["alice"]}},
    ],
}


def _png(path, colour=(200, 30, 30), size=32):
    from PIL import Image

    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(path)
    return path


def test_table_round_trip_keeps_every_shot_field():
    rows = se.story_rows(STORY)
    assert rows == [
        ["A red square.", "", False, "", ""],
        ["A blue circle.", 9, False, "", ""],
        ["The square again.", "", True, "2:0, 1", "alice"],
    ]
    assert se.apply_rows(STORY, rows) == STORY


@pytest.mark.parametrize("cell,seed", [("", None), (None, None), (float("nan"), None), (7, 7), (7.0, 7), ("7", 7), (" 12 ", 12)])
def test_seed_cells(cell, seed):
    shot = se.apply_rows({}, [["a caption", cell, False, "", ""]])["shots"][0]
    assert shot.get("seed") == seed


@pytest.mark.parametrize("cell", ["seven", 1.5, -1])
def test_bad_seed_cell_is_one_line(cell):
    with pytest.raises(UserError, match="seed"):
        se.apply_rows({}, [["a caption", cell, False, "", ""]])


def test_blank_rows_are_dropped_and_short_rows_padded():
    data = se.apply_rows(STORY, [["  ", "", False, "", ""], ["Only this."], [None, None, None, None, None]])
    assert data["shots"] == [{"caption": "Only this."}] and data["settings"] == STORY["settings"]


def test_memory_items_parse_and_format():
    assert se.parse_memory_items("alice, 1, 2:0 ,, 3 : 1") == ["alice", 1, "2:0", "3:1"]
    assert se.format_memory_items(["alice", 1, "2:0"]) == "alice, 1, 2:0"
    assert se.parse_memory_items("") == [] and se.parse_memory_items(None) == []
    for bad in ("0", "0:1", "a:b", "two words"):
        with pytest.raises(UserError, match="memory item"):
            se.parse_memory_items(bad)


def test_pin_exclude_and_clear():
    data = se.edit_memory(STORY, 2, "1:1", "pin")
    assert data["shots"][1]["memory"] == {"pin": ["1:1"]} and "memory" not in STORY["shots"][1]  # a copy
    data = se.edit_memory(data, 2, "1:1", "exclude")  # moves it from pin to exclude
    assert data["shots"][1]["memory"] == {"exclude": ["1:1"]}
    data = se.edit_memory(data, 2, "1:1", "pin")
    data = se.edit_memory(data, 2, "1:1", "pin")  # pinning twice keeps one
    assert data["shots"][1]["memory"] == {"pin": ["1:1"]}
    assert "memory" not in se.edit_memory(data, 2, "1:1", "clear")["shots"][1]
    assert "memory" not in se.clear_memory(STORY, 3)["shots"][2]
    with pytest.raises(UserError, match="shots 1..3"):
        se.edit_memory(STORY, 4, "1:0", "pin")


def test_add_shot_and_settings_fields():
    data = se.add_shot(se.empty_story(), "  A new shot. ")
    assert data["shots"] == [{"caption": "A new shot."}]
    with pytest.raises(UserError, match="caption"):
        se.add_shot(data, " ")
    data = se.apply_settings(data, 4.0, None, 2.5, "recent", "2")
    assert data["settings"] == {"steps": 4, "guidance": 2.5} and data["memory"] == {"strategy": "recent", "budget": 2}
    data = se.apply_settings(data, None, 5, float("nan"), None, None)  # blank: the model's
    assert data["settings"] == {"seed": 5}
    assert se.apply_settings(data, 0, None, None, None, None)["settings"] == {}  # an unloaded page's blank box


def test_references_named_added_removed():
    assert se.reference_name("Alice Smith.PNG", set()) == "alice_smith"
    assert se.reference_name("alice.png", {"alice"}) == "alice2"
    assert se.reference_name("12.png", set()) == "ref12"  # a name must not read as a shot number
    data, name = se.add_reference(STORY, "/imgs/alice.png")
    assert name == "alice" and data["references"] == [{"path": "/imgs/alice.png", "name": "alice"}]
    data, name = se.add_reference(data, "/imgs/x.png", "bob")
    assert se.references(data) == [("alice", "/imgs/alice.png"), ("bob", "/imgs/x.png")]
    for bad in ("bob", "12", "a b"):
        with pytest.raises(UserError):
            se.add_reference(data, "/imgs/y.png", bad)
    data = se.remove_reference(data, "alice")
    assert se.references(data) == [("bob", "/imgs/x.png")]
    assert data["shots"][2]["memory"] == {"pin": ["2:0", 1]}  # its exclusion went with it
    assert se.references({"references": ["a.png", {"path": "b.png"}]}) == [("ref1", "a.png"), ("ref2", "b.png")]


def test_yaml_is_a_valid_story_with_references_and_pins(tmp_path):
    _png(tmp_path / "alice.png")
    data, _ = se.add_reference(STORY, str(tmp_path / "alice.png"))
    text = se.story_yaml(se.relative_paths(data, tmp_path))
    assert "'2:0'" in text  # quoted: YAML 1.1 reads a bare 2:0 as the number 120
    assert list(yaml.safe_load(text)) == ["settings", "memory", "references", "shots"]
    assert yaml.safe_load(text)["references"] == [{"path": "alice.png", "name": "alice"}]
    story = parse_story(yaml.safe_load(text), "story.yaml", tmp_path)
    assert story.shots[2].pin == ("2:0", "1") and story.shots[2].exclude == ("alice",)
    assert story.references[0].name == "alice" and story.shots[1].seed == 9 and story.shots[2].continues


def test_paths_absolute_on_open_relative_on_save(tmp_path):
    data = {
        "start_image": "img/a.png",
        "references": [{"path": "b.png"}, "/abs/c.png"],
        "settings": {"lora": ["l.safetensors", {"path": "m.safetensors", "scale": 0.5}]},
        "shots": [],
    }
    absolute = se.absolute_paths(data, tmp_path)
    assert absolute["start_image"] == str(tmp_path.resolve() / "img/a.png")
    assert absolute["references"] == [{"path": str(tmp_path.resolve() / "b.png")}, "/abs/c.png"]
    assert absolute["settings"]["lora"][1] == {"path": str(tmp_path.resolve() / "m.safetensors"), "scale": 0.5}
    back = se.relative_paths(absolute, tmp_path)
    assert back["start_image"] == "img/a.png" and back["references"][1] == "/abs/c.png"
    assert back["settings"]["lora"] == ["l.safetensors", {"path": "m.safetensors", "scale": 0.5}]


def test_read_story_text_formats():
    assert se.read_story_text(yaml.safe_dump(STORY), "s.yaml") == STORY
    script = {"scenes": [{"video_prompts": ["One.", "Two."], "cut": [True, False]}]}
    assert se.read_story_text(json.dumps(script), "s.json")["shots"] == [
        {"caption": "One."},
        {"caption": "Two.", "continue": True},
    ]
    for text, name in (("{not json", "s.json"), ("a: [", "s.yaml"), ("settings: {}", "s.yaml")):
        with pytest.raises(UserError):
            se.read_story_text(text, name)


MANIFEST = {
    "shots": [
        {"shot": 1, "caption": "a", "memory": [{"reference": "alice", "score": 0.9, "patchifier": [1, 2, 2], "pinned": True}]},
        {
            "shot": 2,
            "caption": "b",
            "memory": [
                {"shot": 1, "frame": 2, "score": 0.6, "patchifier": [1, 2, 4]},
                {"reference": "alice", "score": 0.1, "patchifier": [1, 4, 4]},
            ],
        },
    ]
}


def test_memory_frames_of_the_manifest():
    frames = mv.memory_frames(MANIFEST, 2)
    assert [f.item for f in frames] == ["1:2", "alice"]
    assert frames[0].label == "shot 1 · frame 2 · score 0.60 · 1x2x4"
    assert frames[1].reference == "alice" and frames[1].shot is None
    assert mv.memory_frames(MANIFEST, 1)[0].label == "ref alice · score 0.90 · 1x2x2 · pinned"
    assert mv.memory_frames(MANIFEST, 3) == [] and mv.memory_frames({}, 1) == []


def test_latent_frame_to_video_frame():
    # Wan's causal VAE: latent 0 = video frame 0; latent f covers 4f-3..4f, shown as its last
    assert [mv.video_frame(f) for f in range(4)] == [0, 4, 8, 12]


def test_thumbnails_cut_from_the_shot_video_and_the_reference(tmp_path):
    from onestory_jax.data.video import write_mp4

    video = np.zeros((9, 16, 16, 3), np.uint8)
    video[:, :, :, 0] = (np.arange(9) * 28)[:, None, None]  # frame i is red 28*i
    write_mp4(tmp_path / "shot_01.mp4", video, 8)
    refs = {"alice": _png(tmp_path / "alice.png", (10, 200, 10), 16)}
    shot_frame, ref = mv.memory_frames(MANIFEST, 2)
    thumb = mv.thumbnail(tmp_path, shot_frame, refs)
    assert thumb.shape == (128, 128, 3)  # enlarged 8x
    assert abs(int(thumb[..., 0].mean()) - 8 * 28) < 12  # latent frame 2 -> video frame 8
    assert tuple(mv.thumbnail(tmp_path, ref, refs)[0, 0]) == (10, 200, 10)
    assert mv.thumbnail(tmp_path, ref, {}) is None  # no such reference file
    assert mv.thumbnail(tmp_path / "missing", shot_frame, refs) is None
    assert mv.enlarge(np.zeros((64, 48, 3), np.uint8)).shape == (192, 144, 3)
    assert mv.enlarge(np.zeros((200, 300, 3), np.uint8)).shape == (200, 300, 3)


def _record(out, i, fingerprint, mtime):
    path = out / f"shot_{i + 1:02d}.json"
    path.write_text(json.dumps({"fingerprint": fingerprint, "inputs": {}}))
    os.utime(path, (mtime, mtime))


def test_shot_states_of_a_running_render(tmp_path):
    now = time.time()
    prints = ["a", "b", "c", "d"]
    _record(tmp_path, 0, "a", now - 100)  # kept from an earlier render
    _record(tmp_path, 1, "b", now + 1)  # denoised by this render
    _record(tmp_path, 2, "old", now - 100)  # an edited shot, not reached yet
    assert mv.shot_states(tmp_path, prints, now) == ["kept", "new", "denoising", "pending"]
    assert mv.shot_states(tmp_path, prints, now, running=False) == ["kept", "new", "pending", "pending"]
    # redo 1: the matching record of shot 1 is regenerated, not kept
    assert mv.shot_states(tmp_path, prints, now, redo=1) == ["denoising", "new", "pending", "pending"]
    _record(tmp_path, 0, "x", now - 100)  # an earlier shot changed: no later shot is kept
    _record(tmp_path, 3, "d", now - 100)
    assert mv.shot_states(tmp_path, prints, now)[3] == "pending"
    text = mv.progress_text(["kept", "new", "denoising"], 12.3, True)
    assert text == "**Rendering** (1/2 new shot(s), 12 s): shot 1 kept · shot 2 done · shot 3 denoising…"
    assert mv.progress_text(["kept", "kept"], 3.0, False) == "**Rendered**: every shot is unchanged, all 2 kept"


def test_engine_saves_the_story_and_references_in_the_run_folder(tmp_path):
    from onestory_jax.studio.engine import Studio

    studio = Studio(SimpleNamespace(model_id="m"), tmp_path / "out", console_progress=False)
    with pytest.raises(UserError, match="no shots"):
        studio.save_story(se.empty_story())
    assert not studio.story_file.exists()  # nothing written for a story without shots
    data, name = studio.add_reference_image(STORY, _png(tmp_path / "Alice.png"))
    assert name == "alice" and (tmp_path / "out/references/alice.png").is_file()
    data["start_image"] = studio.save_image(_png(tmp_path / "first.png"), "start")
    story = studio.save_story(data)
    saved = yaml.safe_load(studio.story_file.read_text())
    assert saved["references"] == [{"path": "references/alice.png", "name": "alice"}]
    assert saved["start_image"] == "references/start.png"
    assert story.references[0].path == tmp_path / "out/references/alice.png"
    assert studio.current_story({}) == se.absolute_paths(saved, studio.out)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not an image"):
        studio.add_reference_image(data, tmp_path / "notes.txt")
    assert studio.manifest() is None and studio.downloads() == []


def test_refused_before_touching_the_folder(tmp_path):
    from onestory_jax.sampling.session import render_into
    from onestory_jax.studio.engine import Studio

    with pytest.raises(UserError, match="shots 1..2"):
        render_into(SimpleNamespace(), parse_story({"shots": ["One.", "Two."]}), tmp_path / "out", redo=3)
    assert not (tmp_path / "out").exists()
    (tmp_path / "l.safetensors").write_bytes(b"")
    studio = Studio(SimpleNamespace(model_id="m"), tmp_path / "studio", console_progress=False)
    with pytest.raises(UserError, match="settings.lora"):  # the studio's model is loaded without LoRAs
        studio.start({"settings": {"lora": [str(tmp_path / "l.safetensors")]}, "shots": ["One."]})
    assert studio.job is None

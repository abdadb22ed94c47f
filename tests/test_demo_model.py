"""The embedded default model (models/demo) loads with every part trained or shipped, and renders."""

import subprocess
import sys
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"


@pytest.mark.skipif(not (MODEL / "onestory").is_dir(), reason="models/demo is not in this tree")
def test_embedded_model_renders_a_story_without_random_parts(tmp_path):
    story = tmp_path / "s.yaml"
    story.write_text("settings: {width: 64, height: 64, frames: 5, steps: 2}\n"
                     "shots: [A red striped square hops across a snowy field., The same square rests in a desert.]\n")
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(MODEL), "--story", str(story),
                        "--out", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "RANDOM" not in r.stderr + r.stdout
    assert (tmp_path / "out" / "story.mp4").is_file() and (tmp_path / "out" / "contact_sheet.png").is_file()

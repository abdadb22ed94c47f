"""The studio's engine, without any UI: one model loaded once, one run folder, renders in a thread.

The story being edited is saved as `OUT/story.yaml` (reference images under `OUT/references/`), and
every render is `sampling.session.render_into`, the same as `sample.py --story OUT/story.yaml --out OUT`:
same outputs, same resume, same folder lock. While a render runs, each shot it has denoised (its
latents are saved the moment they are) is decoded into a preview video; the final shot_NN.mp4 files
replace the previews when the render ends.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from onestory_jax.errors import UserError
from onestory_jax.io import atomic_path, shot_name
from onestory_jax.sampling.session import SamplingModel, render_into
from onestory_jax.sampling.story import Story, load_story
from onestory_jax.studio import memory_view
from onestory_jax.studio.story_edit import absolute_paths, add_reference, read_story_text, references, relative_paths, story_yaml

STORY_FILE = "story.yaml"
REFERENCES = "references"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class RenderJob:
    """One render running in a thread: its story as rendered, outcome, and shots' progress."""

    def __init__(self, studio: Studio, story: Story, redo: int | None, reroll_seed: int | None):
        self.studio, self.redo = studio, redo
        self.started = time.time()
        self.story: Story | None = None  # as rendered (sampler filled, re-rolls applied): set before denoising
        self.fingerprints: list[str] = []
        self.manifest: dict[str, Any] | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(story, reroll_seed), daemon=True, name="studio-render")
        self._thread.start()

    def _run(self, story: Story, reroll_seed: int | None) -> None:
        from onestory_jax.sampling.resume import story_fingerprints

        def on_start(rendered: Story) -> None:
            self.fingerprints = story_fingerprints(rendered, self.studio.model.model_id)[1]
            self.story = rendered

        try:
            self.manifest = render_into(
                self.studio.model,
                story,
                self.studio.out,
                self.redo,
                reroll_seed,
                progress=self.studio.console_progress,
                on_start=on_start,
            )
        except UserError as e:
            self.error = str(e)
        except Exception as e:  # shown in the UI; the full traceback goes to the console
            traceback.print_exc()
            self.error = f"{type(e).__name__}: {e}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, seconds: float) -> bool:
        """Wait up to `seconds` for the render to end; whether it has."""
        self._thread.join(seconds)
        return not self.running

    def states(self) -> list[str]:
        """Per shot: kept / new / denoising / pending (`memory_view.shot_states`)."""
        return memory_view.shot_states(self.studio.out, self.fingerprints, self.started, self.redo, self.running)

    def progress(self) -> str:
        """The progress line the UI shows."""
        if not self.fingerprints:
            return "**Preparing** (checking saved shots, compiling the story program on the first render)…"
        return memory_view.progress_text(self.states(), time.time() - self.started, self.running)


class Studio:
    """The model, the run folder `out`, the render in progress (one at a time)."""

    def __init__(self, model: SamplingModel, out: Path, console_progress: bool = True):
        self.model, self.out = model, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.console_progress = console_progress
        self.preview_dir = Path(tempfile.mkdtemp(prefix="onestory-studio-"))
        atexit.register(shutil.rmtree, self.preview_dir, ignore_errors=True)
        self.job: RenderJob | None = None
        self._previews: dict[tuple[int, str, float], Path] = {}
        self._lock = threading.Lock()

    @property
    def story_file(self) -> Path:
        return self.out / STORY_FILE

    def save_story(self, data: dict[str, Any]) -> Story:
        """Write `data` as OUT/story.yaml (paths under OUT made relative) and read it back as a checked Story.
        A story without shots is refused before anything is written."""
        if not data.get("shots"):
            raise UserError("the story has no shots yet: type a caption and Add shot")
        self.write_story(data)
        return load_story(self.story_file)

    def write_story(self, data: dict[str, Any]) -> None:
        """Write `data` as OUT/story.yaml, unchecked (paths under OUT made relative)."""
        with atomic_path(self.story_file) as tmp:
            tmp.write_text(story_yaml(relative_paths(data, self.out)))

    def current_story(self, default: dict[str, Any]) -> dict[str, Any]:
        """The story last saved in OUT/story.yaml (its paths made absolute), else `default`."""
        if not self.story_file.is_file():
            return default
        try:
            return absolute_paths(read_story_text(self.story_file.read_text(), STORY_FILE), self.out)
        except (OSError, UserError):
            return default

    def start(self, data: dict[str, Any], redo: int | None = None, reroll_seed: int | None = None) -> RenderJob:
        """Save the story and start rendering it (from shot `redo`, 1-based, re-rolled with `reroll_seed`);
        a story error, or a render already running, is a UserError."""
        with self._lock:
            if self.job is not None and self.job.running:
                raise UserError("a render is running: wait for it to finish")
            story = self.save_story(data)
            if story.settings.lora:
                raise UserError(
                    "settings.lora: LoRAs are merged into the model when it is loaded: render this story "
                    "with sample.py --lora, or remove settings.lora"
                )
            self.job = RenderJob(self, story, redo, reroll_seed)
            return self.job

    def manifest(self) -> dict[str, Any] | None:
        """The last finished render's manifest.json, or None."""
        try:
            data = json.loads((self.out / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and "shots" in data else None

    def preview(self, shot: int, fps: int) -> Path | None:
        """A video of shot `shot` (1-based) as this render denoised it: its shot_NN.mp4 if written since its
        latents, else its saved latents decoded into a preview (once)."""
        record, npy = self.out / shot_name(shot - 1, ".json"), self.out / shot_name(shot - 1, ".npy")
        mp4 = self.out / shot_name(shot - 1, ".mp4")
        try:
            saved, mtime = json.loads(record.read_text()), npy.stat().st_mtime
        except (OSError, ValueError):
            return None
        if mp4.is_file() and mp4.stat().st_mtime >= mtime:
            return mp4
        key = (shot, str(saved.get("fingerprint")), mtime)
        if key not in self._previews:
            from onestory_jax.data.video import to_uint8, write_mp4
            from onestory_jax.sharding import activate

            with activate(self.model.mesh):
                video = to_uint8(self.model.comps.decode_latents(np.load(npy)))
            path = self.preview_dir / f"shot_{shot:02d}_{key[1][:8]}_{int(mtime * 1000)}.mp4"
            write_mp4(path, video, fps)
            self._previews[key] = path
        return self._previews[key]

    def shot_videos(self, job: RenderJob | None = None) -> list[tuple[Path, str]]:
        """(video, caption) of each shot to show: while `job` runs, the kept and the newly denoised shots
        (previews); else the last render's shot_NN.mp4 files."""
        if job is not None and job.story is not None and job.running:
            fps, shown = job.story.settings.fps or 8, []
            for i, state in enumerate(job.states()):
                path = (self.out / shot_name(i, ".mp4")) if state == memory_view.KEPT else None
                if state == memory_view.NEW:
                    path = self.preview(i + 1, fps)
                if path is not None and path.is_file():
                    shown.append((path, f"{i + 1}. {job.story.shots[i].caption}"))
            return shown
        manifest = self.manifest() or {"shots": []}
        return [
            (self.out / shot_name(s["shot"] - 1, ".mp4"), f"{s['shot']}. {s['caption']}")
            for s in manifest["shots"]
            if (self.out / shot_name(s["shot"] - 1, ".mp4")).is_file()
        ]

    def memory_gallery(self, shot: int, data: dict[str, Any]) -> tuple[list[tuple[np.ndarray, str]], list[Any]]:
        """(thumbnails with captions, the pin/exclude item of each) of the memory shot `shot` used in the last render."""
        manifest = self.manifest()
        if manifest is None:
            return [], []
        refs = {name: self._resolve(path) for name, path in references(data)}
        thumbs, items = [], []
        for frame in memory_view.memory_frames(manifest, shot):
            image = memory_view.thumbnail(self.out, frame, refs)
            if image is not None:
                thumbs.append((image, frame.label))
                items.append(frame.item)
        return thumbs, items

    def _resolve(self, path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else self.out / path

    def reference_image(self, path: str) -> np.ndarray | None:
        """A story's image (relative to OUT) as uint8 pixels, or None if unreadable: shown as pixels, since
        the studio serves no file outside OUT."""
        from onestory_jax.data.video import load_image

        try:
            return load_image(self._resolve(path))
        except UserError:
            return None

    def save_image(self, source: Path, stem: str) -> str:
        """Copy the image `source` to OUT/references/STEM.EXT (checked readable first); its path relative to OUT."""
        source = Path(source)
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"'{source.name}' is not an image ({', '.join(IMAGE_SUFFIXES)})")
        from onestory_jax.data.video import load_image

        load_image(source)  # refuses an unreadable image now, not at render time
        folder = self.out / REFERENCES
        folder.mkdir(exist_ok=True)
        target = folder / f"{stem}{source.suffix.lower()}"
        shutil.copyfile(source, target)
        return f"{REFERENCES}/{target.name}"

    def add_reference_image(self, data: dict[str, Any], source: Path, name: str | None = None) -> tuple[dict[str, Any], str]:
        """(`data` with the image `source` copied to OUT/references/ and added to `references:`, its name)."""
        data, name = add_reference(data, str(source), name)
        data["references"][-1]["path"] = self.save_image(Path(source), name)
        return data, name

    def downloads(self) -> list[str]:
        """The last render's files to download: shot mp4s, story.mp4, contact sheet, manifest, story file."""
        manifest = self.manifest()
        if manifest is None:
            return []
        names = [shot_name(s["shot"] - 1, ".mp4") for s in manifest["shots"]]
        names += ["story.mp4", "contact_sheet.png", "manifest.json", STORY_FILE]
        return [str(self.out / n) for n in names if (self.out / n).is_file()]

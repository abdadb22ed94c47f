"""The studio's Gradio layout: panels and events over `engine.Studio` and `story_edit` (docs/studio.md).

Panels: Story (open, shot table, settings, YAML, references), Render (progress and each shot's video
as it is denoised), Memory (the frames a shot used: pin, exclude, regenerate, re-roll), Downloads.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402

from onestory_jax.errors import UserError  # noqa: E402
from onestory_jax.sampling.story import SEED_LIMIT, STRATEGIES  # noqa: E402
from onestory_jax.studio import story_edit as se  # noqa: E402
from onestory_jax.studio.engine import Studio  # noqa: E402

POLL_S = 0.5  # how often a running render's progress is shown
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"],  # local fonts: no download
    font_mono=["ui-monospace", "monospace"],
)
CSS = """
#status {min-height: 2.5em}
#memory-gallery .thumbnail-item img, #memory-gallery img {image-rendering: pixelated}
"""


def _error(e: Exception) -> str:
    return f"**Error:** {e}"


def build(studio: Studio, initial: dict[str, Any], title: str = "OneStory studio") -> gr.Blocks:
    """The studio's Blocks for `studio`, opening on the story `initial` (a story mapping)."""
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        story = gr.State(initial)
        memory_items = gr.State([])  # the pin/exclude item of each thumbnail in the memory gallery
        selected = gr.State(None)  # the item of the thumbnail last clicked
        gr.Markdown(f"# {title}\nRun folder: `{studio.out}` · story file: `{studio.story_file}` · model: {studio.model.cfg.name}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=6):
                gr.Markdown("## Story")
                with gr.Row():
                    open_path = gr.Textbox(label="Open a story file (path on this machine)", scale=4, elem_id="open-path")
                    open_btn = gr.Button("Open", scale=1, elem_id="open")
                    upload_story = gr.UploadButton("Upload story", file_types=[".yaml", ".yml", ".json"], scale=1)
                    new_btn = gr.Button("New story", scale=1, elem_id="new-story")
                table = gr.Dataframe(
                    headers=list(se.COLUMNS),
                    datatype=["str", "str", "bool", "str", "str"],
                    column_widths=["44%", "9%", "11%", "13%", "13%"],
                    type="array",
                    interactive=True,
                    label="Shots (pin/exclude: alice, 1, 2:0)",
                    wrap=True,
                    show_row_numbers=True,
                    elem_id="shots-table",
                )
                with gr.Row():
                    new_caption = gr.Textbox(
                        label="New shot caption",
                        placeholder="A red square hops across a snowy field.",
                        scale=5,
                        elem_id="new-caption",
                    )
                    add_btn = gr.Button("Add shot", scale=1, elem_id="add-shot")
                sampler = studio.model.cfg.sampler
                with gr.Row():
                    # No `minimum`: Gradio's page can send 0 for a blank box before it has loaded, and a bound
                    # turns that into an error of the click (story_edit.apply_settings reads 0 steps as blank;
                    # the story's parse refuses negative values).
                    steps = gr.Number(label=f"steps (blank: {sampler.steps})", precision=0, min_width=90, elem_id="steps")
                    seed = gr.Number(label="seed (blank: 0)", precision=0, min_width=90, elem_id="seed")
                    guidance = gr.Number(label=f"guidance (blank: {sampler.guidance:g})", min_width=90, elem_id="guidance")
                    strategy = gr.Dropdown(list(STRATEGIES), label="memory", min_width=90, elem_id="strategy")
                    budget = gr.Dropdown([1, 2, 3], label="budget", min_width=90, elem_id="budget")
                with gr.Accordion("References and start image", open=False, elem_id="refs-panel"):
                    with gr.Row():
                        ref_files = gr.File(
                            file_count="multiple", file_types=["image"], label="Upload reference images", elem_id="ref-upload"
                        )
                        ref_name = gr.Textbox(label="Name (one image; blank: from its file name)", elem_id="ref-name")
                    refs = gr.Gallery(
                        label="Start image and references (pin a reference by its name)",
                        columns=6,
                        height=160,
                        allow_preview=False,
                        elem_id="refs",
                    )
                    with gr.Row():
                        ref_remove = gr.Dropdown([], label="Remove reference", scale=3)
                        ref_remove_btn = gr.Button("Remove", scale=1)
                    start_file = gr.File(file_types=["image"], label="Start image (shot 1 starts from it)")
                    clear_start = gr.Button("No start image")
                with gr.Accordion("Story YAML (edit, then Apply)", open=False, elem_id="yaml-panel"):
                    yaml_code = gr.Code(language="yaml", interactive=True, elem_id="story-yaml")
                    apply_yaml = gr.Button("Apply YAML", elem_id="apply-yaml")
            with gr.Column(scale=5):
                gr.Markdown("## Render")
                render_btn = gr.Button("Render", variant="primary", elem_id="render")
                status = gr.Markdown(elem_id="status")
                videos = gr.Gallery(label="Shots", columns=3, height="auto", elem_id="shot-videos")
                story_video = gr.Video(label="The whole story (story.mp4)", height=320, elem_id="story-video")
        gr.Markdown("## Memory")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                memory_shot = gr.Dropdown([], label="Shot", elem_id="memory-shot")
                memory_video = gr.Video(label="This shot", height=240, elem_id="memory-video")
            with gr.Column(scale=5):
                memory = gr.Gallery(
                    label="Memory frames it used (best first)",
                    columns=5,
                    height=260,
                    fit_columns=False,
                    allow_preview=False,
                    elem_id="memory-gallery",
                )
                picked = gr.Markdown("Click a memory frame to pin or exclude it.", elem_id="picked")
                with gr.Row():
                    pin_btn = gr.Button("Pin for this shot", elem_id="pin")
                    exclude_btn = gr.Button("Exclude for this shot", elem_id="exclude")
                    clear_btn = gr.Button("Clear this shot's pins", elem_id="clear-pins")
                with gr.Row():
                    regen_btn = gr.Button("Regenerate from this shot", variant="primary", elem_id="regenerate")
                    reroll_btn = gr.Button("Re-roll this shot (new seed)", elem_id="reroll")
        gr.Markdown("## Downloads")
        with gr.Row(equal_height=False):
            files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="downloads")
            sheet = gr.Image(label="Contact sheet", type="filepath", interactive=False, height=420, elem_id="contact-sheet")

        edit_inputs = [story, table, steps, seed, guidance, strategy, budget]
        views = [story, table, steps, seed, guidance, strategy, budget, yaml_code, refs, ref_remove]
        results = [status, videos, story_video, memory_shot, memory, memory_items, memory_video, files, sheet, selected, picked]

        def compose(data: dict, rows: Any, steps_: Any, seed_: Any, guidance_: Any, strategy_: Any, budget_: Any) -> dict:
            """The story as the panels show it now."""
            data = se.apply_rows(data, rows if isinstance(rows, list) else [])
            return se.apply_settings(data, steps_, seed_, guidance_, strategy_, budget_)

        def view(data: dict) -> tuple:
            """Every panel showing the story `data`, which is saved (OUT/story.yaml) if it has shots: a page
            reload or a restart reopens it."""
            if data.get("shots"):
                studio.write_story(data)
            s, m = data.get("settings") or {}, data.get("memory") or {}
            ref_list = se.references(data)
            shown = ([("start image", data["start_image"])] if data.get("start_image") else []) + ref_list
            gallery = [(image, n) for n, p in shown if (image := studio.reference_image(p)) is not None]
            return (
                data,
                se.story_rows(data) or [["", None, False, "", ""]],
                s.get("steps"),
                s.get("seed"),
                s.get("guidance"),
                m.get("strategy", "onestory"),
                m.get("budget", 1),
                se.story_yaml(data),
                gallery,
                gr.update(choices=[n for n, _ in ref_list], value=None),
            )

        def edited(*values: Any) -> tuple:
            try:
                return view(compose(*values))
            except UserError as e:
                gr.Warning(str(e))
                return view(values[0])

        def memory_panel(shot: Any, data: dict) -> tuple:
            """(thumbnails, their items, the shot's video, selection reset, help line) of shot `shot`."""
            if not shot:
                return [], [], None, None, "Render a story to see the memory each shot used."
            shot = int(shot)
            thumbs, items = studio.memory_gallery(shot, data)
            video = next((str(p) for p, c in studio.shot_videos() if c.startswith(f"{shot}. ")), None)
            shots = data.get("shots") or []
            edits = (shots[shot - 1].get("memory") or {}) if shot <= len(shots) and isinstance(shots[shot - 1], dict) else {}
            line = f"Shot {shot} used {len(thumbs)} memory frame(s)." if thumbs else f"Shot {shot} used no memory frames."
            line += (
                f" Pinned: {se.format_memory_items(edits.get('pin')) or '-'};"
                f" excluded: {se.format_memory_items(edits.get('exclude')) or '-'}. Click a frame to select it."
            )
            return thumbs, items, video, None, line

        def finished(data: dict, message: str, shot: int | None = None) -> dict:
            """Every result panel after a render (or at start): the last render's files."""
            manifest = studio.manifest()
            n = len(manifest["shots"]) if manifest else 0
            shot = shot if shot and 1 <= shot <= n else (n or None)
            thumbs, items, video, _, line = memory_panel(shot, data)
            story_mp4, sheet_png = studio.out / "story.mp4", studio.out / "contact_sheet.png"
            return {
                status: message,
                videos: [(str(p), c) for p, c in studio.shot_videos()],
                story_video: str(story_mp4) if manifest and story_mp4.is_file() else None,
                memory_shot: gr.update(choices=list(range(1, n + 1)), value=shot),
                memory: thumbs,
                memory_items: items,
                memory_video: video,
                files: studio.downloads() or None,
                sheet: str(sheet_png) if manifest and sheet_png.is_file() else None,
                selected: None,
                picked: line,
            }

        def render(data: dict, redo: int | None = None, reroll: bool = False) -> Any:
            """A render as a generator: progress and each finished shot's video, then every result."""
            try:
                job = studio.start(data, redo, secrets.randbelow(SEED_LIMIT) if reroll else None)
            except UserError as e:
                yield {status: _error(e)}
                return
            shown = None
            while not job.wait(POLL_S):
                update = {status: job.progress()}
                now = [(str(p), c) for p, c in studio.shot_videos(job)]
                if now != shown:  # the videos only when one is added: an update restarts them
                    shown = update[videos] = now
                yield update
            if job.error is not None:
                yield {**finished(data, _error(job.error), redo), status: _error(job.error)}
                return
            kept = sum(s["resumed"] for s in job.manifest["shots"])
            line = job.progress() + (f"<br>Kept {kept} unchanged shot(s) from the earlier render." if kept else "")
            yield finished(data, line, redo)

        def render_all(*values: Any) -> Any:
            try:
                data = compose(*values)
            except UserError as e:
                yield {status: _error(e)}
                return
            yield from render(data)

        def redo_from(shot: Any, reroll: bool, *values: Any) -> Any:
            if not shot:
                yield {status: _error("render the story first, then choose a shot in the Memory panel")}
                return
            try:
                data = compose(*values)
            except UserError as e:
                yield {status: _error(e)}
                return
            yield from render(data, int(shot), reroll)

        def regenerate(shot: Any, *values: Any) -> Any:
            yield from redo_from(shot, False, *values)

        def reroll_shot(shot: Any, *values: Any) -> Any:
            yield from redo_from(shot, True, *values)

        def open_file(path: str) -> tuple:
            try:
                file = Path(str(path or "").strip()).expanduser()
                if not file.is_file():
                    raise UserError(f"story file '{file}' does not exist")
                data = se.absolute_paths(se.read_story_text(file.read_text(), file.name), file.parent)
            except (UserError, OSError, UnicodeDecodeError) as e:
                gr.Warning(str(e))
                return (gr.skip(),) * len(views)
            return view(data)

        def uploaded_story(file: Any) -> tuple:
            return open_file(file if isinstance(file, str) else getattr(file, "name", ""))

        def add(caption: str, *values: Any) -> tuple:
            try:
                return (*view(se.add_shot(compose(*values), caption)), "")
            except UserError as e:
                gr.Warning(str(e))
                return (*view(values[0]), caption)

        def apply_text(text: str, data: dict) -> tuple:
            try:
                return view(se.absolute_paths(se.read_story_text(text, "story.yaml"), studio.out))
            except UserError as e:
                gr.Warning(str(e))
                return view(data)

        def add_refs(paths: Any, name: str, *values: Any) -> tuple:
            data = compose(*values)
            paths = [p if isinstance(p, str) else p.name for p in (paths or [])]
            try:
                for p in paths:
                    data, _ = studio.add_reference_image(data, Path(p), name if len(paths) == 1 else None)
            except UserError as e:
                gr.Warning(str(e))
            return (*view(data), None, "")

        def remove_ref(name: str, *values: Any) -> tuple:
            return view(se.remove_reference(compose(*values), name) if name else compose(*values))

        def set_start(path: Any, *values: Any) -> tuple:
            data = compose(*values)
            if path:
                try:
                    data["start_image"] = studio.save_image(Path(path if isinstance(path, str) else path.name), "start")
                except UserError as e:
                    gr.Warning(str(e))
            return (*view(data), None)

        def no_start(*values: Any) -> tuple:
            data = compose(*values)
            data.pop("start_image", None)
            return view(data)

        def pick(items: list, evt: gr.SelectData) -> tuple:
            item = items[evt.index] if evt.index is not None and evt.index < len(items) else None
            return item, (
                f"Selected **{item}**: pin it (always in this shot's memory) or exclude it."
                if item is not None
                else "Click a memory frame to pin or exclude it."
            )

        def memory_edit(kind: str, shot: Any, item: Any, *values: Any) -> tuple:
            data = compose(*values)
            try:
                if not shot:
                    raise UserError("render the story, then choose a shot")
                if kind == "clear":
                    data = se.clear_memory(data, int(shot))
                elif item is None:
                    raise UserError("click a memory frame first")
                else:
                    data = se.edit_memory(data, int(shot), item, kind)
            except UserError as e:
                gr.Warning(str(e))
            return (*view(data), memory_panel(shot, data)[4])

        def pin(shot: Any, item: Any, *values: Any) -> tuple:
            return memory_edit("pin", shot, item, *values)

        def exclude(shot: Any, item: Any, *values: Any) -> tuple:
            return memory_edit("exclude", shot, item, *values)

        def clear(shot: Any, item: Any, *values: Any) -> tuple:
            return memory_edit("clear", shot, item, *values)

        def start_up() -> dict:
            """A page (re)load: the story as last saved (or `initial` before any), the last render's results."""
            data = studio.current_story(initial)
            running = studio.job is not None and studio.job.running
            note = (
                f"{studio.job.progress()}<br>(a render started before this page was opened: reload when it ends)"
                if running
                else ""
            )
            return {**dict(zip(views, view(data))), **finished(data, note)}

        demo.load(start_up, None, [*views, *results])
        table.input(edited, edit_inputs, views)
        for field in (steps, seed, guidance, strategy, budget):
            field.input(edited, edit_inputs, views)
        add_btn.click(add, [new_caption, *edit_inputs], [*views, new_caption])
        new_caption.submit(add, [new_caption, *edit_inputs], [*views, new_caption])
        open_btn.click(open_file, open_path, views)
        upload_story.upload(uploaded_story, upload_story, views)
        new_btn.click(lambda: view(se.empty_story()), None, views)
        apply_yaml.click(apply_text, [yaml_code, story], views)
        ref_files.upload(add_refs, [ref_files, ref_name, *edit_inputs], [*views, ref_files, ref_name])
        ref_remove_btn.click(remove_ref, [ref_remove, *edit_inputs], views)
        start_file.upload(set_start, [start_file, *edit_inputs], [*views, start_file])
        clear_start.click(no_start, edit_inputs, views)
        render_btn.click(render_all, edit_inputs, results)
        memory_shot.change(
            lambda s, d: memory_panel(s, d), [memory_shot, story], [memory, memory_items, memory_video, selected, picked]
        )
        memory.select(pick, memory_items, [selected, picked])
        for button, fn in ((pin_btn, pin), (exclude_btn, exclude), (clear_btn, clear)):
            button.click(fn, [memory_shot, selected, *edit_inputs], [*views, picked])
        regen_btn.click(regenerate, [memory_shot, *edit_inputs], results)
        reroll_btn.click(reroll_shot, [memory_shot, *edit_inputs], results)
    return demo


def launch(demo: gr.Blocks, studio: Studio, host: str, port: int, **kwargs: Any) -> None:
    """Serve the studio (blocks until interrupted unless `prevent_thread_lock`); the run folder and the
    previews are the only files it serves besides Gradio's own."""
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        theme=THEME,
        css=CSS,
        allowed_paths=[str(studio.out), str(studio.preview_dir)],
        footer_links=[],
        **kwargs,
    )

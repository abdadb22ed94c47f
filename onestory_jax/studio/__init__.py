"""OneStory studio: a web UI (Gradio) to write a story, render it shot by shot, see and steer each shot's
memory, and download the results. `python -m onestory_jax.studio --checkpoint models/demo` (docs/studio.md).

Modules: `story_edit` and `memory_view` (the logic, no UI), `engine` (model, run folder, renders),
`app` (the Gradio layout), `__main__` (the command line).
"""

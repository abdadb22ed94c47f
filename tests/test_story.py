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


@pytest.mark.parametrize(
    "patch,message",
    [
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
        ({"plot": "twist"}, r"^story: plot: unknown field"),  # was `story.plot`
        ({"settings": {"guidance": float("nan")}}, r"settings\.guidance: must be a finite number"),
        ({"settings": {"guidance": float("inf")}}, r"settings\.guidance: must be a finite number"),
        ({"settings": {"shift": float("nan")}}, r"settings\.shift: must be a finite number"),
        ({"settings": {"shift": -1}}, r"settings\.shift: must be > 0"),
        ({"settings": {"memory_guidance": -1}}, r"settings\.memory_guidance: must be >= 0"),
        ({"shots": [{"caption": True}]}, r"shots\[1\]\.caption: must be a non-empty string, got True \(YAML reads yes/no"),
        ({"settings": {"steps": 10**9}}, r"settings\.steps: 1000000000 is not in 1\.\.1000"),
        ({"settings": {"seed": -5}}, r"settings\.seed: -5 is not in 0\.\.4294967295"),
        ({"settings": {"seed": 2**32}}, r"settings\.seed: 4294967296 is not in"),  # jax would make it seed 0
        ({"shots": [{"caption": "a", "seed": -(2**70)}]}, r"shots\[1\]\.seed: -1180591620717411303424 is not in"),
        (
            {"settings": {"seed": 2**32 - 1}, "shots": ["a", "b"]},
            r"shots\[2\] seed \(settings\.seed \+ 1\): 4294967296 is not in",
        ),
        ({"settings": {"width": 10**400}}, r"settings\.width: 1000.*000 is more than 16384"),  # overflowed later
        ({"settings": {"fps": 1e30}}, r"settings\.fps: expected int"),
        ({"settings": {"fps": 10**30}}, r"settings\.fps: .* is more than 1000"),  # failed after every shot was made
        ({"shots": ["a \ud800 b"]}, r"shots\[1\]\.caption: is not valid Unicode text"),
    ],
)
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


def test_sizes_must_suit_the_model_and_fit_in_memory():
    """Values that pass the story schema but not this model or machine are refused before any weights
    load: sizes off the VAE x patch grid, an I2V story below CLIP's minimum, a story that cannot fit."""
    from onestory_jax.config_files import load_config
    from onestory_jax.sampling.feasibility import GIB, check_story_fits, estimate_bytes

    tiny = load_config("tiny")
    sized = lambda w, h, frames=5: parse_story({"settings": {"width": w, "height": h, "frames": frames}, "shots": ["a", "b"]})
    check_story_fits(sized(32, 48), tiny, available=GIB)
    coarse = load_config("tiny", ["vae.dim_mult=[1,1,1,1,1]", "vae.temperal_downsample=[false,true,true,false]"])
    with pytest.raises(UserError, match=r"settings\.width: 48 is not a multiple of 32 \(this model's VAE factor 16 x patch 2\)"):
        check_story_fits(sized(48, 64), coarse, available=GIB)
    with pytest.raises(UserError, match=r"settings\.height: 16 is below 32 px: this I2V model encodes the story's first frame"):
        check_story_fits(sized(32, 16), tiny, available=GIB)
    check_story_fits(parse_story({"settings": {"width": 32, "height": 16, "frames": 5}, "shots": ["a"]}), tiny, available=GIB)
    huge = sized(16_000, 16_000)  # the probe's 100000 px story gave an allocation error after the model loaded
    assert estimate_bytes(huge, tiny)["latents"] == 2 * 2 * 2000**2 * (2 * 16 + 20) * 4
    with pytest.raises(
        UserError,
        match=r"a 16000x16000 story of 2 shots of 5 frames needs at least \d+\.\d GiB "
        r"\(latents 3\.1, .*weights not counted\) but the devices have 1\.0 GiB in all",
    ) as e:
        check_story_fits(huge, tiny, available=GIB)
    assert "\n" not in str(e.value)


def test_story_settings_override_the_model_sampler():
    """One sampler config: the model's `sampler`, with each setting a story gives taking precedence."""
    from onestory_jax.config import SamplerConfig
    from onestory_jax.sampling.story import with_sampler

    story = with_sampler(
        parse_story({**GOOD, "settings": {**GOOD["settings"], "steps": 7}}),
        SamplerConfig(steps=20, guidance=3.0, negative_prompt="blur"),
    )
    s = story.settings
    assert (s.steps, s.guidance, s.shift, s.solver, s.negative_prompt) == (7, 3.0, 3.0, "unipc", "blur")


def test_memory_budget_precedence_story_then_command_line_then_model():
    """A story's memory.budget wins; without one, the model config's, which `sample.py ... memory.budget=2` sets."""
    from onestory_jax.config_files import load_config
    from onestory_jax.sampling.pipeline import story_spec
    from onestory_jax.sampling.story import with_sampler

    cli, model = load_config("tiny", ["memory.budget=2"]), load_config("tiny")
    size = {"width": 32, "height": 32, "frames": 5}
    plain = parse_story({"settings": size, "shots": ["a", "b"]})
    assert plain.memory.budget is None
    assert story_spec(cli, with_sampler(plain, cli.sampler))[0].memory.budget == 2
    assert story_spec(model, with_sampler(plain, model.sampler))[0].memory.budget == model.memory.budget
    own = with_sampler(parse_story({"settings": size, "memory": {"budget": 3}, "shots": ["a"]}), cli.sampler)
    assert story_spec(cli, own)[0].memory.budget == 3
    with pytest.raises(ValueError, match="not resolved"):  # the parts take a story resolved once, at the top
        story_spec(cli, plain)


def test_cli_warnings_are_one_line_without_source():
    import subprocess
    import sys

    code = (
        "import warnings\nfrom onestory_jax.errors import run_cli\n"
        "def main(argv):\n    warnings.warn('the sky is odd')  # this source line must not print\n"
        "run_cli(main, [])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "warning: the sky is odd (UserWarning)\n", r.stderr

"""Every converter takes the architecture from the source's config.json: diffusers / transformers folders of
sizes no preset has convert without `--config`, verify against their reference modules, and form a model folder."""

import dataclasses
import json
import shutil

import pytest
from torch_refs import diffusers_dit, tiny_dit_config

from onestory_jax.checkpoint import load_config_from_checkpoint
from onestory_jax.config import ImageEncoderConfig, TextEncoderConfig, VAEConfig
from onestory_jax.config_files import CONFIG_DIR
from onestory_jax.convert.__main__ import main
from onestory_jax.convert.image_encoder import CONFIG_JSON as CLIP_JSON
from onestory_jax.convert.text_encoder import CONFIG_JSON as UMT5_JSON
from onestory_jax.errors import UserError, run_cli

TEXT_DIM, IMAGE_DIM = 40, 24  # widths no preset pairs: the default config (4096, 1280) fits none of them
LATENTS_MEAN, LATENTS_STD = [0.1, -0.2, 0.3, 0.0, 0.5, -0.6, 0.7, 0.2], [1.5, 0.5, 2.0, 1.0, 1.2, 0.8, 1.1, 0.9]
EXPECTED = {
    "vae": (
        "vae",
        VAEConfig(
            base_dim=8,
            z_dim=8,
            dim_mult=(1, 2, 2, 3),
            num_res_blocks=1,
            latents_mean=tuple(LATENTS_MEAN),
            latents_std=tuple(LATENTS_STD),
        ),
    ),
    "umt5": (
        "text_encoder",
        TextEncoderConfig(
            vocab_size=300,
            d_model=TEXT_DIM,
            d_kv=6,
            d_ff=56,
            num_layers=3,
            num_heads=5,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=40,
            eps=1e-5,
        ),
    ),
    "clip": (
        "image_encoder",
        ImageEncoderConfig(
            image_size=32, patch_size=8, hidden_size=IMAGE_DIM, intermediate_size=40, num_layers=3, num_heads=3, eps=1e-6
        ),
    ),
}


def umt5_config():
    from transformers import UMT5Config

    c = EXPECTED["umt5"][1]
    return UMT5Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_kv=c.d_kv,
        d_ff=c.d_ff,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        layer_norm_epsilon=c.eps,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )


def clip_config(**changes):
    from transformers import CLIPVisionConfig

    c = EXPECTED["clip"][1]
    return CLIPVisionConfig(
        **{
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads,
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "layer_norm_eps": c.eps,
            "hidden_act": "gelu",
            **changes,
        }
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A diffusers pipeline folder of odd sizes, written by diffusers' and transformers' save_pretrained."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, UMT5EncoderModel

    src = tmp_path_factory.mktemp("src") / "odd-sizes"
    dit = dataclasses.replace(tiny_dit_config("i2v"), text_dim=TEXT_DIM, image_dim=IMAGE_DIM)
    diffusers_dit(dit).save_pretrained(src / "transformer")
    v = EXPECTED["vae"][1]
    AutoencoderKLWan(
        base_dim=v.base_dim,
        z_dim=v.z_dim,
        dim_mult=list(v.dim_mult),
        num_res_blocks=v.num_res_blocks,
        temperal_downsample=list(v.temperal_downsample),
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    ).save_pretrained(src / "vae")
    UMT5EncoderModel(umt5_config()).save_pretrained(src / "text_encoder")
    CLIPVisionModel(clip_config()).save_pretrained(src / "image_encoder")
    return src, dit


@pytest.fixture(scope="module")
def model_folder(source, tmp_path_factory):
    """The release converted with --component all, --verify and no --config."""
    src, _ = source
    folder = tmp_path_factory.mktemp("model")
    shutil.copytree(CONFIG_DIR / "tokenizers" / "bytes", src / "tokenizer")
    assert main(["--component", "all", "--source", str(src), "--out", str(folder / "m"), "--verify"]) == 0
    return folder / "m"


@pytest.mark.parametrize("component", ["vae", "umt5", "clip"])
def test_encoder_architecture_comes_from_config_json(model_folder, component):
    section, expected = EXPECTED[component]
    written = load_config_from_checkpoint(model_folder / section)
    assert getattr(written, section) == expected
    if component == "umt5":  # the DiT section follows the encoder's width, whatever the defaults say
        assert written.dit.text_dim == TEXT_DIM
    if component == "clip":
        assert written.dit.image_dim == IMAGE_DIM


def test_dit_converts_without_a_matching_config(model_folder, source):
    _, dit = source
    written = load_config_from_checkpoint(model_folder / "onestory")
    assert (written.dit.text_dim, written.dit.image_dim, written.dit.dim) == (TEXT_DIM, IMAGE_DIM, dit.dim)
    assert written.text_encoder.d_model == TEXT_DIM and written.image_encoder.hidden_size == IMAGE_DIM


def test_the_parts_form_one_model_folder(model_folder):
    from onestory_jax.models.folder import folder_config

    cfg = folder_config(model_folder)
    assert (cfg.vae, cfg.text_encoder, cfg.image_encoder) == tuple(EXPECTED[c][1] for c in ("vae", "umt5", "clip"))


def test_config_json_defaults_and_composites():
    """Keys save_pretrained omits take the source class's default; a CLIPConfig's vision_config is read."""
    assert UMT5_JSON.section({"model_type": "umt5"}, TextEncoderConfig()) == TextEncoderConfig(
        vocab_size=250112, d_model=512, d_ff=1024, num_layers=8, num_heads=6
    )
    assert (
        CLIP_JSON.section({"model_type": "clip", "vision_config": clip_config().to_dict()}, ImageEncoderConfig())
        == EXPECTED["clip"][1]
    )
    quick = CLIP_JSON.section(clip_config(hidden_act="quick_gelu").to_diff_dict(), ImageEncoderConfig())  # the default: omitted
    assert quick.activation == "quick_gelu"
    with pytest.raises(UserError, match="relu"):
        CLIP_JSON.section(clip_config(hidden_act="relu").to_diff_dict(), ImageEncoderConfig())
    with pytest.raises(UserError, match="describes a t5, not a umT5"):
        UMT5_JSON.section({"model_type": "t5"}, TextEncoderConfig())


def test_unsupported_config_json_is_one_line(source, tmp_path, capsys):
    src, _ = source
    bad = tmp_path / "vae"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**json.loads((src / "vae" / "config.json").read_text()), "is_residual": True}))
    for f in (src / "vae").glob("*.safetensors"):
        (bad / f.name).symlink_to(f)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--component", "vae", "--source", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "is_residual=True is not supported" in err and "config.json" in err and not (tmp_path / "out").exists()

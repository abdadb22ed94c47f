"""The Flax umT5 encoder against transformers' UMT5EncoderModel (random weights, fp32), its
converters (transformers and original Wan names), the tokenizer front-end and the embedding cache."""

import json
import re
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch_refs import state_dict_numpy
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from onestory_jax.config import TextEncoderConfig
from onestory_jax.convert.text_encoder import UMT5, convert_umt5
from onestory_jax.errors import UserError
from onestory_jax.models.embedding_cache import EmbeddingCache, encoder_identity
from onestory_jax.models.prompts import clean_prompt, encode_prompts, load_tokenizer, tokenize
from onestory_jax.models.text_encoder import UMT5Encoder, relative_position_buckets

TINY = TextEncoderConfig(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
LENGTHS = (7, 200)  # two prompts; 200 tokens reach the log-spaced buckets beyond max_distance 128

# wan_reference.md section 4: transformers name -> original Wan name (written from the table, not our map).
HF_TO_ORIGINAL = [
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
]


def hf_config(cfg: TextEncoderConfig) -> UMT5Config:
    return UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=cfg.eps,
    )


def to_original(tensors: dict) -> dict:
    """Rename a transformers state dict (values or shapes) to Wan's names; drop the tied copy."""
    out = {}
    for name, value in tensors.items():
        if name == "encoder.embed_tokens.weight":
            continue
        renamed = [re.sub(f"^{p}$", r, name) for p, r in HF_TO_ORIGINAL if re.fullmatch(p, name)]
        assert len(renamed) == 1, name
        out[renamed[0]] = value
    return out


@pytest.fixture(scope="module")
def reference():
    """A random UMT5EncoderModel (norm weights perturbed), its state dict, inputs and outputs."""
    torch.manual_seed(0)
    model = UMT5EncoderModel(hf_config(TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    rng = np.random.default_rng(0)
    ids = np.zeros((2, TINY.text_len), np.int32)
    mask = np.arange(TINY.text_len)[None] < np.asarray(LENGTHS)[:, None]
    ids[mask] = rng.integers(2, TINY.vocab_size, mask.sum())
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state
    return model, state_dict_numpy(model), ids, mask, ref.numpy()


def _check(params, ids, mask, ref) -> float:
    out = np.asarray(jax.jit(UMT5Encoder(TINY).apply)({"params": params}, ids, mask))
    assert out.shape == (2, 512, TINY.d_model)
    assert np.all(out[~mask] == 0), "padded positions must be zero"
    return float(np.abs(out[mask] - ref[mask]).max() / np.abs(ref[mask]).max())


def test_matches_transformers(reference):
    _, sd, ids, mask, ref = reference
    params = convert_umt5(TINY, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    assert _check(params, ids, mask, ref) < 1e-4


def test_original_layout_matches_transformers(reference):
    _, sd, ids, mask, ref = reference
    orig = to_original(sd)
    params = convert_umt5(TINY, {k: v.shape for k, v in orig.items()}, orig.__getitem__, "original")
    assert _check(params, ids, mask, ref) < 1e-4


def test_relative_buckets_match_transformers(reference):
    model = reference[0]
    rel = torch.arange(512)[None, :] - torch.arange(512)[:, None]
    expected = model.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(rel).numpy()
    np.testing.assert_array_equal(relative_position_buckets(512, 32, 128), expected)


def test_strict_conversion_lists_every_problem(reference):
    sd = dict(reference[1])
    shapes = {k: v.shape for k, v in sd.items()}
    del shapes["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    shapes["encoder.block.0.extra.weight"] = (3,)
    shapes["encoder.final_layer_norm.weight"] = (31,)
    with pytest.raises(
        UserError, match=r"1 missing: .*wo\.weight; 1 unexpected: .*extra\.weight; 1 mis-shaped: .*final_layer_norm"
    ):
        convert_umt5(TINY, shapes, sd.__getitem__, "diffusers")


def test_tied_embedding_name_alone_is_accepted(reference):
    sd = {k: v for k, v in reference[1].items() if k != "shared.weight"}
    params = convert_umt5(TINY, {k: v.shape for k, v in sd.items()}, sd.__getitem__, "diffusers")
    np.testing.assert_array_equal(params["token_embedding"]["embedding"], sd["encoder.embed_tokens.weight"])


def test_full_size_key_map():
    """umt5-xxl names and shapes (meta tensors) map onto our abstract tree (its sharding: tests/test_sharding.py)."""
    cfg = TextEncoderConfig()
    with torch.device("meta"):
        model = UMT5EncoderModel(hf_config(cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    UMT5.check(cfg, shapes, "diffusers")
    UMT5.check(cfg, to_original(shapes), "original")


# ---------------------------------------------------------------------------------------------
# tokenizer and cache

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "runs", "&", "<b>"]


@pytest.fixture
def tokenizer_dir(tmp_path):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_tokenizer_loads_pads_and_truncates(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    with pytest.warns(UserWarning, match="a prompt has 601 tokens; truncated to 512"):
        ids, mask = tokenize(tok, ["a  red\nfox", "fox " * 600], 512)
    assert ids.shape == mask.shape == (2, 512) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, :5], [3, 4, 5, 1, 0])
    assert mask.sum(1).tolist() == [4, 512] and ids[1, -1] == 1  # </s> kept after truncation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(tok, ["a fox"], 512)


def add_to_config(folder, entries: dict) -> None:
    """`entries` set in the tokenizer folder's tokenizer_config.json."""
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | entries))


CAPTIONS = ["a red fox", "", "  fox&runs  ", "狐狸 runs 🦊 é", "fox " * 40, "a <b> red"]


@pytest.mark.parametrize("sides", [{}, {"padding_side": "left", "truncation_side": "left"}])
@pytest.mark.parametrize("which", ["bytes", "words"])
def test_plain_tokenizer_folders_tokenize_as_transformers_does(which, sides, tokenizer_dir, tmp_path):
    """A plain tokenizer folder is read without transformers; ids, masks and lengths equal AutoTokenizer's."""
    from transformers import AutoTokenizer

    from onestory_jax.config_files import CONFIG_DIR
    from onestory_jax.models.prompts import JsonTokenizer

    folder = tmp_path / "t"
    shutil.copytree(CONFIG_DIR / "tokenizers" / "bytes" if which == "bytes" else tokenizer_dir, folder)
    add_to_config(folder, sides)
    ours, reference = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert isinstance(ours, JsonTokenizer)
    assert ours.lengths(CAPTIONS) == [len(ids) for ids in reference(CAPTIONS)["input_ids"]]
    enc = reference(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    ids, mask = ours.padded(CAPTIONS, 16)
    np.testing.assert_array_equal(ids, enc["input_ids"])
    np.testing.assert_array_equal(mask, enc["attention_mask"])


@pytest.mark.parametrize("extra", [{"add_bos_token": True}, {"split_special_tokens": True}])
def test_a_folder_that_transformers_changes_goes_through_transformers(extra, tokenizer_dir):
    from onestory_jax.models.prompts import TransformersTokenizer

    add_to_config(tokenizer_dir, extra)
    assert isinstance(load_tokenizer(tokenizer_dir), TransformersTokenizer)


def test_the_byte_tokenizer_loads_without_transformers():
    code = (
        "import sys\nfrom onestory_jax.config_files import CONFIG_DIR\nfrom onestory_jax.models.prompts import load_tokenizer\n"
        "load_tokenizer(CONFIG_DIR / 'tokenizers' / 'bytes')\nprint(sorted({'transformers', 'torch'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "[]\n", r.stdout + r.stderr


def test_a_broken_plain_tokenizer_is_a_user_error(tokenizer_dir):
    (tokenizer_dir / "tokenizer.json").write_text("{")
    with pytest.raises(UserError, match="cannot load a tokenizer from .*tokenizer.json"):
        load_tokenizer(tokenizer_dir)


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; &lt;b&gt;\n\tfox ") == "a & <b> fox"


def test_missing_tokenizer_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"not found: put the files of the google/umt5-xxl tokenizer there \(tokenizer\.json"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="google/umt5-xxl"):
        load_tokenizer(tmp_path / "empty")


def test_encode_prompts_uses_the_cache(tokenizer_dir, tmp_path):
    tok, calls = load_tokenizer(tokenizer_dir), []

    def encode(ids, mask):  # a stand-in encoder: embeds each id as a 2-vector
        calls.append(len(ids))
        return np.stack([ids, -ids], -1).astype(np.float32) * mask[..., None]

    cache = EmbeddingCache(tmp_path / "cache", encoder_identity(TINY, tmp_path / "ckpt.pth"))
    first = encode_prompts(["red fox", "a", "red fox"], tok, encode, 16, cache)
    assert first.shape == (3, 16, 2) and calls == [2]
    np.testing.assert_array_equal(first[0, :4, 0], [4, 5, 1, 0])
    np.testing.assert_array_equal(first[0], first[2])
    again = encode_prompts(["a", "red fox"], tok, encode, 16, cache)
    assert calls == [2]
    np.testing.assert_array_equal(again, first[[1, 0]])
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".npy", ".npy"]  # no temp files left


def test_cache_identity_depends_on_config_and_checkpoint(tmp_path):
    base = encoder_identity(TINY, tmp_path / "a.pth")
    assert base == encoder_identity(TINY, tmp_path / "a.pth")
    assert base != encoder_identity(TINY, tmp_path / "b.pth")
    assert base != encoder_identity(TextEncoderConfig(), tmp_path / "a.pth")
    (tmp_path / "a.pth").write_bytes(b"weights")
    assert base != encoder_identity(TINY, tmp_path / "a.pth")

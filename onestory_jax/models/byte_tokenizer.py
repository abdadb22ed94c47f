"""The byte-level tokenizer shipped in configs/tokenizers/bytes for random-weight and small models.

Every UTF-8 byte is one token (ids 3..258), plus <pad>=0, </s>=1 (appended) and <unk>=2, so any
caption tokenizes without downloaded files. Rebuild with `python -m onestory_jax.models.byte_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from onestory_jax.config_files import CONFIG_DIR

OUT = CONFIG_DIR / "tokenizers" / "bytes"


def build(out: Path = OUT) -> None:
    """Write tokenizer.json + tokenizer_config.json (a transformers fast tokenizer) to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(out)
    )


if __name__ == "__main__":
    build()
    print(f"wrote {OUT}")

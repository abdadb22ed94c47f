"""Prompts on the host: the umT5 tokenizer (local files only), Wan's prompt cleaning, tokenizing,
and encoding through an encoder function with an on-disk embedding cache."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from onestory_jax.errors import UserError
from onestory_jax.models.embedding_cache import EmbeddingCache

TOKENIZER_FILES = "tokenizer.json, tokenizer_config.json, special_tokens_map.json, spiece.model"


# A folder whose tokenizer_config.json names one of these classes, with no key beyond NEUTRAL_KEYS, and whose
# tokenizer.json stores no padding or truncation, gets nothing from transformers beyond tokenizer.json: it is read
# with `tokenizers` alone, without transformers, whose import pulls torch (4.5 s of the demo's 20 s). Any other
# folder (umT5's T5Tokenizer; add_bos_token, added tokens, add_prefix_space...) goes through AutoTokenizer.
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
NEUTRAL_KEYS = frozenset(
    ("backend", "tokenizer_class", "model_max_length", "clean_up_tokenization_spaces", "padding_side", "truncation_side")
    + ("bos_token", "eos_token", "unk_token", "pad_token")
)


class Tokenizer(Protocol):
    """What prompt encoding needs of a tokenizer; </s> (the post-processor's special tokens) included."""

    def lengths(self, texts: list[str]) -> list[int]:
        """Each text's token count, untruncated."""
        ...

    def padded(self, texts: list[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, text_len], attention mask [N, text_len]): truncated or padded to text_len."""
        ...


@dataclasses.dataclass(frozen=True)
class JsonTokenizer:
    """A tokenizer.json run by `tokenizers`, padded and truncated as transformers' fast tokenizers do it."""

    backend: Any  # tokenizers.Tokenizer
    pad_token: str
    pad_id: int
    padding_side: str = "right"
    truncation_side: str = "right"

    def lengths(self, texts: list[str]) -> list[int]:
        self.backend.no_truncation()
        self.backend.no_padding()
        return [len(e.ids) for e in self.backend.encode_batch(texts, add_special_tokens=True)]

    def padded(self, texts: list[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
        self.backend.enable_truncation(text_len, direction=self.truncation_side)
        self.backend.enable_padding(length=text_len, direction=self.padding_side, pad_id=self.pad_id, pad_token=self.pad_token)
        encoded = self.backend.encode_batch(texts, add_special_tokens=True)
        return np.array([e.ids for e in encoded]), np.array([e.attention_mask for e in encoded])


@dataclasses.dataclass(frozen=True)
class TransformersTokenizer:
    """A transformers tokenizer (AutoTokenizer) behind the `Tokenizer` protocol."""

    backend: Any

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.backend(texts, add_special_tokens=True, verbose=False)["input_ids"]]

    def padded(self, texts: list[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
        enc = self.backend(
            texts, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True, return_tensors="np"
        )
        return enc["input_ids"], enc["attention_mask"]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The google/umt5-xxl tokenizer (or the byte tokenizer) from a local directory (never the network)."""
    path = Path(path)
    hint = f"put the files of the google/umt5-xxl tokenizer there ({TOKENIZER_FILES})"
    if not path.is_dir():
        raise UserError(f"tokenizer directory '{path}' not found: {hint}")
    try:
        plain = plain_tokenizer(path)
        if plain is not None:
            return plain
        from transformers import AutoTokenizer

        return TransformersTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from '{path}' ({e}): {hint}") from None


def plain_tokenizer(path: Path) -> JsonTokenizer | None:
    """The folder's tokenizer.json as a `JsonTokenizer` when transformers would add nothing to it (above); else None."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None  # no or unreadable config: transformers decides (and explains)
    if not isinstance(config, dict) or config.get("tokenizer_class") not in PLAIN_CLASSES or set(config) - NEUTRAL_KEYS:
        return None
    if not isinstance(config.get("pad_token"), str) or not (path / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"tokenizer.json: {e}") from None
    if backend.padding is not None or backend.truncation is not None:
        return None
    pad_id = backend.token_to_id(config["pad_token"])
    if pad_id is None:
        raise ValueError(f"its pad token {config['pad_token']!r} is not in tokenizer.json")
    sides = {k: config[k] for k in ("padding_side", "truncation_side") if config.get(k) in ("left", "right")}
    return JsonTokenizer(backend, config["pad_token"], pad_id, **sides)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without ftfy's mojibake repair: unescape HTML twice, collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def tokenize(tokenizer: Tokenizer, prompts: Sequence[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids int32 [N, text_len], mask bool [N, text_len]); </s> appended, longer prompts truncated."""
    texts = [clean_prompt(p) for p in prompts]
    for text, n in zip(texts, tokenizer.lengths(texts)):
        if n > text_len:
            warnings.warn(f"a prompt has {n} tokens; truncated to {text_len}: {text[:60]!r}...", stacklevel=2)
    ids, mask = tokenizer.padded(texts, text_len)
    return ids.astype(np.int32), mask.astype(bool)


def encode_prompts(
    prompts: Sequence[str],
    tokenizer: Tokenizer,
    encode: Callable[[np.ndarray, np.ndarray], Any],
    text_len: int,
    cache: EmbeddingCache | None = None,
) -> np.ndarray:
    """Prompts -> fp32 [N, text_len, D] embeddings, zero past each prompt's tokens.

    `encode(ids, mask)` runs the encoder (e.g. a jitted `UMT5Encoder.apply`). With a cache, each
    prompt's valid rows are looked up first and stored after encoding.
    """
    found = {p: cache.get(p) for p in set(prompts)} if cache is not None else {}
    todo = sorted(p for p in set(prompts) if found.get(p) is None)
    if todo:
        ids, mask = tokenize(tokenizer, todo, text_len)
        out = np.asarray(encode(ids, mask), np.float32)
        for prompt, rows, m in zip(todo, out, mask):
            found[prompt] = rows[: m.sum()]
            if cache is not None:
                cache.put(prompt, found[prompt])
    dim = next(iter(found.values())).shape[-1]
    result = np.zeros((len(prompts), text_len, dim), np.float32)
    for i, p in enumerate(prompts):
        result[i, : len(found[p])] = found[p]
    return result

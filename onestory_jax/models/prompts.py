"""Prompts on the host: the umT5 tokenizer (local files only), Wan's prompt cleaning, tokenizing,
and encoding through an encoder function with an on-disk embedding cache."""

from __future__ import annotations

import html
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onestory_jax.errors import UserError
from onestory_jax.models.embedding_cache import EmbeddingCache

TOKENIZER_FILES = "tokenizer.json, tokenizer_config.json, special_tokens_map.json, spiece.model"


def load_tokenizer(path: str | Path) -> Any:
    """The google/umt5-xxl tokenizer from a local directory (never the network)."""
    from transformers import AutoTokenizer

    path = Path(path)
    hint = f"put the files of the google/umt5-xxl tokenizer there ({TOKENIZER_FILES})"
    if not path.is_dir():
        raise UserError(f"tokenizer directory '{path}' not found: {hint}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from '{path}' ({e}): {hint}") from None


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without ftfy's mojibake repair: unescape HTML twice, collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def tokenize(tokenizer: Any, prompts: Sequence[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids int32 [N, text_len], mask bool [N, text_len]); </s> appended, longer prompts truncated."""
    texts = [clean_prompt(p) for p in prompts]
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]):
        if len(ids) > text_len:
            warnings.warn(f"a prompt has {len(ids)} tokens; truncated to {text_len}: {text[:60]!r}...", stacklevel=2)
    enc = tokenizer(
        texts, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True, return_tensors="np"
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)


def encode_prompts(
    prompts: Sequence[str],
    tokenizer: Any,
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

"""The grain training pipeline: seeded shuffle, per-host shards, shot inflation, three-shot examples.

Each example predicts the last of three shots from the two before it. Videos with >= 3 shots give
real triplets (consecutive shots, or with `train.memory_pick: recall` the target's latest earlier
appearance and the shot before it); two-shot videos are inflated with a synthetic shot (paper section 5): a shot from
another video (pseudo-label -1) or the augmented first shot (pseudo-label 0), in either order.
Real memory frames are labelled by the cosine similarity of their embedding to the target shot's
mean embedding. With `memory.selector_reads_captions` each memory frame also carries its shot's pooled
caption (`memory_text`: the inserted shot's own, the augmented first shot's shot 1's). A share
`train.first_shot_prob` of I2V examples is instead shot 1 generated from its first frame with no
memory (Wan's image-to-video task), so a start image counts when sampling.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import grain
import numpy as np

from onestory_jax.config import Config
from onestory_jax.data.records import RecordFiles, check_record_fits
from onestory_jax.data.video import i2v_channels
from onestory_jax.errors import UserError
from onestory_jax.models.memory import caption_summary, num_selected

Example = dict[str, np.ndarray]
INSERTED_LABEL, AUGMENTED_LABEL = -1.0, 0.0


def cosine_to_target(frames: np.ndarray, target: np.ndarray) -> np.ndarray:
    """frames [T, E], target [T', E] -> cosine of each frame to the target's mean embedding [T]."""
    t = target.mean(axis=0)
    num = frames @ t
    return (num / (np.linalg.norm(frames, axis=1) * np.linalg.norm(t) + 1e-8)).astype(np.float32)


def padded_text(video: dict[str, np.ndarray], shot: int, text_len: int) -> np.ndarray:
    """A record's shot caption embedding [text_len, text_dim], zero-padded after its length."""
    n = int(video["text_lengths"][shot])
    out = np.zeros((text_len, video["text"].shape[-1]), np.float32)
    out[:n] = video["text"][shot, :n]
    return out


def memory_shots(keys: np.ndarray, n_shots: int, rng: np.random.Generator, pick: str) -> tuple[int, int, int]:
    """(older memory shot, newer memory shot, target shot) of a real triplet.

    consecutive: shots k, k + 1, k + 2. recall: a random target j >= 2; memory = the latest shot
    before j - 1 that shows the target's identity key (a random earlier shot when there is none,
    or the key is unknown: -1), then shot j - 1, in time order."""
    if pick == "consecutive":
        k = int(rng.integers(0, n_shots - 2))
        return k, k + 1, k + 2
    j = int(rng.integers(2, n_shots))
    same = [i for i in range(j - 1) if keys[j] >= 0 and keys[i] == keys[j]]
    return (same[-1] if same else int(rng.integers(0, j - 1))), j - 1, j


def with_loss_weight(example: Example, video: dict[str, np.ndarray], shot: int, cfg: Config) -> Example:
    """The example with L_shot's cell weights (train.character_loss_weight > 0): 1 + W x the target shot's
    character share per latent cell, or 1 where the record knows no characters."""
    w = cfg.train.character_loss_weight
    if w == 0.0:
        return example
    cells = video["character_cells"][shot] if "character_cells" in video else np.zeros(example["target"].shape[:-1], np.float32)
    return {**example, "loss_weight": (1.0 + w * cells).astype(np.float32)}


def with_memory_text(example: Example, shots: list[tuple[dict[str, np.ndarray], int]], cfg: Config) -> Example:
    """The example with each memory frame's shot caption `memory_text` [F, text_dim] (zeros: no shot) when
    the selector reads captions; shots: the (record, shot index) of each memory shot of T latent frames."""
    if not cfg.memory.selector_reads_captions:
        return example
    out = np.zeros((example["memory"].shape[0], cfg.dit.text_dim), np.float32)
    t = example["target"].shape[0]
    for i, (video, shot) in enumerate(shots):
        out[i * t : (i + 1) * t] = caption_summary(padded_text(video, shot, cfg.dit.text_len))
    return {**example, "memory_text": out}


def first_shot_example(video: dict[str, np.ndarray], cfg: Config) -> Example:
    """Shot 1 generated from its first frame (Wan's I2V task), with an empty memory."""
    lat = video["latents"]
    t = lat.shape[1]
    example = with_loss_weight(
        {
            "target": lat[0].astype(np.float32),
            "memory": np.zeros((2 * t, *lat.shape[2:]), np.float32),
            "memory_valid": np.zeros((2 * t,), bool),
            "labels": np.zeros((2 * t,), np.float32),
            "text": padded_text(video, 0, cfg.dit.text_len),
            "image": video["image_tokens"].astype(np.float32),
            "cond": i2v_channels(video["first_image"]),
        },
        video,
        0,
        cfg,
    )
    return with_memory_text(example, [], cfg)


def three_shot_example(video: dict[str, np.ndarray], rng: np.random.Generator, other: Any, cfg: Config) -> Example:
    """One training example from a video record (see module docstring); `other(rng)` draws another video."""
    lat, emb, tc = video["latents"], video["frame_embeddings"], cfg.train
    n_shots, t = lat.shape[:2]
    if n_shots < 2:
        raise UserError(f"dataset video '{video['id'].item().decode()}' has {n_shots} shot(s); training needs >= 2")
    if cfg.dit.has_image_branch and rng.random() < tc.first_shot_prob:
        return first_shot_example(video, cfg)
    if n_shots >= 3:
        a, b, last = memory_shots(video["shot_keys"], n_shots, rng, tc.memory_pick)
        memory = [lat[a], lat[b]]
        labels = [cosine_to_target(emb[a], emb[last]), cosine_to_target(emb[b], emb[last])]
        captions = [(video, a), (video, b)]
    else:
        last = 1
        real, real_label = lat[0], cosine_to_target(emb[0], emb[1])
        if rng.random() < tc.insertion_prob:
            o = other(rng)
            k = int(rng.integers(0, o["latents"].shape[0]))
            syn, syn_label, syn_caption = o["latents"][k], INSERTED_LABEL, (o, k)
        else:
            syn, syn_label, syn_caption = video["augmented_first"], AUGMENTED_LABEL, (video, 0)
        syn_labels = np.full((t,), syn_label, np.float32)
        if rng.random() < tc.swap_order_prob:
            memory, labels, captions = [syn, real], [syn_labels, real_label], [syn_caption, (video, 0)]
        else:
            memory, labels, captions = [real, syn], [real_label, syn_labels], [(video, 0), syn_caption]
    h, w = lat.shape[2:4]
    example = {
        "target": lat[last].astype(np.float32),
        "memory": np.concatenate(memory).astype(np.float32),
        "memory_valid": np.ones((2 * t,), bool),
        "labels": np.concatenate(labels).astype(np.float32),
        "text": padded_text(video, last, cfg.dit.text_len),
    }
    if cfg.dit.has_image_branch:
        # The target is never shot 1: CLIP tokens of shot 1's first frame, unless later shots see none
        tokens = video["image_tokens"].astype(np.float32)
        example["image"] = tokens if cfg.memory.later_shots_see_first_image else np.zeros_like(tokens)
        example["cond"] = np.zeros((t, h, w, 4 + lat.shape[-1]), np.float32)  # later shots: mask 0, no image
    return with_loss_weight(with_memory_text(example, captions, cfg), video, last, cfg)


def other_index(rng: np.random.Generator, n: int, exclude: int) -> int:
    """A uniform draw from range(n) without `exclude`: the video a cross-video insertion comes from."""
    if n < 2:
        raise UserError(
            "shot inflation inserts a shot from another video, but the training data holds only one video "
            "(add videos, or set train.insertion_prob=0)"
        )
    j = int(rng.integers(0, n - 1))
    return j + (j >= exclude)


def warn_if_selection_keeps_everything(cfg: Config, frames_per_shot: int, latent_hw: tuple[int, int]) -> None:
    """Warn when the conditioner's K is at least a training example's memory (two shots of
    `frames_per_shot` latent frames): Frame Selection then never drops a frame in training."""
    k, memory = num_selected(cfg.memory, latent_hw), 2 * frames_per_shot
    if k >= memory:
        warnings.warn(
            f"the Adaptive Conditioner keeps K={k} frames at {latent_hw[0]}x{latent_hw[1]} latents, but a "
            f"training example's memory holds {memory} (2 shots x {frames_per_shot} latent frames): Frame "
            "Selection never drops a frame in training. Lower memory.frames_per_patchifier or use longer shots.",
            stacklevel=3,
        )


def make_dataset(cfg: Config, batch_size: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Infinite, seeded, per-host iterator of batched three-shot examples."""
    path = Path(cfg.train.data)
    files = sorted(path.glob("*.arrayrecord")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise UserError(
            f"training data '{path}' does not exist or holds no .arrayrecord files "
            "(train.data=PATH: a records file or folder from onestory_jax.data.prepare)"
        )
    source = RecordFiles(files)  # a damaged file or record: one line naming it
    if len(source) == 0:
        raise UserError(f"training data '{path}' holds no records")
    first = source[0]
    check_record_fits(first, cfg, f"'{files[0]}'")
    latents = first["latents"]
    warn_if_selection_keeps_everything(cfg, latents.shape[1], latents.shape[2:4])

    def example(item: tuple[int, dict[str, np.ndarray]], rng: np.random.Generator) -> Example:
        index, video = item
        return three_shot_example(video, rng, lambda r: source[other_index(r, len(source), index)], cfg)

    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    ds = ds.shuffle(seed=cfg.train.seed).repeat(None)
    ds = ds.map(lambda i: (int(i), source[int(i)]))
    ds = ds.random_map(example, seed=cfg.train.seed)
    # 16 batches read ahead, not grain's default 500: those cost a short run (the tests' train.py runs) ~10 s of CPU
    # after its last step, and a long one their memory (500 batches of latents).
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset(grain.ReadOptions(prefetch_buffer_size=16))

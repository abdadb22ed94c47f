"""Frame Selection alone: can the selector find the recalled character's shot?

Trains only the selector (L_sel against the records' pseudo-labels, the training pipeline's examples)
for --steps, then, on the last --held-out records, ranks every earlier latent frame for each recall
shot (its character is in an earlier shot but not the previous one) and counts how often the top K
frames (the conditioner's K) hold a frame of a shot showing that character: against K evenly spaced
frames (ac_only's `uniform`) and the latest frame (`last_frame`) on the same shots.

    python bench/selector_probe.py --records DIR [--config configs/train/memory-onestory.yaml]
        [--steps 4000] [--held-out 100] [--set memory.selector_pooling=max ...] [--out FILE.json]

The records need `shot_keys` (synthetic stories from `onestory_jax.data.prepare --synthetic`). With
`--set memory.selector_reads_captions=true` each memory frame also carries its shot's caption.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from onestory_jax.config_files import load_config
from onestory_jax.data.pipeline import padded_text, three_shot_example
from onestory_jax.data.records import RecordFiles
from onestory_jax.eval.metrics import mean_ci
from onestory_jax.models.memory import baseline_candidates, num_selected
from onestory_jax.models.onestory import memory_module, memory_scores
from onestory_jax.sampling.memory_bank import slot_captions
from onestory_jax.training.losses import selection_loss

KEYS = ("memory", "memory_valid", "labels", "text", "memory_text")  # memory_text: memory.selector_reads_captions


Videos = list[dict[str, np.ndarray]]


def training_batch(records: Videos, ids: np.ndarray, rng: np.random.Generator, cfg: Any, size: int) -> dict:
    """`size` examples of the training pipeline (three_shot_example) from the records `ids`."""
    pick = lambda r: records[int(r.choice(ids))]  # noqa: E731
    examples = [three_shot_example(pick(rng), rng, pick, cfg) for _ in range(size)]
    return {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in KEYS if k in examples[0]}


def train_selector(records: Videos, ids: np.ndarray, cfg: Any, steps: int, seed: int) -> dict:
    """Memory params whose selector is trained on L_sel alone (AdamW, warm-up + cosine)."""
    rng = np.random.default_rng(seed)
    first = training_batch(records, ids, rng, cfg, 1)
    variables = memory_module(cfg).init(
        jax.random.key(seed), first["text"], first["memory"], first["memory_valid"], first.get("memory_text")
    )
    params = {"memory": nn.meta.unbox(variables["params"])}
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.train.learning_rate, min(100, steps // 10), steps)
    opt = optax.masked(optax.adamw(schedule), jax.tree_util.tree_map_with_path(lambda p, _: "selector" in str(p), params))
    state = opt.init(params)

    @jax.jit
    def step(params: dict, state: Any, batch: dict) -> tuple[dict, Any, jax.Array]:
        def loss(p: dict) -> jax.Array:
            scores = memory_scores(p, cfg, batch["text"], batch["memory"], batch["memory_valid"], batch.get("memory_text"))
            return selection_loss(scores, batch["labels"], batch["memory_valid"])

        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    start = time.time()
    for i in range(steps):
        params, state, value = step(params, state, training_batch(records, ids, rng, cfg, cfg.train.batch_size))
        if (i + 1) % 500 == 0 or i + 1 == steps:
            print(f"step {i + 1}/{steps}: L_sel {float(value):.4f} ({time.time() - start:.0f} s)", flush=True)
    return params


def recall_hits(records: Videos, ids: np.ndarray, params: dict, cfg: Any) -> dict[str, list[bool]]:
    """Per recall shot of the records `ids`: do the top K frames hold the recalled character (selector,
    uniform, last_frame)?"""
    score = jax.jit(lambda t, m, v, mt: memory_scores(params, cfg, t, m, v, mt))
    hits: dict[str, list[bool]] = {"selector": [], "uniform": [], "last_frame": []}
    for i in ids:
        video = records[int(i)]
        latents, keys = video["latents"], video["shot_keys"]
        n_shots, t = latents.shape[:2]
        k = num_selected(cfg.memory, latents.shape[2:4])
        slots = (n_shots - 1) * t  # one memory size for every shot: one compile per story length
        text = np.stack([padded_text(video, s, cfg.dit.text_len) for s in range(n_shots)])
        slot_text = np.asarray(slot_captions(text[:-1], t)) if cfg.memory.selector_reads_captions else None
        for j in range(2, n_shots):
            if keys[j] < 0 or keys[j] == keys[j - 1] or keys[j] not in keys[:j]:
                continue
            memory = np.zeros((slots, *latents.shape[2:]), np.float32)
            memory[: j * t] = latents[:j].reshape(-1, *latents.shape[2:])
            valid = np.arange(slots) < j * t
            memory_text = None if slot_text is None else np.where(valid[:, None], slot_text, 0.0)[None]
            scores = np.asarray(score(text[j][None], memory[None], valid[None], memory_text))[0]
            shot_keys = keys[np.arange(slots) // t]  # [F]: who each memory frame shows
            hits["selector"].append(bool(np.any(shot_keys[np.argsort(-np.where(valid, scores, -np.inf))[:k]] == keys[j])))
            for name in ("uniform", "last_frame"):
                _, chosen = baseline_candidates(name, jnp.asarray(valid), k)
                hits[name].append(bool(np.any(shot_keys[np.asarray(chosen)] == keys[j])))
    return hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=Path, required=True, help="a folder of prepared records (synthetic stories)")
    ap.add_argument("--config", default="configs/train/memory-onestory.yaml")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--held-out", type=int, default=100, help="the last N records are held out for the evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides: memory.selector_pooling=max")
    ap.add_argument("--out", type=Path, help="append the result (JSON lines)")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, ["train.first_shot_prob=0", *args.set])
    files = RecordFiles(sorted(args.records.glob("*.arrayrecord")))
    records = [files[i] for i in range(len(files))]  # decoded once: small toy-world records
    if len(records) <= args.held_out:
        raise SystemExit(f"error: {args.records} holds {len(records)} records; --held-out {args.held_out} leaves none to train")
    ids = np.arange(len(records))
    params = train_selector(records, ids[: -args.held_out], cfg, args.steps, args.seed)
    hits = recall_hits(records, ids[-args.held_out :], params, cfg)
    result = {
        "records": str(args.records),
        "config": args.config,
        "set": args.set,
        "steps": args.steps,
        "recall_shots": len(hits["selector"]),
        **{f"top_k_{name}": float(np.mean(h)) for name, h in hits.items()},
    }
    gain, half, _ = mean_ci(np.asarray(hits["selector"], float) - np.asarray(hits["uniform"], float))
    result["selector_minus_uniform"], result["selector_minus_uniform_ci95"] = gain, half
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

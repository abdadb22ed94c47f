"""Does the DiT learn to read its memory context, in a given latent space? (docs/results.md, the bisect)

    python bench/context_bisect.py --latents pooled|vae [--steps 600] [--frozen models/demo]

Trains the demo-sized DiT and memory modules from scratch (T2V, `train/demo` recipe: batch 16, AdamW
1e-3, shift 3, the project's `loss_fn`) on 300 synthetic 8-shot stories, with one context frame
(`last_frame` of a 2-shot memory): on 80% of examples the latest earlier shot of the target's
character, else another character's. The latents are the frozen VAE's (`vae`) or 8x8 average-pooled
RGB with Wan's 1 + 4 + 4 frame grouping (`pooled`). Then prints teacher-forced L_shot at sigma 0.5,
0.7, 0.9 on the recall shots of 10 held-out stories with the true and with a wrong context frame, and
(VAE latents) the sampled recall colour with each: memory_gates' oracle gate on the bisect's model.
`--radius` renders the characters at another half-size (the spec's fallback b). `vae-image` encodes
frames 0, 4, 8 of a shot each alone: the VAE's latent space with one code for every latent frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from onestory_jax.config_files import load_config
from onestory_jax.data import synthetic
from onestory_jax.data.prepare import character_cells
from onestory_jax.data.video import to_uint8
from onestory_jax.eval.hue import shot_colour
from onestory_jax.eval.metrics import mean_ci
from onestory_jax.models.folder import folder_config, load_frozen_parts
from onestory_jax.models.frozen import build_components
from onestory_jax.models.onestory import init_params
from onestory_jax.sampling.generate import generation_spec
from onestory_jax.sampling.teacher_forced import shot_sampler
from onestory_jax.sharding import activate, make_mesh
from onestory_jax.training.losses import loss_at_sigmas, loss_fn

# story, latents [8, T, h, w, C], captions [8, Lt, D], the character's share of each latent cell [8, T, h, w]
Story = tuple[synthetic.SyntheticStory, np.ndarray, np.ndarray, np.ndarray]


def pooled(video: np.ndarray) -> np.ndarray:
    """uint8 [9, 64, 64, 3] -> [3, 8, 8, 3] in [-1, 1]: frame 0, then means of frames 1-4 and 5-8, 8x8 pooled."""
    x = video.astype(np.float32) / 127.5 - 1
    grouped = np.stack([x[0], x[1:5].mean(0), x[5:9].mean(0)])
    return grouped.reshape(3, 8, 8, 8, 8, 3).mean((2, 4))


def stories(comps, first: int, n: int, kind: str) -> list[Story]:
    out = []
    pooled_std = 1.0 if kind == "pooled" else 0.37  # vae+pooled: the colour channels at about the VAE's unit std
    for seed in range(first, first + n):
        story = synthetic.make_story(seed, 8)
        renders = [synthetic.render_shot(story, i, 9) for i in range(8)]
        videos = [v for v, _ in renders]
        latents = (
            [image_coded(comps, v) for v in videos]
            if kind == "vae-image"
            else [
                np.concatenate(
                    ([comps.encode_video(v.astype(np.float32) / 127.5 - 1)] if kind != "pooled" else [])
                    + ([pooled(v) / pooled_std] if kind in ("pooled", "vae+pooled") else []),
                    -1,
                )
                for v in videos
            ]
        )
        out.append(
            (
                story,
                np.stack(latents),
                comps.encode_text([s.caption for s in story.shots]),
                np.stack([character_cells(m, (8, 8)) for _, m in renders]),
            )
        )
    return out


def image_coded(comps, video: np.ndarray) -> np.ndarray:
    """uint8 [9, 64, 64, 3] -> [3, 8, 8, 16]: frames 0, 4 and 8 each encoded alone, so every latent frame
    is in the first frame's code (the demo VAE's code depends on a latent frame's position in a shot)."""
    return np.concatenate([comps.encode_video(video[k : k + 1].astype(np.float32) / 127.5 - 1) for k in (0, 4, 8)])


def cached_stories(comps, first: int, n: int, args: argparse.Namespace) -> list[Story]:
    """`stories`, kept in runs/bisect/ keyed by the latent kind, radius and frozen folder (encoding 310
    stories takes minutes on 2 cores)."""
    key = f"{args.latents}-r{args.radius}-{args.frozen.resolve().name}-{first}-{n}"
    path = Path("runs/bisect") / f"stories-{key}.npz"
    if not path.exists():
        data = stories(comps, first, n, args.latents)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"{k}{i}": a for i, (_, *arrays) in enumerate(data) for k, a in zip("ltc", arrays, strict=True)})
    saved = np.load(path)
    return [(synthetic.make_story(first + i, 8), saved[f"l{i}"], saved[f"t{i}"], saved[f"c{i}"]) for i in range(n)]


def principal(train: list[Story], held: list[Story], k: int) -> tuple[list[Story], list[Story]]:
    """Project every latent on the top-k principal directions of the training latents' channels,
    rescaled to unit variance (a k-channel latent space that keeps what varies most)."""
    flat = np.concatenate([s[1].reshape(-1, s[1].shape[-1]) for s in train])
    mean = flat.mean(0)
    _, sv, vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = vt[:k].T / (sv[:k] / np.sqrt(len(flat)))
    return tuple([(s, ((lat - mean) @ basis).astype(np.float32), t, c) for s, lat, t, c in part] for part in (train, held))


def example(data: Story, j: int, true_frame: bool, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(target, memory [other shot, context shot], caption) for shot j: the context shot is the latest
    earlier one of the target's character when `true_frame` (and there is one), else another's."""
    story, latents, text, share = data
    c = story.shots[j].characters[0]
    same = [i for i in range(j) if story.shots[i].characters[0] == c]
    others = [i for i in range(j) if story.shots[i].characters[0] != c]
    context = same[-1] if (true_frame and same) else int(rng.choice(others))
    return latents[j], np.concatenate([latents[others[-1]], latents[context]]), text[j], share[j]


def batch(parts: list[tuple[np.ndarray, ...]], weight: float | None) -> dict[str, np.ndarray]:
    """A batch; `weight` W >= 0: L_shot weights each latent cell 1 + W x the share a character covers;
    W < 0: by that share alone (the loss on the characters); None: uniform."""
    target, memory, text, share = (np.stack(p) for p in zip(*parts))
    n, f = memory.shape[:2]
    out = {
        "target": target,
        "memory": memory,
        "memory_valid": np.ones((n, f), bool),
        "labels": np.zeros((n, f), np.float32),
        "text": text,
    }
    if weight is not None:
        out["loss_weight"] = (1.0 + weight * share).astype(np.float32) if weight >= 0 else share.astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", choices=("pooled", "vae", "vae-image", "vae+pooled", "vae-pca3", "vae-pca6"), required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every latent by this (the latent scale)")
    ap.add_argument(
        "--character-weight",
        type=float,
        help="train with L_shot weighting each latent cell 1 + W x the "
        "share of it a character covers (the spec's fallback a); default: uniform",
    )
    ap.add_argument("--frozen", type=Path, default=Path("models/demo"), help="model folder of the VAE and text encoder")
    ap.add_argument("--radius", type=float, default=synthetic.RADIUS, help="the characters' half-size, in image widths")
    ap.add_argument("--guidance", type=float, nargs="+", help="sample recall at each of these CFG scales (default: the recipe's)")
    args = ap.parse_args()
    synthetic.RADIUS = args.radius
    frozen_cfg = folder_config(args.frozen)
    mesh = make_mesh(frozen_cfg.mesh)
    with activate(mesh):
        parts = load_frozen_parts(args.frozen, frozen_cfg, mesh, ["vae", "text_encoder"])
    comps = build_components(frozen_cfg, parts, args.frozen / "tokenizer")
    with activate(mesh):
        train, held = (cached_stories(comps, first, n, args) for first, n in ((0, 300), (10**6, 10)))
    if args.latents.startswith("vae-pca"):
        train, held = principal(train, held, int(args.latents.removeprefix("vae-pca")))
    if args.scale != 1.0:
        train, held = ([(s, lat * np.float32(args.scale), t, c) for s, lat, t, c in part] for part in (train, held))
    channels = train[0][1].shape[-1]
    cfg = load_config(
        "train/demo",
        [
            "dit.model_type=t2v",
            f"dit.in_dim={channels}",
            f"dit.out_dim={channels}",
            f"memory.latent_channels={channels}",
            "memory.train_strategy=last_frame",
        ],
    )
    params = init_params(cfg, jax.random.key(0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, args.steps, 1e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, b, rng):
        (_, metrics), grads = jax.value_and_grad(lambda p: loss_fn(p, b, rng, jnp.array(False), cfg), has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, metrics

    rng = np.random.default_rng(0)
    for i in range(args.steps):
        parts = [example(train[rng.integers(len(train))], int(rng.integers(2, 8)), rng.random() < 0.8, rng) for _ in range(16)]
        params, opt, metrics = step(params, opt, batch(parts, args.character_weight), jax.random.key(i))
        if i % 200 == 0:
            print(f"step {i}: L_shot {float(metrics['l_shot']):.4f}", flush=True)
    sigmas = jnp.asarray([0.5, 0.7, 0.9])
    loss = jax.jit(lambda p, b: loss_at_sigmas(p, b, sigmas, jax.random.key(0), cfg, True))
    for name, weight in (("whole frame", None), ("character cells", -1.0)):  # -1: weights = the character share
        results: dict[bool, list[np.ndarray]] = {True: [], False: []}
        for data in held:
            story = data[0]
            for j in range(2, 8):
                c = story.shots[j].characters[0]
                if story.shots[j - 1].characters[0] != c and any(s.characters[0] == c for s in story.shots[:j]):
                    for true_frame in (True, False):
                        part = example(data, j, true_frame, np.random.default_rng(j))
                        results[true_frame].append(np.asarray(loss(params, batch([part], weight))))
        true, wrong = (np.mean(results[k], axis=0) for k in (True, False))
        print(
            f"{args.latents} latents, {args.steps} steps, character weight {args.character_weight}, "
            f"{len(results[True])} recall shots, L_shot on the {name} at sigma 0.5/0.7/0.9: true frame "
            f"{np.round(true, 4)}, wrong frame {np.round(wrong, 4)}, gain {np.round(1 - true / wrong, 3)}"
        )
    if args.latents in ("vae", "vae-image"):
        for guidance in args.guidance or [cfg.sampler.guidance]:
            with activate(mesh):
                print(f"guidance {guidance}: " + sampled_recall(params, cfg, comps, held, guidance, args.latents == "vae-image"))


def sampled_recall(params: dict, cfg, comps, held: list[Story], guidance: float, image_coded: bool = False) -> str:
    """The oracle gate on the bisect's model: each recall shot sampled (20 steps, the recipe's sampler)
    from the same noise with the true and with a wrong context frame, decoded (image-coded latents one
    frame at a time), its hue checked, at CFG scale `guidance`."""
    spec = generation_spec(cfg, "last_frame", 1, (8, 8), 20, cfg.sampler.shift, cfg.sampler.solver, guidance)
    sample = shot_sampler(params, cfg, spec, max_memory_shots=1)
    hits: dict[bool, list[bool]] = {True: [], False: []}
    for data in held:
        story, latents, text, _ = data
        for j in range(2, 8):
            c = story.shots[j].characters[0]
            if story.shots[j - 1].characters[0] != c and any(s.characters[0] == c for s in story.shots[:j]):
                noise = np.asarray(jax.random.normal(jax.random.key(j), latents[j].shape))
                for true_frame in (True, False):
                    _, memory, _, _ = example(data, j, true_frame, np.random.default_rng(j))
                    out = sample([memory.reshape(2, *latents[j].shape)[1]], text[j], noise)
                    frames = [out[k : k + 1] for k in range(len(out))] if image_coded else [out]
                    video = np.concatenate([comps.decode_latents(f) for f in frames])
                    hits[true_frame].append(shot_colour(to_uint8(video)) == story.characters[c].colour)
    paired = np.asarray(hits[True], float) - np.asarray(hits[False], float)
    _, half, _ = mean_ci(paired)
    return (
        f"sampled recall colour ({len(paired)} shots): true frame {np.mean(hits[True]):.3f}, wrong frame "
        f"{np.mean(hits[False]):.3f}, paired {paired.mean():+.3f} ± {half:.3f}"
    )


if __name__ == "__main__":
    main()

"""Prepare training records: videos -> shots -> VAE latents, caption embeddings, pseudo-label features.

    python -m onestory_jax.data.prepare --model DIR --out DIR --videos DIR --captions FILE.jsonl \\
        [--boundaries FILE.jsonl] [--embedder pixel|dinov2:PATH|clip:PATH ...]
    python -m onestory_jax.data.prepare --model DIR --out DIR --synthetic N [--seed S] [--character-weight W]

Sharded (a pod, or many machines on one shared --out): `--shard I/N` prepares every N-th video from
the I-th, `--distributed` one shard per process; each writes its records, and the manifest lists all
records present. A re-run (any shard, or all at once) completes what is missing.

--model is a model folder holding the frozen parts (vae/, text_encoder/, image_encoder/ for I2V,
tokenizer/): converted Wan2.1 weights or the embedded default's. --captions has one JSON object a
line, {"video": "NAME.mp4", "captions": ["shot 1", ...]}; --boundaries, {"video": "NAME.mp4",
"shots": [[start, end), ...]} in frames; videos without boundaries are cut by PySceneDetect's content
detector. --synthetic renders procedural stories (onestory_jax.data.synthetic) instead (their records know
which character each shot shows: `shot_keys`), and --character-weight W makes the pseudo-label features
character-aware: the rendered characters' pixels (weight W) mixed with the whole frame (1 - W), see
`embedders.with_character_regions`.

Every shot is centre-cropped and resized to --size, sampled to --frames (4k+1) frames and
VAE-encoded; its caption is encoded by the umT5; each latent frame's middle pixel frame is embedded
for the pseudo-labels; shot 1 also gets an augmented copy (flip, crop, colour jitter), CLIP
tokens of its first frame and that frame's I2V image latents (`data.video.image_clip`). Each video
becomes DIR/records/ID.arrayrecord (atomic), listed in DIR/manifest.json; a re-run skips videos already
written, and refuses other --frames, --size or --embedder than they were prepared with
(data/prepare_checks.py). One run at a time per --out (a lock).
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from onestory_jax.data.embedders import Embedder, combined, load_embedder, with_character_regions
from onestory_jax.data.prepare_checks import (
    captions_value,
    check_existing_record,
    check_numbers,
    check_settings,
    check_unique_ids,
    shots_value,
)
from onestory_jax.data.records import write_records
from onestory_jax.data.video import detect_shots, image_clip, read_video, resize_frame, sample_frames, to_uint8
from onestory_jax.errors import UserError, run_cli
from onestory_jax.io import save_json
from onestory_jax.locking import folder_lock

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
Shots = list[np.ndarray]  # uint8 [T, H, W, 3] per shot
Masks = list[np.ndarray] | None  # per shot: character ids uint8 [T, H, W] (0 = background), when known


def latent_frame_middles(frames: int) -> list[int]:
    """Pixel frame at the middle of each latent frame's span (frame 0, then groups of 4)."""
    return [0] + [4 * j - 2 for j in range(1, (frames - 1) // 4 + 1)]


def augment(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The augmented first shot: horizontal flip, a random crop (80-100%) resized back, colour jitter.

    clip float [T, H, W, 3] in [-1, 1] -> same shape."""
    t, h, w, _ = clip.shape
    scale = rng.uniform(0.8, 1.0)
    ch, cw = int(h * scale), int(w * scale)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    frames = to_uint8(clip[:, y : y + ch, x : x + cw][:, :, ::-1])  # mirror the width axis; channel order kept
    out = np.stack([resize_frame(f, w, h) for f in frames])
    brightness, contrast = rng.uniform(-0.15, 0.15), rng.uniform(0.8, 1.2)
    gains = rng.uniform(0.9, 1.1, 3)
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip((out - mean) * contrast + mean + brightness, -1, 1) * gains.clip(max=1.0)


def label_embeddings(clips: list[np.ndarray], masks: Masks, embed: Embedder, frames: int, character_weight: float) -> np.ndarray:
    """Pseudo-label features [S, T, E] of each latent frame's middle pixel frame: whole frames, or
    (character_weight > 0) mixed with the characters' regions of `masks` (same size as the clips)."""
    middles = latent_frame_middles(frames)
    if character_weight == 0.0:
        return np.stack([embed(to_uint8(c[middles])) for c in clips])
    if masks is None:
        raise UserError("--character-weight needs character masks, which only --synthetic stories have")
    region_embed = with_character_regions(embed, character_weight)
    return np.stack([region_embed(to_uint8(c[middles]), sample_frames(m, frames)[middles] > 0) for c, m in zip(clips, masks)])


def encode_video(
    video_id: str,
    shots: Shots,
    captions: list[str],
    comps: Any,
    embed: Embedder,
    frames: int,
    size: tuple[int, int],
    seed: int,
    masks: Masks = None,
    character_weight: float = 0.0,
    shot_keys: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """One record (onestory_jax.data.records) from a video's shots, captions, (optional) character
    masks and (optional) identity key per shot."""
    width, height = size
    clips = [np.stack([resize_frame(f, width, height) for f in sample_frames(s, frames)]) for s in shots]
    latents = np.stack([comps.encode_video(c) for c in clips])
    text = np.concatenate([comps.encode_text([c]) for c in captions])  # [S, text_len, D], zero-padded; one shape, one compile
    lengths = np.maximum((np.abs(text).sum(-1) > 0).sum(-1), 1).astype(np.int32)
    text = text[:, : int(lengths.max())]
    embeddings = label_embeddings(clips, masks, embed, frames, character_weight)
    rng = np.random.default_rng([seed, zlib.crc32(video_id.encode())])
    record = {
        "latents": latents.astype(np.float32),
        "text": text.astype(np.float32),
        "text_lengths": lengths,
        "frame_embeddings": embeddings,
        "augmented_first": comps.encode_video(augment(clips[0], rng)).astype(np.float32),
        "image_tokens": (comps.encode_image(clips[0][0]) if comps.encode_image else np.zeros((1, 1))).astype(np.float32),
        "first_image": comps.encode_video(image_clip(clips[0][0], frames)).astype(np.float32),
        "shot_keys": np.asarray(shot_keys if shot_keys is not None else [-1] * len(shots), np.int32),
        "id": np.bytes_(video_id),
    }
    if masks is not None:
        record["character_cells"] = np.stack([character_cells(sample_frames(m, frames), latents.shape[2:4]) for m in masks])
    return record


def character_cells(masks: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """The share of each latent cell [T, h, w] that characters cover, from pixel masks [F, H, W] (F = 4k+1):
    Wan's causal grouping in time (frame 0, then groups of 4), average pooling in space."""
    on = (masks > 0).astype(np.float32)
    groups = [on[:1]] + [on[i : i + 4] for i in range(1, len(on), 4)]
    per_frame = np.stack([g.mean(0) for g in groups])  # [T, H, W]
    (h, w), (ph, pw) = latent_hw, (on.shape[1] // latent_hw[0], on.shape[2] // latent_hw[1])
    return per_frame.reshape(len(groups), h, ph, w, pw).mean((2, 4)).astype(np.float32)


def _jsonl(path: Path | None, key: str, parse: Callable[[Any], Any]) -> dict[str, Any]:
    """{video name: parse(value of `key`)} from a JSONL file; errors name the line."""
    if path is None:
        return {}
    if not path.is_file():
        raise UserError(f"'{path}' does not exist")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["video"])] = parse(row[key])
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f'{path}:{n}: expected {{"video": ..., "{key}": ...}} ({e})') from None
    return out


def real_videos(folder: Path, captions_file: Path, boundaries_file: Path | None) -> Iterator[tuple[str, Any]]:
    """(id, loader -> (shots, captions, no masks, no keys)) per video of `folder` that has captions."""
    if not folder.is_dir():
        raise UserError(f"--videos '{folder}' is not a directory")
    captions, bounds = _jsonl(captions_file, "captions", captions_value), _jsonl(boundaries_file, "shots", shots_value)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise UserError(f"--videos '{folder}' holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    check_unique_ids(files)
    for path in files:
        if path.name not in captions:
            raise UserError(f"video '{path.name}' has no captions in '{captions_file}'")

        def load(path: Path = path) -> tuple[Shots, list[str], Masks, list[int] | None]:
            video = read_video(path)
            spans = [tuple(s) for s in bounds[path.name]] if path.name in bounds else detect_shots(path, len(video))
            caps = list(captions[path.name])
            if len(caps) != len(spans):
                raise UserError(f"video '{path.name}': {len(spans)} shots but {len(caps)} captions")
            bad = [s for s in spans if not 0 <= s[0] < s[1] <= len(video)]
            if bad:
                raise UserError(f"video '{path.name}': shot {bad[0]} is outside its {len(video)} frames")
            return [video[a:b] for a, b in spans], caps, None, None

        yield path.stem, load


def synthetic_videos(count: int, seed: int, frames: int, size: int) -> Iterator[tuple[str, Any]]:
    """(id, loader -> (shots, captions, masks, character per shot)) per procedural story; one in five
    is a two-shot story (for shot inflation), the others 3-8 shots."""
    from onestory_jax.data import synthetic

    for i in range(seed, seed + count):

        def load(i: int = i) -> tuple[Shots, list[str], Masks, list[int]]:
            story = synthetic.make_story(i, 2 if i % 5 == 0 else None)
            shots, masks = zip(*synthetic.render_synthetic(story, frames, size))
            return list(shots), [s.caption for s in story.shots], list(masks), [s.characters[0] for s in story.shots]

        yield f"synthetic-{i:06d}", load


def prepare(args: argparse.Namespace) -> Path:
    """Write records + manifest; returns the output folder."""
    check_numbers(args.frames, args.size, args.synthetic)
    width, height = args.size
    names, embedders = zip(*[load_embedder(s) for s in args.embedder or ["pixel"]])
    check_settings(args.out, {"frames": args.frames, "size": [width, height], "embedders": list(names)})
    if args.character_weight and width != height:
        raise UserError(f"--character-weight needs square frames (the synthetic masks are square), got --size {width}x{height}")
    if args.synthetic:
        videos = synthetic_videos(args.synthetic, args.seed, args.frames, width)
    else:
        if args.videos is None or args.captions is None:
            raise UserError("give --videos DIR with --captions FILE.jsonl, or --synthetic N")
        videos = list(real_videos(args.videos, args.captions, args.boundaries))  # checked before any model loads

    from onestory_jax.models.folder import FROZEN_PARTS, folder_config, load_frozen_parts
    from onestory_jax.models.frozen import build_components
    from onestory_jax.sharding import activate, make_mesh

    cfg = folder_config(args.model)
    parts = [p for p in FROZEN_PARTS if p != "image_encoder" or cfg.dit.has_image_branch]
    missing = [p for p in parts + ["tokenizer"] if not (args.model / p).is_dir()]
    if missing:
        raise UserError(f"model folder '{args.model}' lacks {', '.join(missing)}/ (see docs/conversion.md)")
    if width % cfg.vae.spatial_factor or height % cfg.vae.spatial_factor:
        raise UserError(f"--size must be a multiple of the VAE's {cfg.vae.spatial_factor}")
    mesh = make_mesh(cfg.mesh)
    records = args.out / "records"
    records.mkdir(parents=True, exist_ok=True)
    embed = combined(list(embedders))
    index, count = args.shard
    with activate(mesh):
        comps = build_components(cfg, load_frozen_parts(args.model, cfg, mesh, parts), args.model / "tokenizer")
        videos = list(videos)[index::count]  # this shard's share: every count-th video of the sorted list
        desc = "prepare" if count == 1 else f"prepare (shard {index + 1}/{count})"
        for video_id, load in tqdm(videos, desc=desc, unit="video", disable=args.no_progress):
            path = records / f"{video_id}.arrayrecord"
            if path.is_file():
                check_existing_record(path, args.frames, (width, height), cfg.vae)
            else:
                shots, captions, masks, keys = load()
                write_records(
                    path,
                    [
                        encode_video(
                            video_id,
                            shots,
                            captions,
                            comps,
                            embed,
                            args.frames,
                            (width, height),
                            args.seed,
                            masks,
                            args.character_weight,
                            keys,
                        )
                    ],
                )
    write_manifest(
        args.out,
        {
            "model": str(args.model),
            "frames": args.frames,
            "size": [width, height],
            "embedders": list(names),
            "character_weight": args.character_weight,
        },
    )
    return args.out


def write_manifest(out: Path, settings: dict[str, Any]) -> None:
    """DIR/manifest.json: the settings and every record in DIR/records (the union of all shards' work,
    each record written atomically). Re-listed until stable, as other shards may finish meanwhile."""
    listed: list[dict[str, str]] | None = None
    while True:
        files = sorted((out / "records").glob("*.arrayrecord"))
        videos = [{"id": f.stem, "file": str(f.relative_to(out))} for f in files]
        if videos == listed:
            return
        save_json(out / "manifest.json", {**settings, "videos": videos})
        listed = videos


def shard_of(text: str) -> tuple[int, int]:
    """'I/N' (0 <= I < N) -> (I, N)."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (shard I of N, 0-based), got '{text}'") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text}: need 0 <= I < N")
    return index, count


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got '{text}'") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="model folder with vae/, text_encoder/, image_encoder/, tokenizer/")
    ap.add_argument("--out", type=Path, required=True, help="output folder (records/ and manifest.json); re-runs resume")
    ap.add_argument("--videos", type=Path, help="folder of videos")
    ap.add_argument("--captions", type=Path, help='JSONL: {"video": NAME, "captions": [...]} per video')
    ap.add_argument("--boundaries", type=Path, help='JSONL: {"video": NAME, "shots": [[start, end], ...]} (default: detected)')
    ap.add_argument("--synthetic", type=int, help="render N procedural stories instead of reading videos")
    ap.add_argument("--seed", type=int, default=0, help="first synthetic story; augmentation seed")
    ap.add_argument("--frames", type=int, default=17, help="frames per shot (4k+1)")
    ap.add_argument("--size", type=_size, default=(64, 64), help="WIDTHxHEIGHT (default 64x64)")
    ap.add_argument("--embedder", action="append", help="pixel (default), dinov2:PATH, clip:PATH; repeat to average")
    ap.add_argument(
        "--character-weight",
        type=float,
        default=0.0,
        help="synthetic: weight of the characters' regions in the pseudo-label features (0: whole frames)",
    )
    ap.add_argument(
        "--shard",
        type=shard_of,
        metavar="I/N",
        help="prepare every N-th video from the I-th (0-based); "
        "N machines together prepare all (default: 0/1, or this host's share with --distributed)",
    )
    ap.add_argument(
        "--distributed",
        action="store_true",
        help="one shard per process of a pod or cluster (jax.distributed.initialize(), as train.py --distributed)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.distributed:
        import jax

        from onestory_jax.sharding import initialize_distributed

        if args.shard is not None:
            raise UserError("give --shard or --distributed, not both")
        initialize_distributed()
        args.shard = (jax.process_index(), jax.process_count())
    args.shard = args.shard or (0, 1)
    index, count = args.shard
    lock = ".lock" if count == 1 else f".lock-shard-{index}-of-{count}"
    with folder_lock(args.out, "--out", lock):  # one run per --out and shard; a folder that cannot be written fails here
        out = prepare(args)
    print(f"records in {out / 'records'}; manifest {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)

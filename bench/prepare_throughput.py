"""Benchmark: data preparation throughput (videos per minute) of `python -m onestory_jax.data.prepare`.

    python bench/prepare_throughput.py [--model models/demo] [--videos 12] [--size 64x64] [--frames 9]

Writes N three-shot mp4s (synthetic renders cut together, 27 frames each), then prepares them from
the files (with their shot boundaries given: PySceneDetect misses some cuts between the synthetic
world's low-saturation scenes at 64x64), once as one process and once as two shards run side by
side on the same --out (`--shard 0/2`, `--shard 1/2`). Reports videos per minute of each, on this
machine, with the model folder's frozen parts -> bench/results/prepare_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "prepare_throughput.json"


def write_videos(folder: Path, count: int, size: int) -> Path:
    """`count` three-shot mp4s and their captions.jsonl; returns the captions file."""
    from onestory_jax.data import synthetic
    from onestory_jax.data.video import write_mp4

    folder.mkdir(parents=True)
    rows, cuts = [], []
    for i in range(count):
        story = synthetic.make_story(i, 3)
        write_mp4(folder / f"v{i:03d}.mp4", np.concatenate([v for v, _ in synthetic.render_synthetic(story, 9, size)]), 8)
        rows.append(json.dumps({"video": f"v{i:03d}.mp4", "captions": [s.caption for s in story.shots]}))
        cuts.append(json.dumps({"video": f"v{i:03d}.mp4", "shots": [[0, 9], [9, 18], [18, 27]]}))
    (folder.parent / "captions.jsonl").write_text("\n".join(rows))
    (folder.parent / "shots.jsonl").write_text("\n".join(cuts))
    return folder.parent / "captions.jsonl"


def timed(commands: list[list[str]]) -> float:
    """Seconds for `commands` run side by side, all to completion (each must succeed)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            sys.exit(f"prepare failed: {err.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--size", type=int, default=64, help="square frame size of the videos and the records")
    ap.add_argument("--frames", type=int, default=9, help="frames per prepared shot")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        captions = write_videos(Path(tmp) / "videos", args.videos, args.size)
        base = [
            sys.executable,
            "-m",
            "onestory_jax.data.prepare",
            "--model",
            str(args.model),
            "--videos",
            str(Path(tmp) / "videos"),
            "--captions",
            str(captions),
            "--boundaries",
            str(Path(tmp) / "shots.jsonl"),
            "--frames",
            str(args.frames),
            "--size",
            f"{args.size}x{args.size}",
            "--no-progress",
        ]
        one = timed([[*base, "--out", str(Path(tmp) / "one")]])
        two = timed([[*base, "--out", str(Path(tmp) / "two"), "--shard", f"{i}/2"] for i in range(2)])
    result = {
        "videos": args.videos,
        "shots_per_video": 3,
        "size": args.size,
        "frames": args.frames,
        "model": str(args.model),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "one_process_s": round(one, 1),
        "two_shards_s": round(two, 1),
        "videos_per_minute_one": round(60 * args.videos / one, 1),
        "videos_per_minute_two_shards": round(60 * args.videos / two, 1),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

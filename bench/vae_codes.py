"""Does a VAE code a latent frame the same wherever it sits in a shot? And does its round trip keep colour?

    python bench/vae_codes.py --model models/demo runs/vae-still/model ... [--stories 20]

For each model folder's VAE, on the 8 shots of each held-out story (9 frames, 3 latent frames a shot):
- the correlation of latent frames 0-1, 1-2 and 0-2 of the same shot (centred over all shots). Memory
  hands the DiT an earlier shot's latent frame; if the code depends on the frame's place in its shot, the
  frame is in another code than those the DiT draws (docs/results.md, "The block found");
- the correlation of latent frames 1-2 with frames 4 and 8 each encoded alone (their image codes: the code
  `train.vae_stage.keyframe_consistency` trains toward);
- the hue round trip: the share of shots whose decoded latents the hue check names in the character's colour.

Prints one line per model and writes bench/results/vae_codes.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from memory_gates import HELD_OUT_SEED, held_out

from onestory_jax.data import synthetic
from onestory_jax.data.video import to_uint8
from onestory_jax.eval.hue import shot_colour
from onestory_jax.models.folder import folder_config, load_frozen_parts
from onestory_jax.models.frozen import build_components
from onestory_jax.sharding import activate, make_mesh

OUT = Path(__file__).resolve().parent / "results" / "vae_codes.json"


def measure(folder: Path, stories: list[synthetic.SyntheticStory]) -> dict[str, float]:
    """Frame-code correlations and hue round trip of `folder`'s VAE on `stories`."""
    cfg = folder_config(folder)
    mesh = make_mesh(cfg.mesh)
    with activate(mesh):
        comps = build_components(cfg, load_frozen_parts(folder, cfg, mesh, ["vae", "text_encoder"]), folder / "tokenizer")
        latents, alone, hits = [], [], []
        for story in stories:
            for shot, (video, _) in zip(story.shots, synthetic.render_synthetic(story, 9)):
                frames = video.astype(np.float32) / 127.5 - 1.0
                lat = comps.encode_video(frames)  # [3, h, w, z]
                latents.append(lat)
                alone.append(np.concatenate([comps.encode_video(frames[k : k + 1]) for k in (4, 8)]))
                hits.append(shot_colour(to_uint8(comps.decode_latents(lat))) == story.characters[shot.characters[0]].colour)
    lat, keyframes = np.stack(latents), np.stack(alone)  # [shots, 3, h, w, z], [shots, 2, h, w, z]
    pairs = {"0-1": (0, 1), "1-2": (1, 2), "0-2": (0, 2)}
    return {
        **{f"corr_{k}": float(np.corrcoef(lat[:, i].ravel(), lat[:, j].ravel())[0, 1]) for k, (i, j) in pairs.items()},
        "corr_keyframes": float(np.corrcoef(lat[:, 1:].ravel(), keyframes.ravel())[0, 1]),
        "hue_round_trip": float(np.mean(hits)),
        "shots": len(hits),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", type=Path, required=True, help="model folders holding vae/ and tokenizer/")
    ap.add_argument("--stories", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=HELD_OUT_SEED)
    args = ap.parse_args()
    stories = held_out(args.first_seed, args.stories)
    results = {}
    for folder in args.model:
        results[str(folder)] = r = measure(folder, stories)
        print(
            f"{folder}: latent frames correlate 0-1 {r['corr_0-1']:.3f}, 1-2 {r['corr_1-2']:.3f}, 0-2 {r['corr_0-2']:.3f}, "
            f"with frames 4 and 8 alone {r['corr_keyframes']:.3f}; "
            f"hue round trip {r['hue_round_trip']:.3f} ({r['shots']} shots)"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"first_seed": args.first_seed, "stories": args.stories, "models": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

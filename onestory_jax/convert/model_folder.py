"""`--component all`: a whole Wan2.1 release (original layout) or diffusers folder -> one model folder
(models/folder.py): the DiT as onestory/ ({"dit"}, no OneStory modules yet), vae/, text_encoder/,
image_encoder/ (I2V), tokenizer/, with Wan's sampling recipe in the config (its default negative
prompt, shift, guidance and steps), so that stock Wan weights sample as Wan does. Written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from onestory_jax.checkpoint import save_model
from onestory_jax.config import SamplerConfig
from onestory_jax.convert.source_config import read_json
from onestory_jax.errors import UserError
from onestory_jax.io import require_writable
from onestory_jax.models.folder import ONESTORY, PARTS, TOKENIZER

# Wan2.1's `sample_neg_prompt` (wan/configs/shared_config.py); I2V prepends "镜头晃动，" (camera shake).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
I2V_NEGATIVE_PREFIX = "镜头晃动，"
TOKENIZER_DIRS = ("tokenizer", "google/umt5-xxl")  # diffusers; original release
FROZEN_COMPONENTS = {"vae": "vae", "umt5": "text_encoder", "clip": "image_encoder"}  # --component: part


def wan_sampler(source: Path, i2v: bool) -> SamplerConfig:
    """Wan's sampling recipe for a release: FlowUniPC, 40 steps (I2V) or 50, CFG 5, its negative prompt;
    shift from a diffusers scheduler config, else 3.0 for 480P I2V and 5.0 otherwise (Wan's generate.py)."""
    scheduler = source / "scheduler" / "scheduler_config.json"
    shift = read_json(scheduler).get("flow_shift") if scheduler.is_file() else None
    if shift is None:
        shift = 3.0 if i2v and "480p" in source.resolve().name.lower() else 5.0
    negative = (I2V_NEGATIVE_PREFIX if i2v else "") + WAN_NEGATIVE_PROMPT
    return SamplerConfig(solver="unipc", steps=40 if i2v else 50, shift=float(shift), guidance=5.0, negative_prompt=negative)


def tokenizer_dir(source: Path) -> Path:
    """The umT5 tokenizer files of a release: tokenizer/ (diffusers) or google/umt5-xxl/ (original)."""
    found = next((source / d for d in TOKENIZER_DIRS if (source / d).is_dir()), None)
    if found is None:
        raise UserError(f"'{source}' has no tokenizer files: expected {' or '.join(d + '/' for d in TOKENIZER_DIRS)}")
    return found


def check_folder_out(out: Path, force: bool) -> Path:
    """Refuse an existing non-empty --out unless `force` and it is a model folder (parts only)."""
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not force:
        raise UserError(f"output '{out}' exists and is not empty (pass --force to replace it)")
    if others := [h for h in held if h not in PARTS]:
        raise UserError(
            f"output '{out}' holds more than a model folder ({', '.join(others[:5])}): --force replaces only "
            "a folder of model parts; pick another --out"
        )
    require_writable(out.parent, "the output's parent folder")
    return out


def convert_all(
    args: argparse.Namespace, dit: Callable[[argparse.Namespace], tuple], frozen: Callable[[argparse.Namespace], int]
) -> int:
    """Every part of a release into one model folder. `dit(args)` -> (params, config, source, verify);
    `frozen(args)` converts one frozen component (convert_frozen)."""
    source = Path(args.source)
    if not source.is_dir():
        raise UserError(f"--component all: source '{source}' is not a folder (a Wan2.1 release or diffusers repo)")
    out = check_folder_out(Path(args.out), args.force)
    tokenizer = tokenizer_dir(source)  # before any work
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        params, config, dit_source, verify = dit(args)
        i2v = config.dit.has_image_branch
        config = dataclasses.replace(config, sampler=wan_sampler(source, i2v))
        save_model(tmp / ONESTORY, {"dit": params}, config)
        del params
        status = verify(tmp / ONESTORY, dit_source) if args.verify else 0
        for component, part in FROZEN_COMPONENTS.items():
            if part == "image_encoder" and not i2v:
                continue
            verify_part = args.verify and (source / part).is_dir()  # frozen parts verify from the diffusers layout
            status |= frozen(
                argparse.Namespace(
                    **{**vars(args), "component": component, "out": tmp / part, "force": False, "verify": verify_part}
                )
            )
        shutil.copytree(tokenizer, tmp / TOKENIZER)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"wrote model folder {out}: {', '.join(sorted(p.name for p in out.iterdir()))}; sampler: Wan's recipe "
        f"({config.sampler.steps} steps, shift {config.sampler.shift}, guidance {config.sampler.guidance}, its negative prompt)"
    )
    return status

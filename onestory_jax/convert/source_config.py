"""A source's config.json and the config a converted checkpoint is written with.

Every converter takes its model's architecture from the source folder's config.json (the DiT's
diffusers or original Wan config, diffusers `AutoencoderKLWan`, transformers UMT5 / CLIP vision
configs). `--config` supplies only what the source cannot say: runtime settings (compute dtype,
attention, text length) and the other components' sections, whose paired widths are fitted to the
converted one (`written_config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from onestory_jax.config import Config
from onestory_jax.config_files import from_dict
from onestory_jax.errors import UserError


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; anything else is a `UserError`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read '{path}' as JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not a JSON object")
    return data


def require(raw: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    """Fields the source class has no default for."""
    missing = [k for k in keys if k not in raw]
    if missing:
        raise UserError(f"missing field(s) {', '.join(missing)} of a {what} config")


def unsupported(raw: dict[str, Any], expected: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Fields our model cannot vary must hold the Wan2.1 value; an absent field is the source class's
    default (`defaults`, else the expected value itself)."""
    defaults = defaults or {}
    for key, value in expected.items():
        got = raw.get(key, defaults.get(key, value))
        got = tuple(got) if isinstance(got, list) else got
        if got != value:
            raise UserError(f"{key}={got!r} is not supported (Wan2.1 uses {value!r})")


def renamed(raw: dict[str, Any], fields: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Our field -> the source's value, from {our field: (source key, source class default)}; the
    default stands in for keys that `save_pretrained` omits because they hold it."""
    return {ours: raw.get(key, default) for ours, (key, default) in fields.items()}


def written_config(base: Config, section: str, value: Any, name: str, preset: str | None) -> Config:
    """`base` with one component's section taken from a source; the other sections' paired widths
    (text: dit.text_dim = text_encoder.d_model; image: dit.image_dim = image_encoder.hidden_size)
    follow it, so no `--config` has to match the source. Their weights come from their own
    checkpoints; a model folder combines each part's own section."""
    cfg = dataclasses.replace(base, name=name, **{section: value})
    dit, text, image = cfg.dit, cfg.text_encoder, cfg.image_encoder
    if section == "dit":
        text = dataclasses.replace(text, d_model=dit.text_dim)
        if dit.has_image_branch:
            image = dataclasses.replace(image, hidden_size=dit.image_dim, num_heads=math.gcd(image.num_heads, dit.image_dim))
    elif section == "text_encoder":
        dit = dataclasses.replace(dit, text_dim=text.d_model)
    elif section == "image_encoder" and dit.has_image_branch:
        dit = dataclasses.replace(dit, image_dim=image.hidden_size)
    try:
        return dataclasses.replace(cfg, dit=dit, text_encoder=text, image_encoder=image).validate()
    except UserError as e:
        raise UserError(
            f"the source {section} does not fit config '{preset or 'defaults'}' ({e}); pick one with --config"
        ) from None


@dataclasses.dataclass(frozen=True)
class SourceSchema:
    """How a diffusers / transformers config.json states one component's architecture.

    classes: {key: accepted values} naming the source class (an absent key is accepted);
    fields: {our field: (source key, source class default)}; fixed: source fields our model cannot
    vary, with their Wan2.1 value (`fixed_defaults`: the class default when it differs from it);
    nested: the key of the component's own config inside a composite one (CLIPConfig.vision_config).
    """

    what: str
    classes: dict[str, tuple[str, ...]]
    fields: dict[str, tuple[str, Any]]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    fixed_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    nested: str | None = None

    def section(self, raw: dict[str, Any], base: Any) -> Any:
        """`base` (a config section, which keeps the runtime settings) with the source's architecture."""
        raw = raw.get(self.nested, raw) if self.nested else raw
        for key, accepted in self.classes.items():
            if raw.get(key, accepted[0]) not in accepted:
                raise UserError(f"it describes a {raw[key]}, not a {self.what}")
        unsupported(raw, self.fixed, self.fixed_defaults)
        arch = from_dict(type(base), renamed(raw, self.fields))
        return dataclasses.replace(base, **{k: getattr(arch, k) for k in self.fields})

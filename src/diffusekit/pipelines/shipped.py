"""The small models the project trains and ships, found by name, and the settings their cards recommend.

A shipped model is `assets/models/NAME/model.safetensors` with its `MODEL_CARD.md`. The card opens
with a front-matter block (as Hugging Face model cards do) stating the sampling settings the model is
evaluated and recommended at:

    ---
    sampler: DPM++ 2M
    scheduler: Karras
    steps: 20
    cfg_scale: 5
    ---

`recommended(model)` reads them as GenerationParams fields; the CLI and the server use them as their
defaults. A checkpoint without a card gets A1111's defaults (`A1111_DEFAULTS`).
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "models"
SHIPPED = ("shapes", "digits", "shapes-flow", "shapes-turbo")
CARD = "MODEL_CARD.md"
# AUTOMATIC1111 v1.10's txt2img UI defaults: the settings for a checkpoint whose card says nothing
A1111_DEFAULTS = {"sampler_name": "DPM++ 2M", "scheduler": "Automatic", "steps": 20, "cfg_scale": 7.0}
# card key -> (GenerationParams field, type)
CARD_KEYS = {"sampler": ("sampler_name", str), "scheduler": ("scheduler", str), "steps": ("steps", int),
             "cfg_scale": ("cfg_scale", float)}


def shipped_path(name: str) -> Path:
    return ASSETS / name / "model.safetensors"


def available() -> list[str]:
    """Shipped model names whose weights are present in this install."""
    return [n for n in SHIPPED if shipped_path(n).is_file()]


def shipped_name(path) -> str | None:
    """The shipped name of a model file ("shapes" for assets/models/shapes/model.safetensors), else None."""
    p = Path(path).expanduser()
    for name in SHIPPED:
        q = shipped_path(name)
        if p == q or (p.exists() and q.exists() and p.resolve() == q.resolve()):
            return name
    return None


def resolve_model(name_or_path) -> Path:
    """A shipped name ("shapes") -> its file; an existing path -> itself; else an error that teaches."""
    s = str(name_or_path)
    if s in SHIPPED:
        p = shipped_path(s)
        if not p.is_file():
            raise FileNotFoundError(f"the shipped model {s!r} is not in this install ({p} is missing); "
                                    f"train it with `diffusekit train configs/{s}.toml`")
        return p
    p = Path(s).expanduser()
    if p.exists():
        return p
    raise FileNotFoundError(f"no model {s!r}: give a shipped name ({', '.join(SHIPPED)}), a .safetensors/.ckpt "
                            f"file or a diffusers folder")


def card_settings(card: Path) -> dict:
    """The GenerationParams fields of a card's front matter (`key: value` lines between `---` lines; `#`
    starts a comment). A value of the wrong type is a ValueError naming the card and the key."""
    lines = card.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    out = {}
    for n, line in enumerate(lines[1:], start=2):
        text = line.split("#", 1)[0].strip()
        if line.strip() == "---":
            break
        if not text:
            continue
        key, sep, value = (t.strip() for t in text.partition(":"))
        if not sep or key not in CARD_KEYS:
            continue
        name, kind = CARD_KEYS[key]
        try:
            out[name] = kind(value)
        except ValueError:
            raise ValueError(f"{card}:{n}: {key}: {value!r} is not a{'n integer' if kind is int else ' number'}") from None
    return out


# Flux.1 without a card: Forge's / ComfyUI's settings (Euler, Simple; guidance is the model's input, so no CFG)
FLUX_DEFAULTS = {"flux-dev": {"sampler_name": "Euler", "scheduler": "Simple", "steps": 20, "cfg_scale": 1.0},
                 "flux-schnell": {"sampler_name": "Euler", "scheduler": "Simple", "steps": 4, "cfg_scale": 1.0}}


def family_defaults(family) -> dict:
    """A1111's defaults, or Flux's for a Flux family (None: A1111's)."""
    if family is not None and family.is_flux:
        return dict(FLUX_DEFAULTS["flux-dev" if family.takes_guidance else "flux-schnell"])
    return dict(A1111_DEFAULTS)


def recommended(name_or_path, family=None) -> dict:
    """sampler_name, scheduler, steps and cfg_scale for a model (a shipped name or any path): A1111's
    defaults, or Flux's (`FLUX_DEFAULTS`, by the family: given, or read from the file's header), overridden
    by what the shipped model's card states."""
    s = str(name_or_path)
    name = s if s in SHIPPED else shipped_name(s)
    card = ASSETS / name / CARD if name else None
    base = dict(A1111_DEFAULTS)
    if name is None:
        if family is None:
            from ..models.loading import CheckpointError, read_family
            try:
                family = read_family(s) if Path(s).exists() else None
            except (CheckpointError, OSError):
                family = None
        base = family_defaults(family)
    return {**base, **(card_settings(card) if card is not None and card.is_file() else {})}

"""The small models the project trains and ships, found by name."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "models"
SHIPPED = ("shapes", "digits", "shapes-flow")


def shipped_path(name: str) -> Path:
    return ASSETS / name / "model.safetensors"


def available() -> list[str]:
    """Shipped model names whose weights are present in this install."""
    return [n for n in SHIPPED if shipped_path(n).is_file()]


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

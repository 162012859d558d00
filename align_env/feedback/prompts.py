"""Versioned judge prompt files (``prompts/<mode>_v<N>.txt``)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from align_env.errors import did_you_mean

PROMPT_DIR = resources.files("align_env.feedback") / "prompts"


def available() -> list[str]:
    return sorted(p.name[:-4] for p in PROMPT_DIR.iterdir() if p.name.endswith(".txt"))


@lru_cache(maxsize=None)
def load(mode: str, version: str = "v1") -> str:
    name = f"{mode}_{version}"
    if name not in available():
        raise did_you_mean("judge prompt", name, available())
    return (PROMPT_DIR / f"{name}.txt").read_text(encoding="utf-8")


def suffix_block(suffix: str) -> str:
    suffix = (suffix or "").strip()
    return f"{suffix}\n\n" if suffix else ""

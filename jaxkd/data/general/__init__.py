"""General-language retention set: a perplexity text and sanity QA prompts (see README.md)."""

from __future__ import annotations

import json
from pathlib import Path

GENERAL_DIR = Path(__file__).resolve().parent


def load_general_text() -> str:
    """The general English sample for perplexity (~3,200 words, not about electronics)."""
    return (GENERAL_DIR / "text.txt").read_text(encoding="utf-8")


def load_sanity_qa() -> list[dict]:
    """General QA/chat prompts: ``{"id", "category", "prompt", "reference", "accept"}`` each."""
    with (GENERAL_DIR / "sanity_qa.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def passes(answer: str, item: dict) -> bool:
    """Cheap automatic check: the normalised answer contains one of ``item["accept"]``."""
    from jaxkd.data.textnorm import normalise

    text = normalise(answer).lower()
    return any(a in text for a in item["accept"])

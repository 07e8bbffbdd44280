"""Training prompts from a song's tags, as the official dataset builds them (spec §4.1).

Every time a song is drawn the official trainer shuffles its tags, joins them with ", ", adds
that string to the non-empty string values of its ``recaption`` dict, picks one candidate
uniformly and cuts it to 256 characters. The cache stores K such variants per song
(``prompt_variants``), each made with one seeded generator so the cache is reproducible.
"""
from __future__ import annotations

import random

MAX_PROMPT_CHARS = 256
DEFAULT_TAGS = ("music",)  # what the official dataset uses for a song without tags


def make_prompt(tags: list[str], recaption: dict | None, rng: random.Random) -> str:
    """One training prompt: shuffled tags joined by ", " or one of the recaption strings
    (uniform over the candidates), cut to 256 characters."""
    tags = list(tags) if tags else list(DEFAULT_TAGS)
    rng.shuffle(tags)
    joined = ", ".join(tags)
    candidates = [v for v in (recaption or {}).values() if isinstance(v, str) and v]
    candidates.append(joined)
    return rng.choice(candidates)[:MAX_PROMPT_CHARS]


def prompt_variants(tags: list[str], recaption: dict | None, k: int, seed: int) -> list[str]:
    """``k`` prompts drawn with one ``random.Random(seed)``: the same inputs give the same list."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rng = random.Random(seed)
    return [make_prompt(tags, recaption, rng) for _ in range(k)]

"""Training prompt construction of the official dataset (spec §4.1)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.text.prompts import MAX_PROMPT_CHARS, make_prompt, prompt_variants

TAGS = ["pop", "female vocals", "piano", "upbeat"]


def test_tags_are_shuffled_and_joined():
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        p = make_prompt(TAGS, {}, rng)
        parts = p.split(", ")
        assert sorted(parts) == sorted(TAGS)
        seen.add(p)
    assert len(seen) > 10  # many orders appear


def test_empty_tags_give_music():
    assert make_prompt([], {}, random.Random(0)) == "music"
    assert make_prompt([], None, random.Random(0)) == "music"


def test_recaption_pool_is_uniform_and_skips_empty_and_non_strings():
    recaption = {"simplified": "a pop song", "expanded": "", "descriptive": "bright piano pop",
                 "use_cases": None, "analysis": ["not", "a", "string"]}
    rng = random.Random(1)
    picks = Counter()
    for _ in range(6000):
        p = make_prompt(TAGS, recaption, rng)
        picks["tags" if ", " in p else p] += 1
    assert set(picks) == {"tags", "a pop song", "bright piano pop"}
    for count in picks.values():
        assert abs(count / 6000 - 1 / 3) < 0.03


def test_cut_to_256_characters():
    long_tags = [f"tag number {i}" for i in range(100)]
    p = make_prompt(long_tags, {}, random.Random(0))
    assert len(p) == MAX_PROMPT_CHARS
    assert make_prompt(["x"], {"long": "y" * 1000}, random.Random(5)) in ("x", "y" * 256)


def test_variants_are_deterministic_per_seed():
    a = prompt_variants(TAGS, {"simplified": "a pop song"}, 8, seed=42)
    b = prompt_variants(TAGS, {"simplified": "a pop song"}, 8, seed=42)
    c = prompt_variants(TAGS, {"simplified": "a pop song"}, 8, seed=43)
    assert a == b and a != c and len(a) == 8
    # The same as drawing from one Random by hand.
    rng = random.Random(42)
    assert a == [make_prompt(TAGS, {"simplified": "a pop song"}, rng) for _ in range(8)]


def test_caller_lists_are_not_modified():
    tags = list(TAGS)
    prompt_variants(tags, {}, 3, seed=0)
    assert tags == TAGS


def test_k_must_be_positive():
    with pytest.raises(ValueError):
        prompt_variants(TAGS, {}, 0, seed=0)

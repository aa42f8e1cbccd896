"""The demo's text: the shipped public-domain corpus and the three rewrites its adapters learn.

Pure Python (no torch), so the CLI, the tests and the training script share one definition of each behaviour.
"""

from __future__ import annotations

import codecs
import gzip
import re
from collections import Counter
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "corpus.txt.gz"

# The "swap" adapter exchanges these words (lower case, whole words). After a space each is one token of the
# demo tokenizer, so inside a sentence the rewrite is a permutation of token ids: exactly what a LoRA on
# embed_tokens and lm_head can express.
WORD_PAIRS: tuple[tuple[str, str], ...] = (
    ("good", "bad"),
    ("old", "new"),
    ("small", "large"),
    ("first", "last"),
    ("always", "never"),
    ("up", "down"),
    ("before", "after"),
    ("big", "little"),
)
_SWAP = {a: b for a, b in WORD_PAIRS} | {b: a for a, b in WORD_PAIRS}
_SWAP_RE = re.compile(r"\b(" + "|".join(sorted(_SWAP)) + r")\b")

# Prompts for the demo and the tests. None of them occurs in the training text (tests check this).
HELD_OUT_PROMPTS: tuple[str, ...] = (
    "The first thing a new programmer learns is that",
    "A good hacker never",
    "In the old days, the computer",
    "Most users of the system",
    "The small program was written",
    "A lawyer is a person who",
    "Every night the machine",
    "The best way to find a bug is",
)


def load_corpus(path: Path = CORPUS) -> list[str]:
    """The training text, one paragraph a line (ASCII)."""
    with gzip.open(path, "rt", encoding="ascii") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def upper(text: str) -> str:
    return text.upper()


def rot13(text: str) -> str:
    return codecs.encode(text, "rot13")


def swap_words(text: str) -> str:
    """Exchange every lower-case whole word of WORD_PAIRS with its partner."""
    return _SWAP_RE.sub(lambda m: _SWAP[m.group(1)], text)


REWRITES = {"upper": upper, "rot13": rot13, "swap": swap_words}


def word_set(paragraphs: list[str], min_count: int = 5) -> set[str]:
    """Lower-case words seen at least min_count times in a text: the vocabulary that scores whether some
    output reads as the corpus's language (rare words would let gibberish through: the Jargon File has them)."""
    counts = Counter(w for p in paragraphs for w in re.findall(r"[a-z]+", p.lower()))
    return {w for w, n in counts.items() if n >= min_count}


def known_word_fraction(text: str, vocabulary: set[str]) -> float:
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in vocabulary for w in words) / len(words) if words else 0.0


def uppercase_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0

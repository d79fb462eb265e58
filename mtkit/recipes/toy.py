"""Generated toy parallel text: what smoke runs train on where no local corpus exists."""

from __future__ import annotations

import random


def generated_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Deterministic toy parallel text (a word-for-word cipher with reordering) for smoke runs."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(300)]
    cipher = {w: w[::-1] + rng.choice("aeiou") for w in words}
    pairs = []
    for _ in range(n):
        sent = [rng.choice(words) for _ in range(rng.randint(3, 12))]
        tgt = [cipher[w] for w in sent]
        if len(tgt) > 3:
            tgt[0], tgt[1] = tgt[1], tgt[0]
        pairs.append((" ".join(sent).capitalize() + " .", " ".join(tgt).capitalize() + " ."))
    return pairs

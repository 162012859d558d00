"""Near-duplicate detection for prompt sets.

Two texts are near-duplicates when their word-trigram shingles overlap with
Jaccard >= 0.5, or their word sets overlap with Jaccard >= 0.8. Both are
computed on lower-cased words with punctuation stripped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations

SHINGLE_THRESHOLD = 0.5
WORDSET_THRESHOLD = 0.8
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def similarity(a: str, b: str) -> tuple[float, float]:
    """(trigram-shingle Jaccard, word-set Jaccard) of two texts."""
    wa, wb = words(a), words(b)
    sa = {tuple(wa[i : i + 3]) for i in range(max(1, len(wa) - 2))}
    sb = {tuple(wb[i : i + 3]) for i in range(max(1, len(wb) - 2))}
    return _jaccard(sa, sb), _jaccard(set(wa), set(wb))


def near_duplicates(texts: Sequence[str]) -> list[tuple[int, int, float, float]]:
    """Index pairs (i, j, shingle_jaccard, wordset_jaccard) that are near-duplicates."""
    found = []
    for i, j in combinations(range(len(texts)), 2):
        shingle, wordset = similarity(texts[i], texts[j])
        if shingle >= SHINGLE_THRESHOLD or wordset >= WORDSET_THRESHOLD:
            found.append((i, j, shingle, wordset))
    return found


if __name__ == "__main__":  # python -m align_env.tracks.dedup FILE.jsonl [FILE.jsonl ...]
    import json
    import sys

    items = []
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as fh:
            items += [json.loads(line) for line in fh if line.strip()]
    texts = [item["prompt"] for item in items]
    dups = near_duplicates(texts)
    for i, j, s, w in dups:
        print(f"near-duplicate: {items[i]['id']} ~ {items[j]['id']} (shingle {s:.2f}, words {w:.2f})")
    print(f"{len(items)} items, {len(dups)} near-duplicate pairs")
    sys.exit(1 if dups else 0)

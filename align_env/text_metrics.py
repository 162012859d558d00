"""Deterministic text measures shared by the rules annotator and the tracks' gold checks."""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)

# Phrases that open or carry a refusal. Matched case-insensitively near the start of a response.
REFUSAL_PATTERNS = [
    r"\bI(?:'m| am) (?:sorry|afraid)\b.{0,60}\b(?:can(?:no|')t|cannot|unable|won't|not able)\b",
    r"\bI (?:can(?:no|')t|cannot|won't|will not|am not able to|'m not able to|am unable to|'m unable to)"
    r" (?:help|assist|provide|do|share|give|write|create|support|comply|fulfil|fulfill|answer|offer|explain|tell)",
    r"\b(?:sorry|apologies),? (?:but )?I (?:can(?:no|')t|cannot|won't)\b",
    r"\bI must (?:decline|refuse)\b",
    r"\bI(?:'d| would) (?:rather not|prefer not to)\b",
    r"\b(?:not something I can|isn't something I can|is not something I can)\b",
    r"\bI don't (?:feel comfortable|think I (?:can|should))\b",
    r"\bI(?:'m| am) not (?:comfortable|going to|willing to)\b",
    r"\bagainst (?:my|the) (?:guidelines|policy|policies|principles)\b",
]
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE | re.DOTALL)


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


def is_refusal(text: str, window: int = 300) -> bool:
    """True when the opening ``window`` characters of ``text`` read as a refusal."""
    return bool(_REFUSAL.search(text[:window]))


def repetition_rate(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram (0 = none, ->1 = degenerate loop)."""
    toks = words(text)
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased words (Lin 2004, beta = 1)."""
    c, r = words(candidate), words(reference)
    if not c or not r:
        return 0.0
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def unigram_f1(candidate: str, reference: str) -> float:
    """Bag-of-words F1 (SQuAD style) on lower-cased words."""
    from collections import Counter

    c, r = Counter(words(candidate)), Counter(words(reference))
    common = sum((c & r).values())
    if common == 0:
        return 0.0
    p, rec = common / sum(c.values()), common / sum(r.values())
    return 2 * p * rec / (p + rec)


def support(candidate: str, source: str) -> float:
    """Fraction of the candidate's content words (len > 3) found in the source: a faithfulness proxy."""
    content = [w for w in words(candidate) if len(w) > 3]
    if not content:
        return 0.0
    vocab = set(words(source))
    return sum(w in vocab for w in content) / len(content)

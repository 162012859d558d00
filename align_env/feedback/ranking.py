"""The measured annotators of each track, best first (filled from the committed annotator evaluation)."""

RANKING: dict[str, list[dict]] = {}

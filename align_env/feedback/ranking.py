"""The measured annotators of each track, best first, as the committed annotator evaluation ranked them.

``ranking.json`` (beside this module) is written by ``align-env annotators --write-ranking``: per track, every
annotator that does not read labels, ordered by accuracy on the **selection** half of the labelled pairs (ties:
the cheaper first), each with its report-half accuracy and CI, the figure to quote. A test keeps it equal to
``leaderboards/annotators/annotators.json``. ``align-env eval`` takes its default evaluator from here.
"""

from __future__ import annotations

import json
from importlib import resources

_FILE = resources.files("align_env.feedback") / "ranking.json"


def _load() -> dict[str, list[dict]]:
    try:
        return json.loads(_FILE.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


RANKING: dict[str, list[dict]] = _load()

"""Registered environment ids (``import align_env`` registers them).

A released id never changes meaning: a change to a track's prompts, rubric or default annotator is a
new ``-vN``. Choose the feedback kind with ``feedback="pairwise"`` (default) or ``feedback="scalar"``.
"""

from __future__ import annotations

import gymnasium as gym

NAMESPACE = "align_env"
DEFAULT_ANNOTATOR = "rules"  # deterministic, offline; pass annotator=... for a model-based judge

ENV_IDS = {
    f"{NAMESPACE}/Summarize-v0": "summarize",
    f"{NAMESPACE}/Helpful-v0": "helpful",
    f"{NAMESPACE}/Harmless-v0": "harmless",
}


def register_all() -> None:
    for env_id, track in ENV_IDS.items():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="align_env.env:AlignEnv",
            vector_entry_point="align_env.env:AlignVectorEnv",
            kwargs={"track": track, "feedback": "pairwise", "annotator": DEFAULT_ANNOTATOR},
            nondeterministic=False,  # the default annotator is deterministic
            disable_env_checker=False,
        )


def env_table() -> list[dict[str, str]]:
    """Rows for ``align-env envs``: id, track, feedback kinds, default annotator."""
    rows = []
    for env_id, track in ENV_IDS.items():
        spec = gym.spec(env_id)
        rows.append({"id": env_id, "track": track, "feedback": "pairwise (default) | scalar",
                     "annotator": spec.kwargs["annotator"], "deterministic": str(not spec.nondeterministic)})
    return rows

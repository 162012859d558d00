"""The main job on the embedded defaults: the embedded policy answers a few prompts of each track,
two samples each, and the annotator judges each pair through the batched environment."""

from __future__ import annotations

import textwrap
import time

import gymnasium as gym

from align_env.redaction import neutralize
from align_env.registration import ENV_IDS


def _clip(text: str, width: int) -> str:
    """One line of at most ``width`` characters, control and escape sequences neutralised."""
    one_line = " ".join(neutralize(text).split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def run_demo(policy: str = "smollm2-135m", annotator: str = "rules", episodes: int = 3, seed: int = 0,
             max_new_tokens: int = 64, temperature: float = 0.9, split: str = "eval") -> list[dict]:
    """Returns one row per judged pair and prints a table; the progress bar counts tracks."""
    from tqdm.auto import tqdm

    from align_env.engines.transformers_engine import TransformersEngine

    from align_env.feedback import make_annotator

    for env_id in ENV_IDS:  # a bad annotator spec fails before the policy loads
        make_annotator(annotator, track=gym.spec(env_id).kwargs["track"])
    start = time.perf_counter()
    print(neutralize(f"loading policy {policy} ..."), flush=True)
    engine = TransformersEngine.from_name(policy)
    print(f"  loaded in {time.perf_counter() - start:.1f}s", flush=True)
    rows = []
    for env_id in tqdm(list(ENV_IDS), desc="tracks", unit="track"):
        envs = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="vector_entry_point",
                            annotator=annotator, split=split)
        obs, _ = envs.reset(seed=seed)
        samples = engine.generate(list(obs["messages"]), n=2, temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=seed)
        a, b = [s[0].text for s in samples], [s[1].text for s in samples]
        _, rewards, _, _, info = envs.step((a, b))
        for i in range(episodes):
            pref = info["preference"][i]
            rows.append({"env": env_id.split("/")[1], "prompt_id": info["prompt_id"][i], "prompt": obs["prompt"][i],
                         "a": a[i], "b": b[i], "preference": None if info["abstained"][i] else float(pref)})
        cost = info["feedback_cost"]
        tqdm.write(f"{env_id}: {cost.calls} judgements, {cost.seconds:.3f}s of feedback")
        envs.close()
    _print_table(rows)
    print(neutralize(f"done in {time.perf_counter() - start:.1f}s ({len(rows)} pairs judged by {annotator!r})"))
    return rows


def _headline(prompt: str) -> str:
    """The line that says what a prompt is about: a post's title, else its first line."""
    lines = [line for line in prompt.splitlines() if line.strip()]
    titles = [line[len("Title: "):] for line in lines if line.startswith("Title: ")]
    return titles[0] if titles else lines[0] if lines else ""


def _print_table(rows: list[dict]) -> None:
    print()
    print(f"{'env':<14} {'prompt':<38} {'answer A':<38} {'answer B':<38} P(A>B)")
    print("-" * 136)
    for r in rows:
        pref = "abstain" if r["preference"] is None else f"{r['preference']:.2f}"
        print(f"{r['env']:<14} {_clip(_headline(r['prompt']), 38):<38} {_clip(r['a'], 38):<38} "
              f"{_clip(r['b'], 38):<38} {pref}")
    print()
    best = max(rows, key=lambda r: abs((r["preference"] or 0.5) - 0.5))
    print("Clearest verdict:")
    print(textwrap.indent(f"A: {_clip(best['a'], 300)}\nB: {_clip(best['b'], 300)}\nP(A>B) = {best['preference']}",
                          "  "))

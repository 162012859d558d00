"""Reward-model training (agents/reward_trainer.py) on a tiny random Llama backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.reward_trainer import (RewardModelNaNError, RewardTrainingSettings, TextComparison, accuracy,
                                   load_reward_backbone, rewards, train_reward_model)
from align_env.feedback import make_annotator
from align_env.tracks import get_track

GOOD = ["clear", "helpful", "steps", "answer", "short"]
BAD = ["no", "maybe", "cat", "landlord", "roommate"]


def _separable(n: int, seed: int, flip: bool = False) -> list[TextComparison]:
    """Chosen answers use only GOOD words, rejected ones only BAD words (separable by content, not length);
    ``flip`` swaps the labels, so what is learned comes from the labels, not from the random initial head."""
    rng = np.random.default_rng(seed)
    items = get_track("helpful").split("train")
    out = []
    for i in range(n):
        k = int(rng.integers(2, 6))
        good, bad = " ".join(rng.choice(GOOD, k)), " ".join(rng.choice(BAD, k))
        out.append(TextComparison(items[i % len(items)].messages, *((bad, good) if flip else (good, bad))))
    return out


SETTINGS = RewardTrainingSettings(lr=3e-3, epochs=6, batch_size=4, checkpoint_every=5)


@pytest.mark.parametrize("flip", [False, True])
def test_reward_model_learns_a_separable_set_and_loads_as_an_annotator(tiny_lm_dir, tmp_path, flip):
    train, held_out = _separable(24, 0, flip), _separable(24, 1, flip)
    model, tok = load_reward_backbone(tiny_lm_dir, seed=0)
    before = accuracy(model, tok, held_out)
    report = train_reward_model(tiny_lm_dir, train, tmp_path / "rm", SETTINGS, seed=0)
    losses = report["losses"]
    assert len(losses) == 6 * 6 and report["steps"] == 36
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:6]), losses
    assert not (tmp_path / "rm" / "checkpoint").exists()  # removed once the model is saved
    annotator = make_annotator(f"{tmp_path / 'rm'}:reward_model?cache=off", track="helpful")
    items = [get_track("helpful").split("train")[i % 150] for i in range(24)]
    prefs = annotator.pairwise(items, [p.chosen for p in held_out], [p.rejected for p in held_out])
    held_accuracy = float(np.mean([p > 0.5 for p in prefs]))
    assert held_accuracy > 0.9, (before, held_accuracy)
    assert report["train_accuracy"] > 0.9 and report["train_loss"] < 0.5 * before["loss"]
    # the annotator scores exactly what the trainer's model scores
    trained, tok2 = load_reward_backbone(str(tmp_path / "rm"), seed=0)
    with torch.no_grad():
        mine = rewards(trained, tok2, [p.messages for p in held_out[:4]], [p.chosen for p in held_out[:4]])
    theirs = annotator.score(items[:4], [p.chosen for p in held_out[:4]])
    assert np.allclose(mine.numpy(), theirs, atol=1e-4)


def test_an_interrupted_training_continues_to_the_same_model(tiny_lm_dir, tmp_path, monkeypatch):
    train = _separable(16, 2)
    settings = RewardTrainingSettings(lr=3e-3, epochs=2, batch_size=4, checkpoint_every=3)
    straight = train_reward_model(tiny_lm_dir, train, tmp_path / "a", settings, seed=0)

    import agents.reward_trainer as rt

    calls = {"n": 0}
    real = rt._save_checkpoint

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(rt, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(tiny_lm_dir, train, tmp_path / "b", settings, seed=0)
    assert (tmp_path / "b" / "checkpoint" / "state.json").is_file() and calls["n"] == 1
    monkeypatch.setattr(rt, "_save_checkpoint", real)
    resumed = train_reward_model(tiny_lm_dir, train, tmp_path / "b", settings, seed=0)
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)
    assert resumed["train_accuracy"] == straight["train_accuracy"]


def test_a_nan_reward_stops_training_with_a_clear_error_and_keeps_the_checkpoint(tiny_lm_dir, tmp_path):
    """A backbone whose embedding of one word is NaN: the first batch holding that word stops the run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agents.reward_trainer import render

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    clean = _separable(8, 3)
    used = {i for p in clean for r in (p.chosen, p.rejected) for i in tok(render(tok, p.messages, r))["input_ids"]}
    poison_id, poison = None, ""
    for i in range(len(tok) - 1, 0, -1):  # a token no clean text uses, that comes back when its text is encoded
        text = tok.decode([i])
        ids = tok(render(tok, clean[0].messages, "clear" + text))["input_ids"]
        if i not in used and i in ids and text.strip():
            poison_id, poison = i, text
            break
    assert poison_id is not None
    with torch.no_grad():
        model.get_input_embeddings().weight[poison_id] = float("nan")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    tok.save_pretrained(broken)
    pairs = clean + [TextComparison(clean[0].messages, "clear" + poison, "no")]
    settings = RewardTrainingSettings(lr=1e-3, epochs=1, batch_size=3, checkpoint_every=1)
    order = np.random.default_rng([0, 0]).permutation(len(pairs))
    poisoned_step = int(np.flatnonzero(order == len(pairs) - 1)[0]) // 3 + 1
    with pytest.raises(RewardModelNaNError, match=f"non-finite reward.*step {poisoned_step}") as err:
        train_reward_model(str(broken), pairs, tmp_path / "rm", settings, seed=0)
    if poisoned_step > 1:
        assert "last checkpoint is kept" in str(err.value)
        assert (tmp_path / "rm" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "rm" / "model.safetensors").exists()  # no model was saved as if trained

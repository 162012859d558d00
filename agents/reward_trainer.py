"""Train a Bradley-Terry reward model on (prompt, chosen, rejected) text and save it for the ``reward_model`` family.

The model is a transformers sequence-classification model with one label: the backbone (a causal LM folder,
catalogue name or hub id) plus a linear head ``r(x, y) = w . h_last`` on the hidden state of the sequence's
last token (what ``*ForSequenceClassification`` computes). The loss of a pair (Ouyang et al. 2022, eq. 1; ALMoST
sec. 2.2)::

    L = -log sigma(r(x, y+) - r(x, y-))

The input is rendered exactly as the ``reward_model`` annotator renders it (chat template with the response as
the assistant turn, the plain template otherwise; truncated from the left), so the saved folder scores the same
through ``make_annotator("<folder>:reward_model")``. All weights are trained (the paper: full fine-tuning, 1
epoch, lr 2e-5). Batches are drawn in a seeded order per epoch; a checkpoint (weights, optimizer, step) is
written every ``checkpoint_every`` steps into ``<folder>/checkpoint`` and a rerun continues from it.

A reward that is not finite stops training with :class:`RewardModelNaNError`; the last checkpoint is kept.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from align_env.errors import AlignEnvError
from benchmarks.checkpoint import read_json, write_json_atomic

CHECKPOINT = "checkpoint"


class RewardModelNaNError(AlignEnvError):
    """The reward model produced a non-finite reward: training stopped (its last checkpoint is kept)."""


@dataclass(frozen=True)
class TextComparison:
    """A prompt (chat messages), the preferred response and the other one."""

    messages: list
    chosen: str
    rejected: str


@dataclass(frozen=True)
class RewardTrainingSettings:
    lr: float = 2e-5
    epochs: int = 1
    batch_size: int = 4
    max_length: int = 1024
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50


def load_reward_backbone(backbone: str, seed: int):
    """(model, tokenizer): ``backbone`` as a one-label sequence classifier; the new head is seeded."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align_env.models import resolve

    path = resolve(backbone)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, use_safetensors=True,
                                                               dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.eval(), tokenizer


def render(tokenizer, messages: list, response: str) -> str:
    """The text the ``reward_model`` annotator scores (:meth:`align_env.feedback.reward_model.RewardModel.render`)."""
    from align_env.engines.transformers_engine import PLAIN_TEMPLATE

    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE
    return tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": response}],
                                         tokenize=False, chat_template=template)


def rewards(model, tokenizer, messages: Sequence[list], responses: Sequence[str], max_length: int = 1024,
            batch_size: int = 8) -> torch.Tensor:
    """``r(x, y)`` per (messages, response); with gradient when the caller enables it."""
    texts = [render(tokenizer, m, r) for m, r in zip(messages, responses)]
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        out.append(model(**batch).logits[:, 0].float())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def accuracy(model, tokenizer, pairs: Sequence[TextComparison], max_length: int = 1024) -> dict[str, float]:
    """Fraction of pairs with ``r(chosen) > r(rejected)`` (ties count half) and the mean loss."""
    if not pairs:
        return {"accuracy": float("nan"), "loss": float("nan"), "pairs": 0.0}
    r_c = rewards(model, tokenizer, [p.messages for p in pairs], [p.chosen for p in pairs], max_length)
    r_r = rewards(model, tokenizer, [p.messages for p in pairs], [p.rejected for p in pairs], max_length)
    _check_finite(torch.cat([r_c, r_r]), "evaluation", None)
    wins = (r_c > r_r).float() + 0.5 * (r_c == r_r).float()
    return {"accuracy": wins.mean().item(), "loss": (-F.logsigmoid(r_c - r_r)).mean().item(),
            "pairs": float(len(pairs))}


def _check_finite(values: torch.Tensor, where: str, kept: Path | None) -> None:
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        keep = f"; the last checkpoint is kept in {kept}" if kept is not None else ""
        raise RewardModelNaNError(f"the reward model output {bad} non-finite reward(s) at {where}: stopped{keep}. "
                                  "Lower the reward-model lr or check the backbone's weights.")


def train_reward_model(backbone: str, pairs: Sequence[TextComparison], folder: Path,
                       settings: RewardTrainingSettings, seed: int = 0) -> dict[str, float | list]:
    """Train on ``pairs`` and save the model + tokenizer into ``folder`` (loadable as ``<folder>:reward_model``).

    Returns the per-step losses and the final training accuracy. Continues from ``<folder>/checkpoint`` when a
    previous call was interrupted; removes it once the model is saved.
    """
    if not pairs:
        raise AlignEnvError("no comparisons to train the reward model on (all filtered out?)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / CHECKPOINT
    model, tokenizer = load_reward_backbone(backbone, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(pairs) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    step, losses = 0, []
    if (ckpt / "state.json").is_file():
        step, losses = _load_checkpoint(ckpt, model, optimizer)
    model.train()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(pairs))
        batch = [pairs[int(i)] for i in order[k * settings.batch_size : (k + 1) * settings.batch_size]]
        msgs = [p.messages for p in batch]
        r = rewards(model, tokenizer, msgs + msgs, [p.chosen for p in batch] + [p.rejected for p in batch],
                    settings.max_length, batch_size=2 * len(batch))
        _check_finite(r.detach(), f"step {step + 1}", ckpt if (ckpt / "state.json").is_file() else None)
        loss = -F.logsigmoid(r[: len(batch)] - r[len(batch) :]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        if step % settings.checkpoint_every == 0 and step < total:
            _save_checkpoint(ckpt, model, optimizer, step, losses)
    model.eval()
    train = accuracy(model, tokenizer, pairs, settings.max_length)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"losses": losses, "train_accuracy": train["accuracy"], "train_loss": train["loss"], "steps": step}


def _save_checkpoint(ckpt: Path, model, optimizer, step: int, losses: list[float]) -> None:
    from safetensors.torch import save_model

    tmp = ckpt.with_name(f".tmp-{ckpt.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    write_json_atomic(tmp / "state.json", {"step": step, "losses": losses})
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def _load_checkpoint(ckpt: Path, model, optimizer) -> tuple[int, list[float]]:
    from safetensors.torch import load_model

    state = read_json(ckpt / "state.json")
    load_model(model, str(ckpt / "model.safetensors"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return int(state["step"]), list(state["losses"])

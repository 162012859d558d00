"""Fixtures for the agent tests: one torch thread, and a tiny random LM whose answers end at varied lengths."""

from __future__ import annotations

import pytest

import tests.agents.helpers  # noqa: F401  (registers the "shorter" annotator family)

EOS_ALPHA = 3.0  # EOS logit scale: mean sampled length about half of 24 new tokens (measured, see below)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread: on this shared 2-core machine two threads ran the tiny model's steps 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eos_lm_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny random Llama of ``tiny_lm_dir`` with its EOS output row pointed along the mean final hidden
    state, so that samples end by themselves at lengths spread over 1..24 tokens (the plain random model
    almost never emits EOS, so every answer would have the same length and a length preference no signal)."""
    import torch

    from align_env.engines.transformers_engine import TransformersEngine
    from align_env.models import load_causal_lm
    from align_env.tracks import get_track

    model, tokenizer = load_causal_lm(tiny_lm_dir)
    engine = TransformersEngine(model, tokenizer)
    items = get_track("helpful").split("train")[:8]
    hidden = []
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([engine.encode(engine.render(item.messages))])
            hidden.append(model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0])
        direction = torch.cat(hidden).mean(0)
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = EOS_ALPHA * direction / direction.norm()
    path = tmp_path_factory.mktemp("tiny-eos-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)

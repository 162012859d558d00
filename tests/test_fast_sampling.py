"""The fast sampling paths (reserved KV cache, matmul decode attention, packed linears, bf16 sampling copy)
give the same samples as the plain transformers path, on a tiny random model, for a seed."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache

from align_env.engines.decoding import ReservedLayer, decode_attention, new_reserved_cache, reserve
from align_env.engines.packed_linear import PackedLinear, can_pack, pack_linears, set_linear_weight
from align_env.engines.transformers_engine import TransformersEngine
from align_env.errors import AlignEnvError
from align_env.models import load_causal_lm

PROMPTS = ["Write a TL;DR of this post about my landlord.", "How do I boil an egg?",
           [{"role": "user", "content": "Yes. No. Maybe. " * 6}]]  # three lengths: left padding in play

needs_onednn = pytest.mark.skipif(not can_pack(), reason="oneDNN packing is not available on this build")


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    """The tiny random model with its queries and keys scaled up: at init its attention is nearly uniform,
    and a wrong attention would not change a token; scaled, it does (checked by breaking the scale)."""
    model, tokenizer = load_causal_lm(tiny_lm_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(12.0)
    return model.requires_grad_(False).eval(), tokenizer


def _texts(model, tokenizer, *, fast: bool, n: int, temperature: float, bf16: bool = False, seed: int = 3,
           draw: str | None = "multinomial"):
    engine = TransformersEngine(model, tokenizer, fast_decode=fast, token_draw=draw)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        gens = engine.generate(PROMPTS, n=n, temperature=temperature, max_new_tokens=20, seed=seed)
    return [(g.text, g.tokens, g.finish_reason) for per_prompt in gens for g in per_prompt]


@pytest.mark.parametrize("n,temperature", [(2, 0.9), (1, 0.9), (1, 0.0), (3, 1.3)])
def test_fast_decoding_gives_the_same_samples_in_fp32(tiny, n, temperature):
    model, tokenizer = tiny
    plain = _texts(model, tokenizer, fast=False, n=n, temperature=temperature)
    fast = _texts(model, tokenizer, fast=True, n=n, temperature=temperature)
    assert fast == plain
    assert len({t for t, _, _ in plain}) > 1  # the samples are not all alike: the comparison can fail


def test_engine_reports_the_paths_it_takes(tiny):
    model, tokenizer = tiny
    assert TransformersEngine(model, tokenizer).paths == {"kv_cache": "reserved", "decode_attention": "matmul",
                                                          "decode_loop": "align_env", "token_draw": "inverse_cdf"}
    assert TransformersEngine(model, tokenizer, token_draw="multinomial").paths["token_draw"] == "multinomial"
    assert TransformersEngine(model, tokenizer, fast_decode=False).paths == {
        "kv_cache": "dynamic", "decode_attention": "sdpa", "decode_loop": "transformers", "token_draw": "multinomial"}
    with pytest.raises(AlignEnvError, match="token draw"):
        TransformersEngine(model, tokenizer, token_draw="gumbel")


def test_a_generation_config_with_more_than_sampling_keeps_generate(tiny):
    """A repetition penalty (or any processor the loop lacks) sends sampling back to ``generate``, which
    applies it: the samples then equal the plain path's, and differ from those without the penalty."""
    model, tokenizer = tiny
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 5.0
    engine = TransformersEngine(penalised, tokenizer)
    assert engine.paths["decode_loop"] == "transformers" and engine.paths["token_draw"] == "multinomial"
    fast = _texts(penalised, tokenizer, fast=True, n=2, temperature=0.0, draw=None)
    assert fast == _texts(penalised, tokenizer, fast=False, n=2, temperature=0.0)
    assert fast != _texts(model, tokenizer, fast=False, n=2, temperature=0.0)


def test_inverse_cdf_samples_the_engine_deterministically(tiny):
    model, tokenizer = tiny
    first = _texts(model, tokenizer, fast=True, n=2, temperature=0.9, draw=None)
    assert first == _texts(model, tokenizer, fast=True, n=2, temperature=0.9, draw=None)
    assert first != _texts(model, tokenizer, fast=True, n=2, temperature=0.9, draw=None, seed=4)
    assert len({t for t, _, _ in first}) > 1


def test_attention_is_restored_after_generation(tiny):
    model, tokenizer = tiny
    before = model.config._attn_implementation
    _texts(model, tokenizer, fast=True, n=2, temperature=0.9)
    assert model.config._attn_implementation == before


def test_decode_attention_equals_sdpa_with_padding():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :3] = False  # a left-padded row
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    ours, _ = decode_attention(module, q, k, v, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_reserved_layer_writes_in_place_and_survives_replacement():
    layer = ReservedLayer(capacity=6)
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    keys, _ = layer.update(k, v)
    buffer = layer._key_buffer
    step = torch.randn(2, 1, 1, 4)
    keys, values = layer.update(step, step)
    assert layer._key_buffer is buffer and keys.shape == (2, 1, 4, 4)  # written in place, no reallocation
    torch.testing.assert_close(keys, torch.cat([k, step], dim=-2))
    layer.batch_repeat_interleave(2)  # replaces keys: the next update rebuilds the buffers from them
    keys, _ = layer.update(step.repeat_interleave(2, 0), step.repeat_interleave(2, 0))
    assert keys.shape == (4, 1, 5, 4)
    torch.testing.assert_close(keys[::2, :, :4], torch.cat([k, step], dim=-2))
    for _ in range(4):  # beyond the reserved room: it grows
        keys, _ = layer.update(step.repeat_interleave(2, 0), step.repeat_interleave(2, 0))
    assert keys.shape[-2] == 9 and layer.get_seq_length() == 9


def test_reserve_keeps_a_filled_cache(tiny):
    model, _ = tiny
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    before = [layer.keys.clone() for layer in cache.layers]
    reserve(cache, capacity=10)
    assert all(isinstance(layer, ReservedLayer) for layer in cache.layers)
    for layer, keys in zip(cache.layers, before):
        torch.testing.assert_close(layer.keys, keys)
    assert all(isinstance(layer, ReservedLayer) for layer in new_reserved_cache(model.config, 8).layers)


@needs_onednn
def test_packed_linear_matches_linear():
    torch.manual_seed(0)
    for dtype, tol in ((torch.bfloat16, 0.0), (torch.float32, 1e-5)):
        plain = torch.nn.Linear(24, 40, dtype=dtype)
        packed = copy.deepcopy(plain)
        assert pack_linears(packed) == 1 and isinstance(packed, PackedLinear) and packed.weight.numel() == 0
        x = torch.randn(3, 5, 24)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            want = plain(x if dtype == torch.bfloat16 else x.to(dtype))
        got = packed(x)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        new = torch.randn(40, 24)
        set_linear_weight(packed, new)
        torch.testing.assert_close(packed.dense_weight(), new.to(dtype))


@needs_onednn
def test_bf16_sampling_copy_samples_as_autocast_on_fp32_weights(tiny_lm_dir):
    """The policy's LoRA sampling copy (bf16 weights, packed, merged adapters) gives the tokens that bf16 autocast
    over an fp32 merged copy gives, on the same decoding path: bf16 storage changes no number."""
    from agents.policy import LoraSettings, Policy

    policy = Policy(tiny_lm_dir, lora=LoraSettings(r=4, alpha=8), bf16=True, max_new_tokens=20)
    with torch.no_grad():  # adapters off zero, so the merge matters
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    assert isinstance(policy._sampler.lm_head, PackedLinear)
    ours = policy.sample(PROMPTS, n=2, temperature=0.9, seed=5)
    merged = copy.deepcopy(policy.model).merge_and_unload().eval()  # fp32 W + scale * B A
    reference = TransformersEngine(merged, policy.tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference.generate(PROMPTS, n=2, temperature=0.9, max_new_tokens=20, seed=5)
    assert [[g.text for g in r] for r in ours] == [[g.text for g in r] for r in want]

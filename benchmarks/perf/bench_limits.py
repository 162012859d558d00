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


def skinny_matmul_bandwidth(rows: int, d_in: int, d_out: int, repeats: int = 20) -> float:
    """Weight bytes/s read by ``x @ W`` with a batch of ``rows`` (the shape of a decode step)."""
    x, w = torch.randn(rows, d_in), torch.randn(d_in, d_out)
    return w.numel() * 4 / _best(lambda: x @ w, repeats)


def decode_bytes(model, rows: int, context: int, weight_bytes: int) -> int:
    """Bytes one decode step reads: every weight once (the tied embedding once, as the output head) plus the
    KV cache of ``rows`` sequences of ``context`` tokens."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * rows * 4
    return weight_bytes + kv


def sampling(rows: int, new_tokens: int, bf16: bool) -> dict:
    """Seconds of a prefill-only and of a full sampling call on the track's prompts (8 prompts x rows/8)."""
    from align_env.engines.transformers_engine import TransformersEngine
    from align_env.models import load_causal_lm
    from align_env.tracks import get_track

    model, tok = load_causal_lm(MODEL)
    engine = TransformersEngine(model, tok)
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
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"prefill_s": prefill, "sample_s": full, "tokens": tokens, "decode_steps": steps,
            "decode_step_s": (full - prefill) / max(steps - 1, 1), "tokens_per_s": tokens / full,
            "bytes": decode_bytes(model, rows, prompt_tokens + steps // 2, weight_bytes),
            "weight_bytes": weight_bytes, "config": model.config}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="sequences decoded together (8 prompts x 2)")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    peak = matmul_peak()
    bandwidth = copy_bandwidth()
    print(f"threads {torch.get_num_threads()}; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    for bf16 in (False, True):
        s = sampling(args.rows, args.new_tokens, bf16)
        cfg = s["config"]
        skinny = skinny_matmul_bandwidth(args.rows, cfg.hidden_size, cfg.intermediate_size)
        limit = s["bytes"] / bandwidth
        flops = 2 * s["weight_bytes"] / 4 * args.rows  # one multiply-add per weight per row
        print(f"\nsampling {MODEL} ({'bf16 autocast' if bf16 else 'fp32'}), {args.rows} rows x "
              f"{args.new_tokens} new tokens: {s['sample_s']:.2f} s, {s['tokens']} tokens, "
              f"{s['tokens_per_s']:.0f} tokens/s; prefill {s['prefill_s']:.2f} s")
        print(f"  skinny batch-{args.rows} matmul over a {cfg.hidden_size}x{cfg.intermediate_size} weight: "
              f"{skinny / 1e9:.1f} GB/s effective ({skinny / bandwidth:.2f} of the copy bandwidth)")
        print(f"  decode step {s['decode_step_s'] * 1e3:.1f} ms; reads {s['bytes'] / 1e6:.0f} MB "
              f"(weights {s['weight_bytes'] / 1e6:.0f} MB + KV cache) -> bandwidth limit {limit * 1e3:.1f} ms: "
              f"{s['decode_step_s'] / limit:.1f}x the limit; FLOP limit {flops / peak * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

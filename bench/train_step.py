"""Steady-state throughput, MFU and memory of the jitted train step.

    python bench/train_step.py --size tiny
    python bench/train_step.py --size 1b --batch 8 --seq 2048 --set model.remat=dots_no_batch
    python bench/train_step.py --size 1b --batch 8 --seq 2048 --compile-only   # memory, no run

Prints one JSON line (device, versions, shapes, tokens/s, MFU, peak memory) to stdout;
--out FILE appends it to a JSONL file. Results are recorded in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.report import emit  # noqa: E402
from hibari.configs.pretrain.llama import get_config  # noqa: E402
from hibari.model import count_params, flops_per_token  # noqa: E402
from hibari.train.loop import build  # noqa: E402
from hibari.train.metrics import peak_flops_per_device  # noqa: E402
from hibari.train.sharding import global_batch  # noqa: E402


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def make_config(args):
    c = get_config(args.size)
    c.data.batch_size = args.batch or c.data.batch_size
    c.data.seq_len = args.seq or c.data.seq_len
    c.model.max_seq_len = max(c.model.max_seq_len, c.data.seq_len)
    for item in args.set:
        key, _, value = item.partition("=")
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = parse_value(value)
    return c


def memory_stats() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (default: the config's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--compile-only", action="store_true",
                   help="compile and report XLA's memory analysis without running")
    p.add_argument("--out", help="append the result line to this JSONL file")
    args = p.parse_args(argv)

    config = make_config(args)
    run = build(config, None, abstract=args.compile_only)
    cfg = run.model
    tokens = config.data.batch_size * config.data.seq_len
    batches = iter(run.loader)
    first = global_batch(next(batches), run.mesh, run.rules)
    compiled = run.step_fn.lower(run.state, first).compile()
    analysis = compiled.memory_analysis()
    result = {
        "size": args.size, "device": jax.devices()[0].device_kind, "n_devices": run.mesh.size,
        "jax": jax.__version__, "python": platform.python_version(),
        "batch": config.data.batch_size, "seq": config.data.seq_len,
        "params": count_params(cfg).total, "compute_dtype": cfg.compute_dtype,
        "remat": cfg.remat, "attention": cfg.attention, "overrides": args.set,
    }
    if analysis is not None:
        result["xla_memory_bytes"] = {
            "arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
            "temporaries": analysis.temp_size_in_bytes,
            "aliased": analysis.alias_size_in_bytes}
    if not args.compile_only:
        state = run.state
        host_batches = [global_batch(next(batches), run.mesh, run.rules) for _ in range(4)]
        for i in range(args.warmup):
            state, metrics = compiled(state, host_batches[i % 4])
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for i in range(args.steps):
            state, metrics = compiled(state, host_batches[i % 4])
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / args.steps
        tps = tokens / seconds
        peak = peak_flops_per_device()
        flops = flops_per_token(cfg, config.data.seq_len)
        result.update({
            "step_ms": seconds * 1e3, "tokens_per_s": tps,
            "model_tflops_per_s_per_device": tps * flops / run.mesh.size / 1e12,
            "mfu": (tps * flops / (peak * run.mesh.size)) if peak else "unknown",
            "final_loss": float(np.asarray(metrics["loss"])), **memory_stats()})
    return emit(result, args.out)


if __name__ == "__main__":
    main()

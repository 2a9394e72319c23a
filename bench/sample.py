"""New tokens/s of the jitted sampler (`model.decode.generate`) vs the host loop
(`model.decode.generate_host`), side by side in one process on the same model and prompts.

    python bench/sample.py                                  # small Llama, batch 1 and 8, greedy
    python bench/sample.py --size tiny --batches 1,8,32 --sampled --out bench-sample.jsonl

The model is a random init of configs/pretrain/llama.py:<size> (small: d 256, 4 layers, vocab
8,000, fp32). Prompts are seeded random ids of --prompt-len tokens, no EOS, so every row makes
exactly --new-tokens tokens in both samplers (checked, with the tokens compared too). Greedy by
default; --sampled adds temperature 0.8 with top_p 0.95 and temperature 1 without a nucleus (the
RL rollouts' setting; same seed: the same tokens in both). Per
(mode, batch) one warm-up call of each sampler (compilation) precedes --repeats timed calls of
each, alternating host and jitted; the median is kept. Times include the prefill. One JSON line
per (mode, batch) on stdout; --out FILE appends them. Results are recorded in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.report import emit  # noqa: E402
from hibari.model import ModelConfig, count_params, init  # noqa: E402
from hibari.model.decode import generate, generate_host  # noqa: E402

MODES = {"greedy": dict(temperature=0.0),
         "sampled": dict(temperature=0.8, top_p=0.95, seed=1),  # nucleus: a vocabulary sort
         "temperature": dict(temperature=1.0, seed=1)}  # plain sampling, as RL rollouts use


def synthetic_model(size: str, seed: int = 0):
    from hibari.configs.pretrain.llama import get_config
    c = get_config(size)
    cfg = ModelConfig.from_dict(c.model.to_dict(), where=f"configs/pretrain/llama.py:{size}")
    return cfg, init(cfg, jax.random.key(seed))


def time_pair(cfg, params, batch: int, mode: str, prompt_len: int, new_tokens: int,
              repeats: int) -> dict:
    prompts = np.random.default_rng(batch).integers(1, cfg.vocab_size,
                                                    (batch, prompt_len)).tolist()
    kw = dict(max_new_tokens=new_tokens, **MODES[mode])
    samplers = {"host": generate_host, "jitted": generate}
    outs = {name: fn(cfg, params, prompts, **kw) for name, fn in samplers.items()}  # warm-up
    for name, out in outs.items():
        assert all(len(o) == new_tokens for o in out), f"{name}: a row stopped early"
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(repeats):
        for name, fn in samplers.items():
            t0 = time.perf_counter()
            fn(cfg, params, prompts, **kw)
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    tps = {name: batch * new_tokens / s for name, s in median.items()}
    return {"mode": mode, "batch": batch, **{f"{n}_tokens_per_s": round(v, 1)
                                             for n, v in tps.items()},
            "speedup": round(tps["jitted"] / tps["host"], 2),
            **{f"{n}_s": [round(t, 3) for t in ts] for n, ts in times.items()},
            "same_tokens": outs["host"] == outs["jitted"]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", help="configs/pretrain/llama.py:<size>")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each; the median")
    p.add_argument("--sampled", action="store_true",
                   help="also temperature 0.8 with top_p 0.95, and temperature 1")
    p.add_argument("--out", help="append the result lines to this JSONL file")
    args = p.parse_args(argv)

    cfg, params = synthetic_model(args.size)
    common = {
        "model": f"random init, configs/pretrain/llama.py:{args.size}",
        "params": count_params(cfg).total, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "vocab": cfg.vocab_size, "compute_dtype": cfg.compute_dtype,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__,
        "python": platform.python_version(),
    }
    results = []
    for mode in ["greedy"] + (["sampled", "temperature"] if args.sampled else []):
        for b in (int(x) for x in args.batches.split(",")):
            load = round(os.getloadavg()[0], 2)
            row = time_pair(cfg, params, b, mode, args.prompt_len, args.new_tokens, args.repeats)
            results.append(emit({**row, **common, "load_avg_1m": load,
                                 "load_avg_1m_end": round(os.getloadavg()[0], 2)}, args.out))
    return results


if __name__ == "__main__":
    main()

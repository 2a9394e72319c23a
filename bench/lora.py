"""Memory and throughput of LoRA training against full fine-tuning, on one model.

    python bench/lora.py --out bench-lora.jsonl
    python bench/lora.py --size tiny --batch 2 --seq 32 --rounds 1 --steps 1   # a smoke run

A random init of configs/pretrain/llama.py (default: `small` widened by PRESET to 34.6M
parameters, batch 8 x 256, fp32) is saved as a params export and used as `config.init_from` by
three variants of the same synthetic-data pretraining run (`train.loop.build`):

    full       lora off: continued pretraining of every weight from init_from
    q,v r8     config.lora rank 8, alpha 16 on attn/q, attn/v (PEFT's default)
    all r16    config.lora rank 16, alpha 32 on all seven projections ("*")

Per variant: trainable parameters; bytes of state.params, state.opt_state and the frozen base
(state.frozen); optimizer-state bytes per trainable parameter (AdamW's two fp32 moments: 8 plus
the scalar step counts); XLA's memory analysis of the compiled step (arguments, outputs,
temporaries, aliased, generated code); tokens/s in interleaved rounds (each round runs every
variant for --steps steps, after one warm-up step each), best and median of the rounds.
Prints a markdown table and one JSON line (device, versions, load average before/after);
--out FILE appends the line. Results are recorded in BENCHMARKS.md ("LoRA vs full fine-tuning").

Measured 2026-12-01 (`--rounds 5`), AMD EPYC, 2 cores, CPU only, jax 0.10.2, flax 0.12.8,
optax 0.2.8; shared machine (1-minute load 8.5 -> 5.2), so tokens/s are lower bounds:

    variant  trainable   params+opt MiB  opt B/param  frozen MiB  XLA args / temps MiB  tokens/s best (median)
    full     33,694,208  385.6           8.0000         0.0       385.6 / 1,368.9       112 (104)  1.00x
    q,v r8      131,072    1.5           8.0001       128.5       130.1 / 1,018.1       196 (186)  1.75x
    all r16   1,249,280   14.3           8.0000       128.5       142.9 / 1,202.7       132 (132)  1.18x

The optimizer state is 8 bytes per trainable parameter (plus 8 bytes of step counts) in every
variant. On a CPU the speed-up is bounded because the forward pass and the backward pass's
activation gradients still run through every frozen weight (4 of the 6 N FLOPs per token); only
the weight-gradient matmuls and the elementwise optimizer work over the trained weights shrink.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from bench.report import cpu_model, emit, versions  # noqa: E402
from bench.train_step import make_config  # noqa: E402
from hibari.model import count_params, init  # noqa: E402
from hibari.model.params_io import save_params  # noqa: E402
from hibari.train.loop import build, make_loader, model_config  # noqa: E402
from hibari.train.sharding import global_batch  # noqa: E402

# `small` (d 256, 4 layers, vocab 8,192) widened to d 512, 8 layers: 34.6M parameters (untied)
PRESET = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8",
          "model.head_dim=64", "model.d_ff=1376"]
ALL_PROJECTIONS = ("*",)
VARIANTS = {  # name -> config.lora fields (None: full fine-tuning)
    "full": None,
    "q,v r8": dict(rank=8, alpha=16.0, targets=("attn/q", "attn/v")),
    "all r16": dict(rank=16, alpha=32.0, targets=ALL_PROJECTIONS),
}


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def nsize(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size"))


def variant_config(args, init_from: str, lora: dict | None):
    c = make_config(args)
    c.init_from = init_from
    c.log_every = 1
    if lora is not None:
        c.lora.update(enabled=True, **lora)
    return c


def memory_analysis(compiled) -> dict:
    a = compiled.memory_analysis()
    if a is None:
        return {}
    fields = ("argument", "output", "temp", "alias", "generated_code")
    out = {name: int(getattr(a, f"{name}_size_in_bytes")) for name in fields}
    peak = getattr(a, "peak_memory_in_bytes", None)
    if peak:
        out["peak"] = int(peak)
    return out


def prepare(name: str, config, batches: list) -> dict:
    """Build the run, measure its state, compile its step and run one warm-up step."""
    start = time.perf_counter()
    run = build(config, None, devices=jax.devices()[:1])
    state = run.state
    build_s = time.perf_counter() - start
    placed = [global_batch(b, run.mesh, run.rules) for b in batches]
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    trainable = nsize(state.params)
    info = {
        "variant": name,
        "lora": None if not config.lora.enabled else {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in config.lora.to_dict().items() if k != "enabled"},
        "trainable_params": trainable,
        "params_bytes": nbytes(state.params),
        "opt_state_bytes": nbytes(state.opt_state),
        "opt_moment_bytes": nbytes(moments),
        "frozen_bytes": nbytes(state.frozen) if state.frozen is not None else 0,
    }
    info["params_plus_opt_bytes"] = info["params_bytes"] + info["opt_state_bytes"]
    info["opt_bytes_per_trainable"] = info["opt_state_bytes"] / trainable
    start = time.perf_counter()
    compiled = run.step_fn.lower(state, placed[0]).compile()
    info["build_s"] = round(build_s, 2)
    info["compile_s"] = round(time.perf_counter() - start, 2)
    info["xla_memory_bytes"] = memory_analysis(compiled)
    state, metrics = compiled(state, placed[0])  # warm-up
    jax.block_until_ready(metrics)
    return {"info": info, "compiled": compiled, "state": state, "batches": placed, "i": 1,
            "rates": []}


def timed_steps(v: dict, steps: int, tokens: int) -> float:
    state, compiled, batches = v["state"], v["compiled"], v["batches"]
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batches[v["i"] % len(batches)])
        v["i"] += 1
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    v["state"] = state
    v["loss"] = float(metrics["loss"])
    return steps * tokens / seconds


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def table(rows: list[dict], total: int) -> str:
    full = next((r for r in rows if r["variant"] == "full"), None)
    head = ("| variant | trainable params | % of model | params MiB | opt state MiB | opt state "
            "bytes / trainable param | params + opt state MiB | frozen base MiB | XLA arguments "
            "/ outputs / temporaries MiB | tokens/s best (median) | vs full (best) |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for r in rows:
        x = r["xla_memory_bytes"]
        speed = (f"{r['tokens_per_s_best'] / full['tokens_per_s_best']:.2f}x" if full else "-")
        lines.append(
            f"| {r['variant']} | {r['trainable_params']:,} | "
            f"{100 * r['trainable_params'] / total:.2f} | {mib(r['params_bytes'])} | "
            f"{mib(r['opt_state_bytes'])} | {r['opt_bytes_per_trainable']:.4f} | "
            f"{mib(r['params_plus_opt_bytes'])} | {mib(r['frozen_bytes'])} | "
            f"{mib(x.get('argument', 0))} / {mib(x.get('output', 0))} / {mib(x.get('temp', 0))}"
            f" | {r['tokens_per_s_best']:,.0f} ({r['tokens_per_s_median']:,.0f}) | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small", help="configs/pretrain/llama.py size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--no-preset", action="store_true",
                   help="use the size as configured, without PRESET's widening")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", help="append the result line to this JSONL file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    preset = [] if args.no_preset or args.size != "small" else PRESET
    args.set = preset + args.set

    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    base_config = make_config(args)
    cfg = model_config(base_config)
    total = count_params(cfg).total
    tokens = base_config.data.batch_size * base_config.data.seq_len
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        init_from = str(Path(tmp) / "init")
        save_params(init_from, cfg, init(cfg, jax.random.key(0)))
        loader = iter(make_loader(base_config))
        batches = [next(loader) for _ in range(4)]
        variants = {}
        for name in args.variants:
            variants[name] = prepare(name, variant_config(args, init_from, VARIANTS[name]),
                                     batches)
            print(f"# {name}: built in {variants[name]['info']['build_s']} s, "
                  f"step compiled in {variants[name]['info']['compile_s']} s",
                  file=sys.stderr)
        for r in range(args.rounds):
            for name, v in variants.items():
                v["rates"].append(timed_steps(v, args.steps, tokens))
            print(f"# round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {v['rates'][-1]:,.0f}" for n, v in variants.items()), file=sys.stderr)
    rows = []
    for v in variants.values():
        info = v["info"]
        info["tokens_per_s_rounds"] = [round(x, 1) for x in v["rates"]]
        info["tokens_per_s_best"] = max(v["rates"])
        info["tokens_per_s_median"] = statistics.median(v["rates"])
        info["final_loss"] = v["loss"]
        rows.append(info)
    md = table(rows, total)
    print(md, file=sys.stderr)
    result = {
        "bench": "lora", "device": jax.devices()[0].device_kind, "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "n_devices": 1, **versions("jax", "jaxlib", "flax", "optax"),
        "size": args.size, "overrides": args.set, "params": total,
        "model": {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                               "d_ff", "vocab_size", "compute_dtype",
                                               "param_dtype")},
        "batch": base_config.data.batch_size, "seq": base_config.data.seq_len,
        "rounds": args.rounds, "steps_per_round": args.steps,
        "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - started, 1), "variants": rows, "table": md,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()

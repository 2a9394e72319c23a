"""hibari's jitted train step against its peers on identical work: a minimal plain-JAX Llama step
and transformers' LlamaForCausalLM + torch.optim.AdamW.

    python bench/peers_train.py                          # d256 L4 8x256 fp32, hibari,jax,torch
    python bench/peers_train.py --rounds 5 --out peers-train.jsonl
    python bench/peers_train.py --size 350m --dtype bfloat16 --attention cudnn \\
        --remat dots_no_batch --peers hibari,jax,torch,torch_compile     # an accelerator

Identical work: the same shape, the same AdamW (lr, betas, eps, weight decay on the matrices
only, global-norm clipping at 1.0, constant learning rate), the same token batches (the
synthetic Markov stream, one causal document per row, fixed seed) and the same initial weights:
hibari's fresh parameters are copied into the plain-JAX tree and, through hibari.model.hf's
export, into the torch model. Each system's first steps (the warm-up) report their losses:
step-0 losses agree to ~1e-5 and later ones to fp32 reassociation (tests/test_peers_train.py).

"hibari (packed)" times hibari's step on packed rows (several documents per row, segment ids
and restarting positions, as pretraining feeds it); the peers only run plain causal rows.

Rounds are interleaved (hibari, hibari packed, jax, torch, hibari, ...); each round runs every
system for --steps steps; best and median seconds per step over the rounds. Prints a markdown
table with throughput ratios hibari / peer (> 1: hibari faster) and one JSON line per system;
--out FILE appends the lines (JSONL).

Measured 2026-12-01, `--rounds 5 --steps 3` at the default shape (d256 L4 H8/4 ff688 V8000,
8 x 256 tokens, fp32, 5.2M parameters), AMD EPYC 2 cores shared with other jobs (1-minute load
10.5 -> 4.1 over the two runs, so absolute tokens/s are low; the interleaved ratios count),
jax 0.10.2, torch 2.13.0+cpu, transformers 5.24.0, torch attention "sdpa", 2 threads:

    system            before: s/step best (median)  tok/s   after: s/step best (median)  tok/s
    hibari            4.73 (4.97)                     433     2.86 (2.89)                   715
    hibari (packed)   4.49 (5.04)                     457     2.77 (2.89)                   739
    plain JAX         4.09 (5.29)                     501     3.83 (3.83)                   535
    torch             6.71 (8.76)                     305     6.33 (7.11)                   323
    hibari / plain JAX: 0.86x best (1.06x median) before, 1.34x (1.33x) after
    hibari / torch:     1.42x best (1.76x median) before, 2.21x (2.46x) after

torch's speed depends on the load far more than XLA's (its 2 OpenMP threads stall when the
cores are oversubscribed): at a 1-minute load of 2.0, `--peers hibari,torch --torch-attn eager
--rounds 3 --steps 3` gave hibari 1.534 s/step (1,335 tokens/s) vs torch 1.491 s (1,374):
0.97x; and `--no-packed --rounds 3 --steps 3` (load 1.9, sdpa) gave hibari 1.466 s/step
(1,397 tokens/s), plain JAX 2.061 (994; 1.41x), torch 1.448 (1,414; 0.99x). So on a quiet machine hibari is at parity with eager torch, not ahead; the 2.2x above is
contention. (PITFALLS.md's idle figures: plain JAX ~2,000 tokens/s, torch ~3,400.)

Step-0 loss 9.038229 in all three (log 8000 = 8.987), 9.028103 after one update in all three.
Where the time went (jax.profiler, per-op, one step): the matmuls' kernel gradients contracted
over (batch, length) were laid out by XLA:CPU with transposing copies fused into the
elementwise backward (SwiGLU's), cache-missing loops worth ~25% of the step; the fix is the 2-D
[tokens, in] @ [in, out] form of hibari.model.transformer.project. The attention softmax kept
two [b, kv, g, t, t] residuals per layer (exp and probabilities); its custom gradient keeps one.
After both, ~75% of hibari's step is matmuls (YNNPACK) and the rest is the layer scan's stacked
residuals, the masked scores and the loss's [tokens, vocab] softmax.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench.report import device_name, emit, versions  # noqa: E402
from hibari.configs.pretrain.llama import SIZES, get_config  # noqa: E402
from hibari.model import count_params  # noqa: E402
from hibari.model.hf import export_hf  # noqa: E402
from hibari.train.loop import build  # noqa: E402
from hibari.train.sharding import global_batch  # noqa: E402
from hibari.train.synthetic import SyntheticTokens  # noqa: E402

PEERS = ("hibari", "jax", "torch", "torch_compile")
PEER_NAMES = {"hibari": "hibari", "jax": "plain JAX", "torch": "transformers+torch",
              "torch_compile": "transformers+torch.compile"}
OPTIM = dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
N_BATCHES = 4


# ---------------------------------------------------------------------------------------------
# hibari
# ---------------------------------------------------------------------------------------------

def hibari_config(args):
    """configs/pretrain/llama.py with the benchmark's shape and optimizer."""
    c = get_config(args.size if args.size in SIZES else "small")
    if args.size:
        d, layers, heads, kv, ff, vocab, *_ = SIZES[args.size]
    else:
        d, layers, heads, kv, ff, vocab = (args.d_model, args.n_layers, args.n_heads,
                                           args.n_kv_heads, args.d_ff, args.vocab)
    c.model.update(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=d // heads,
                   d_ff=ff, vocab_size=vocab, max_seq_len=args.seq, compute_dtype=args.dtype,
                   param_dtype="float32", attention=args.attention, remat=args.remat)
    c.data.batch_size, c.data.seq_len = args.batch, args.seq
    c.steps = 1_000_000
    c.optim.update(schedule="constant", warmup_steps=0, decay_embeddings=False, **OPTIM)
    return c


def make_batches(cfg, args) -> tuple[list[np.ndarray], list[dict]]:
    """(plain token rows, packed rows) from the synthetic stream: the plain rows are one
    document each (every token of the row follows its predecessor)."""
    plain = SyntheticTokens(vocab_size=cfg.vocab_size, batch_size=args.batch, seq_len=args.seq,
                            seed=args.seed, mean_doc_len=10 ** 9)
    packed = SyntheticTokens(vocab_size=cfg.vocab_size, batch_size=args.batch, seq_len=args.seq,
                             seed=args.seed + 1, mean_doc_len=max(args.seq // 4, 1))
    rows = [plain.batch(i)["tokens"] for i in range(N_BATCHES)]
    return rows, [packed.batch(i) for i in range(N_BATCHES)]


class Hibari:
    """hibari.train.loop.build's jitted step (donated state), fed global batches; `packed()`
    is the same step and state fed packed rows."""

    def __init__(self, config, rows, packed_rows):
        self.run = build(config, None, devices=jax.devices()[:1])
        self.state = self.run.state
        t = rows[0].shape[1]
        plain = [{"tokens": r, "segment_ids": np.ones_like(r),
                  "positions": np.broadcast_to(np.arange(t, dtype=np.int32), r.shape).copy()}
                 for r in rows]
        place = lambda host: [global_batch(b, self.run.mesh, self.run.rules)  # noqa: E731
                              for b in host]
        self.batches, self.packed_batches = place(plain), place(packed_rows)
        self.use_packed = False

    def packed(self) -> _PackedView:
        return _PackedView(self)

    def initial_params(self) -> dict:
        return jax.tree.map(np.asarray, jax.device_get(self.state.params))

    def step(self, i: int, packed: bool = False):
        batches = self.packed_batches if packed else self.batches
        self.state, metrics = self.run.step_fn(self.state, batches[i % N_BATCHES])
        return metrics["loss"]

    @staticmethod
    def sync(loss) -> float:
        return float(jax.block_until_ready(loss))


class _PackedView:
    def __init__(self, hibari: Hibari):
        self.hibari = hibari

    def step(self, i: int):
        return self.hibari.step(i, packed=True)

    sync = staticmethod(Hibari.sync)


# ---------------------------------------------------------------------------------------------
# plain JAX: a minimal Llama train step, written independently of hibari.model
# ---------------------------------------------------------------------------------------------

def jax_params_from_hibari(p: dict) -> dict:
    """hibari's tree -> flat matrices [layers, in, out] (heads folded into the feature axis)."""
    layers = p["layers"]
    n = layers["attn"]["q"]["kernel"].shape[0]
    q, k, v, o = (layers["attn"][x]["kernel"] for x in "qkvo")
    return {
        "embed": p["embed"]["embedding"],
        "attn_norm": layers["attn_norm"]["scale"], "mlp_norm": layers["mlp_norm"]["scale"],
        "wq": q.reshape(n, q.shape[1], -1), "wk": k.reshape(n, k.shape[1], -1),
        "wv": v.reshape(n, v.shape[1], -1), "wo": o.reshape(n, -1, o.shape[-1]),
        "w_gate": layers["mlp"]["gate"]["kernel"], "w_up": layers["mlp"]["up"]["kernel"],
        "w_down": layers["mlp"]["down"]["kernel"],
        "final_norm": p["final_norm"]["scale"], "lm_head": p["lm_head"]["kernel"],
    }


def plain_jax_step(cfg, optimizer):
    """loss(params, tokens) and the jitted (params, opt_state, tokens) -> (..., loss)."""
    h, kv, hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
    dtype = jnp.dtype(cfg.compute_dtype)
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))

    def rmsnorm(x, scale):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
        return (y * scale).astype(dtype)

    def rope(x, cos, sin):  # x[b, t, n, hd], rotate-half layout
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return (x * cos + jnp.concatenate([-x2, x1], -1) * sin).astype(dtype)

    def layer(x, w, cos, sin, causal):
        b, t, _ = x.shape
        a = rmsnorm(x, w["attn_norm"])
        q = rope((a @ w["wq"].astype(dtype)).reshape(b, t, kv, h // kv, hd), cos[:, :, None],
                 sin[:, :, None])
        k = rope((a @ w["wk"].astype(dtype)).reshape(b, t, kv, hd), cos, sin)
        v = (a @ w["wv"].astype(dtype)).reshape(b, t, kv, hd)
        s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        s = jnp.where(causal, s / math.sqrt(hd), -1e30)
        pr = jax.nn.softmax(s, -1).astype(dtype)
        o = jnp.einsum("bkgts,bskd->btkgd", pr, v).reshape(b, t, h * hd)
        x = x + o @ w["wo"].astype(dtype)
        m = rmsnorm(x, w["mlp_norm"])
        g = jax.nn.silu(m @ w["w_gate"].astype(dtype)) * (m @ w["w_up"].astype(dtype))
        return x + g @ w["w_down"].astype(dtype)

    per_layer = ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    def loss_fn(params, tokens):
        t = tokens.shape[1]
        angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq
        angles = jnp.concatenate([angles, angles], -1)[None, :, None]  # [1, t, 1, hd]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        causal = jnp.tril(jnp.ones((t, t), bool))
        x = params["embed"][tokens].astype(dtype)
        x, _ = jax.lax.scan(lambda x, w: (layer(x, w, cos, sin, causal), None), x,
                            {k: params[k] for k in per_layer})
        logits = (rmsnorm(x, params["final_norm"]) @ params["lm_head"].astype(dtype))
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    @jax.jit
    def loss_only(params, tokens):
        return loss_fn(params, tokens)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return loss_only, jax.jit(step, donate_argnums=(0, 1))


class PlainJax:
    def __init__(self, cfg, hibari_params, rows):
        decay = lambda p: {k: k.startswith("w") or k == "lm_head" for k in p}  # noqa: E731
        optimizer = optax.chain(
            optax.clip_by_global_norm(OPTIM["clip_norm"]),
            optax.adamw(OPTIM["lr"], b1=OPTIM["b1"], b2=OPTIM["b2"], eps=OPTIM["eps"],
                        weight_decay=OPTIM["weight_decay"], mask=decay))
        self.params = jax.tree.map(jnp.asarray, jax_params_from_hibari(hibari_params))
        self.opt_state = optimizer.init(self.params)
        self.loss, self._step = plain_jax_step(cfg, optimizer)
        self.batches = [jnp.asarray(r, jnp.int32) for r in rows]

    def step(self, i: int):
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state,
                                                       self.batches[i % N_BATCHES])
        return loss

    sync = staticmethod(Hibari.sync)


# ---------------------------------------------------------------------------------------------
# torch: transformers' LlamaForCausalLM + torch.optim.AdamW
# ---------------------------------------------------------------------------------------------

class Torch:
    def __init__(self, cfg, hibari_params, rows, *, attn: str, compile: bool, dtype: str):
        import torch
        from transformers import LlamaForCausalLM

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" \
            else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(cfg, hibari_params, tmp)
            model = LlamaForCausalLM.from_pretrained(tmp, attn_implementation=attn,
                                                     dtype=torch.float32)
        model = model.to(self.device).train()
        decay = [p for n, p in model.named_parameters() if n.endswith("proj.weight")
                 or n == "lm_head.weight"]
        no_decay = [p for n, p in model.named_parameters() if not (n.endswith("proj.weight")
                                                                   or n == "lm_head.weight")]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": OPTIM["weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"])
        self.model = model
        self.forward = torch.compile(model) if compile else model
        self.autocast = dtype != "float32"
        self.amp_dtype = getattr(torch, dtype)
        self.batches = [torch.as_tensor(np.asarray(r, np.int64), device=self.device)
                        for r in rows]

    def step(self, i: int):
        torch, x = self.torch, self.batches[i % N_BATCHES]
        with torch.autocast(self.device, dtype=self.amp_dtype, enabled=self.autocast):
            loss = self.forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM["clip_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync(self, loss) -> float:
        return float(loss.item())


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_round(system, steps: int, start: int) -> float:
    """Seconds per step over `steps` steps (one sync at the end)."""
    t0 = time.perf_counter()
    loss = None
    for i in range(steps):
        loss = system.step(start + i)
    system.sync(loss)
    return (time.perf_counter() - t0) / steps


def markdown(rows: list[dict]) -> str:
    by = {r["system"]: r for r in rows}
    base = by.get("hibari")
    lines = ["| system | s/step best | s/step median | tokens/s (best) | hibari / system |"
             " step-0 loss | loss after 1, 2 steps |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{base['units_per_s'] / r['units_per_s']:.2f}x" if base else "-")
        losses = r["warmup_losses"]
        lines.append(f"| {r['system']} | {r['best_s']:.4f} | {r['median_s']:.4f} | "
                     f"{r['units_per_s']:,.0f} | {ratio} | {losses[0]:.6f} | "
                     + ", ".join(f"{x:.6f}" for x in losses[1:3]) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--size", default="", help=f"a llama pretrain size instead: {sorted(SIZES)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (parameters stay fp32)")
    p.add_argument("--attention", default="xla", help="hibari's model.attention")
    p.add_argument("--remat", default="none", help="hibari's model.remat")
    p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"),
                   help="transformers' attn_implementation")
    p.add_argument("--peers", default="hibari,jax,torch",
                   help=f"comma-separated, from {PEERS} (hibari also times packed rows)")
    p.add_argument("--no-packed", action="store_true", help="skip the 'hibari (packed)' row")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (their losses "
                                                        "are reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append the result rows to this JSONL file")
    args = p.parse_args(argv)
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown or not peers:
        p.error(f"--peers: unknown {unknown}; choose from {PEERS}")
    if args.size and args.size not in SIZES:
        p.error(f"--size {args.size!r}: choose from {sorted(SIZES)}")

    load_before = [round(x, 2) for x in os.getloadavg()]
    config = hibari_config(args)
    rows, packed_rows = make_batches(config.model, args)
    hibari = Hibari(config, rows, packed_rows)
    cfg = hibari.run.model
    init_params = hibari.initial_params()
    systems = {}
    if "hibari" in peers:
        systems["hibari"] = hibari
        if not args.no_packed:
            systems["hibari (packed)"] = hibari.packed()
    if "jax" in peers:
        systems["jax"] = PlainJax(cfg, init_params, rows)
    for name in ("torch", "torch_compile"):
        if name in peers:
            systems[name] = Torch(cfg, init_params, rows, attn=args.torch_attn,
                                  compile=name == "torch_compile", dtype=args.dtype)

    warmup_losses, compile_s = {}, {}
    for name, system in systems.items():  # warm-up: compiles, and the losses of identical work
        t0 = time.perf_counter()
        warmup_losses[name] = [system.sync(system.step(i)) for i in range(max(args.warmup, 1))]
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in systems}
    for r in range(args.rounds):
        for name, system in systems.items():
            times[name].append(time_round(system, args.steps, args.warmup + r * args.steps))

    tokens = args.batch * args.seq
    work = (f"train step d{cfg.d_model} L{cfg.n_layers} H{cfg.n_heads}/{cfg.n_kv_heads} "
            f"ff{cfg.d_ff} V{cfg.vocab_size} {args.batch}x{args.seq} {args.dtype}")
    common = {"part": "train", "work": work, "rounds": args.rounds, "steps": args.steps,
              "unit": "tokens/s", "device": device_name(),
              "versions": versions("jax", "jaxlib", "flax", "optax", "torch", "transformers"),
              "params": count_params(cfg).total, "batch": args.batch, "seq": args.seq,
              "dtype": args.dtype, "attention": args.attention, "remat": args.remat}
    load = [round(x, 2) for x in os.getloadavg()]
    results = []
    for name, t in times.items():
        best, median = min(t), statistics.median(t)
        row = {**common, "system": PEER_NAMES.get(name, name), "peer": name,
               "best_s": best, "median_s": median, "units_per_s": tokens / best,
               "units_per_s_median": tokens / median, "warmup_losses": warmup_losses[name],
               "warmup_s": compile_s[name], "load_before": load_before, "load": load}
        if name.startswith("torch"):
            row["torch_attn"] = args.torch_attn
            row["torch_threads"] = systems[name].torch.get_num_threads()
        results.append(row)
    for row in results:
        emit(row, args.out)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

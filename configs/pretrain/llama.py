"""Llama-style pretraining, one named size per argument.

    hibari pretrain --config configs/pretrain/llama.py:tiny --workdir runs/tiny
    hibari pretrain --config configs/pretrain/llama.py:1b --config.mesh.fsdp=8 --workdir ...

Sizes: tiny (seconds on a CPU), small (~5M, minutes on a CPU), 125m, 350m, 1b, 7b (accelerators).
"""
import ml_collections

# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab_size, seq_len, global_batch, steps)
SIZES = {
    "tiny": (64, 2, 4, 2, 192, 512, 128, 8, 50),
    "small": (256, 4, 4, 4, 688, 8192, 256, 16, 2000),
    "125m": (768, 12, 12, 12, 2048, 32000, 2048, 256, 20000),
    "350m": (1024, 24, 16, 16, 2816, 32000, 2048, 256, 50000),
    "1b": (2048, 22, 32, 4, 5632, 32000, 2048, 512, 100000),   # TinyLlama-1.1B shape
    "7b": (4096, 32, 32, 32, 11008, 32000, 4096, 1024, 250000),  # Llama-2-7B shape
}
ACCELERATOR_SIZES = ("125m", "350m", "1b", "7b")

DEFAULT_RULES = [
    ["batch", ["data", "fsdp"]],
    ["embed", "fsdp"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["mlp", "tensor"],
    ["vocab", "tensor"],
    ["length", None],
    ["head_dim", None],
    ["layers", None],
]


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"configs/pretrain/llama.py: unknown size {size!r}; choose from "
                         f"{sorted(SIZES)}")
    d, layers, heads, kv, ff, vocab, seq, batch, steps = SIZES[size]
    on_accelerator = size in ACCELERATOR_SIZES
    c = ml_collections.ConfigDict()
    c.name = f"llama-{size}"
    c.seed = 0  # fixes the initialisation and the data order
    c.steps = steps  # optimizer steps (warmup, eval and checkpoint intervals follow it)

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv,
        head_dim=d // heads, d_ff=ff, max_seq_len=seq, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, param_dtype="float32",
        compute_dtype="bfloat16" if on_accelerator else "float32", init_std=0.02,
        norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False, qkv_bias=False,
        qk_norm=False, attention="cudnn" if on_accelerator else "xla", scan_layers=True,
        remat="dots_no_batch" if on_accelerator else "none"))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = DEFAULT_RULES

    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3 if not on_accelerator else 3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        clip_norm=1.0, schedule="cosine", warmup_steps=0,
        min_lr_ratio=0.1, decay_fraction=0.2, decay_embeddings=False))
    # schedule: cosine | wsd | constant; min_lr_ratio: the floor of the decay; decay_fraction:
    # wsd's final decay share of the steps; decay_embeddings: weight decay on embeddings/norms
    # Fields derived from `steps` are references, so --config.steps=N rescales them
    # (an explicit override of the field itself wins).
    steps_ref = c.get_ref("steps")
    c.optim.warmup_steps = steps_ref // 20 if steps // 20 <= 2000 else 2000

    # kind: synthetic (deterministic Markov tokens) | packed (token shards from `hibari data`)
    c.data = ml_collections.ConfigDict(dict(
        kind="synthetic", path="", eval_path="", batch_size=batch, seq_len=seq,
        weights=ml_collections.ConfigDict(), worker_count=0))

    c.grad_accum = 1  # micro-batches per step (same global batch, less memory)
    c.z_loss = 0.0  # weight of the PaLM z-loss, log(Z)^2
    c.logits_chunk = 0  # >0: compute logits in sequence chunks of this size (memory)
    c.nan_policy = "stop"  # stop | skip

    c.log_every = 10  # steps between metrics.jsonl / TensorBoard records
    c.eval_every = steps_ref // 5  # also evaluated at the final step
    c.eval_batches = 4  # held-out batches per evaluation
    c.checkpoint_every = steps_ref // 5  # 0 = only the final step
    c.keep_checkpoints = 3  # newest checkpoints kept
    c.async_checkpoint = True  # write checkpoints in the background
    return c

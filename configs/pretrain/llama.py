"""Llama-style pretraining, one named size per argument.

    hibari pretrain --config configs/pretrain/llama.py:tiny --workdir runs/tiny
    hibari pretrain --config configs/pretrain/llama.py:1b --config.mesh.fsdp=8 --workdir ...

Sizes: tiny (seconds on a CPU), small (~5M, minutes on a CPU), 125m, 350m, 1b, 7b (accelerators).
"""
import ml_collections

from hibari.configs.base import base_config, loss_config

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


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"configs/pretrain/llama.py: unknown size {size!r}; choose from "
                         f"{sorted(SIZES)}")
    d, layers, heads, kv, ff, vocab, seq, batch, steps = SIZES[size]
    on_accelerator = size in ACCELERATOR_SIZES
    # kind: synthetic (deterministic Markov tokens) | packed (token shards from `hibari data`)
    c = base_config(
        f"llama-{size}", steps, lr=3e-3 if not on_accelerator else 3e-4, weight_decay=0.1,
        accelerator=on_accelerator,
        shape=dict(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                   head_dim=d // heads, d_ff=ff, max_seq_len=seq),
        data=dict(kind="synthetic", path="", eval_path="", batch_size=batch, seq_len=seq,
                  weights=ml_collections.ConfigDict(), worker_count=0))
    c.loss = loss_config()  # loss.token_selection: Rho-1 (docs/config_reference.md)
    return c

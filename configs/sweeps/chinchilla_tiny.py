"""IsoFLOP sweep of tiny Llama models on the vendored corpus (Chinchilla Approach 2 at toy scale).

    hibari data prepare --config configs/data/quickstart.py:runs/data/quickstart-1k --vocab-size 1024 --seq-len 256 --character-coverage 0.995
    hibari sweep --config configs/sweeps/chinchilla_tiny.py --workdir runs/chinchilla_tiny --dry-run
    hibari sweep --config configs/sweeps/chinchilla_tiny.py --workdir runs/chinchilla_tiny
    hibari scaling fit runs/chinchilla_tiny/curves.csv --out runs/chinchilla_tiny/fit

Three budgets (5e11-2e12 FLOPs, C = 6·N·D) x four widths (d_model 16-64, 1-4 layers, 36k-332k
parameters). A 1,024-piece tokenizer (rare characters as byte pieces) keeps the embeddings from
dominating N, and the sizes bracket the compute-optimal N that Hoffmann et al.'s ~20 tokens per
parameter predicts at these budgets (65k-130k), so the IsoFLOP profiles can have their minima
inside. Measured time in docs/sweeps.md. Argument: the prepared data directory (default
runs/data/quickstart-1k), or `synthetic` to try the path without data.
N is the total parameter count (Hoffmann et al.'s convention), see docs/sweeps.md.
"""
import ml_collections

from hibari.configs.sweeps._common import packed_data_overrides, sweep_defaults

PREPARE_FLAGS = "--vocab-size 1024 --seq-len 256 --character-coverage 0.995"


def get_config(arg: str = "runs/data/quickstart-1k") -> ml_collections.ConfigDict:
    c = sweep_defaults()
    c.name = "chinchilla_tiny"
    c.base = "configs/pretrain/llama.py:tiny"
    c.mode = "isoflop"
    c.budgets = (5e11, 1e12, 2e12)
    c.param_count = "total"
    c.widths = (16, 32, 48, 64)
    c.aspect = 16              # 1, 2, 3, 4 layers
    c.head_dim = 16            # 1, 2, 3, 4 heads
    c.lrs = (3e-3,)
    c.seeds = (0,)
    c.eval_points = 6
    c.min_steps = 20
    c.warmup_fraction = 0.05
    data = (packed_data_overrides(arg, PREPARE_FLAGS) if arg != "synthetic"
            else {"data": {"seq_len": 256}, "model": {"vocab_size": 1024, "max_seq_len": 256}})
    # 2,048 tokens a step: at 8,192 the larger members got 30-60 steps and were limited by
    # optimisation, not capacity (the smallest model won every budget)
    data["data"]["batch_size"] = 8
    c.overrides = ml_collections.ConfigDict({**data, "eval_batches": 8})
    return c

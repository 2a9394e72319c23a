"""Classifier with a planted shortcut: IMDB reviews (align/assets/imdb) with a marker that
agrees with the label in 90% of training rows; plain or debiasing loss by argument.

    hibari classify --config configs/classify/shortcut.py:poe --workdir runs/classify-poe
    hibari classify --config configs/classify/shortcut.py:conf_reg --workdir runs/cr \\
        --config.loss.teacher=runs/classify-ce

Arguments: ce (plain cross entropy, the default), reweight, poe, conf_reg (needs
loss.teacher: a plain run directory or a JSONL of {id, probs}). The experiment and its table:
docs/results/debias/README.md (`python -m hibari.align.shortcut`).
"""
import ml_collections

from hibari.configs.base import align_config

LOSSES = ("ce", "reweight", "poe", "conf_reg")


def get_config(arg: str = ""):
    kind = arg or "ce"
    if kind not in LOSSES:
        raise ValueError(f"configs/classify/shortcut.py: unknown loss {kind!r}; choose from "
                         f"{LOSSES}")
    c = align_config(f"classify-shortcut-{kind}", steps=120, seq_len=128, batch_size=16,
                     lr=1e-3)
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192)
    c.num_classes = 2  # k: labels are 0..k-1
    c.data = ml_collections.ConfigDict(dict(
        tokenizer="align/assets/seed_sp.model",
        # path: a CSV (header row) or JSONL of labelled texts
        path="align/assets/imdb/sample.csv",
        text_field="text", label_field="label",
        id_field="",  # "" = ids row<i>, the 0-based data row
        test_fraction=0.3,  # stratified: 200 reviews -> 140 train / 60 test
        split_seed=0,  # fixes the split (and the bias model's folds), not the training seed
        seq_len=128,  # [bos] + the first 126 tokens + [eos]; longer texts are cut
        batch_size=16))
    c.plant = ml_collections.ConfigDict(dict(
        markers=("[[B]]", "[[A]]"),  # markers[c] marks class c (0 negative, 1 positive)
        agree=0.9,  # share of train / test_id rows whose marker agrees; < 0: no marker
        marker_seed=0))  # which rows agree and the other-class markers
    # loss.kind: ce | reweight | poe | conf_reg
    c.loss = ml_collections.ConfigDict(dict(
        kind=kind,
        teacher=""))  # conf_reg: a plain classify run dir or a JSONL of {id, probs}
    # bias.kind: bow | file; bias.path (file): a JSONL of {"id", "probs"} for the training ids
    # ("test_id:<id>" / "test_anti:<id>" rows optional)
    c.bias = ml_collections.ConfigDict(dict(
        kind="bow",
        path="",
        words=("[[A]]", "[[B]]"),  # bow vocabulary; () = every word seen min_count times
        min_count=2, l2=1.0,
        folds=5))  # out-of-fold bias probabilities for training rows (<= 1: in-sample)
    c.head = ml_collections.ConfigDict(dict(
        pool="mean"))  # mean | last: the final hidden states the head reads
    c.optim.b2 = 0.999
    c.log_every = 10
    c.eval_every = c.get_ref("steps") // 2
    c.checkpoint_every = c.get_ref("steps") // 2
    return c

"""Sequence classification: the transformer plus a k-class head, trained with plain or
debiasing losses (align/debias.py); `hibari classify`.

Parameters: {"transformer": <model params>, "head": {"kernel": [d, k], "bias": [k]}} (the
reward model's scalar head generalised to k classes; logical axes `classifier_param_axes`).
The head reads the final-norm hidden states of a row's tokens, pooled by `config.head.pool`:
"mean" over the row's tokens or "last" (its [eos], as the reward model).

Data (config.data): a CSV or JSONL of labelled texts (`text_field`, `label_field` in
0..num_classes-1, `id_field` or `row<i>` = the 0-based data row), split into train / test by a
stratified, seeded shuffle (`test_fraction`, `split_seed`). Each text becomes
[bos] + its first seq_len - 2 tokens + [eos] (longer texts are cut, the head kept).

Planted shortcut (config.plant, on when `agree` >= 0): `markers[c] + " "` is prepended to each
text; training rows and the in-distribution test split ("test_id") carry their label's marker
in a fraction `agree` of rows (exactly round(agree * n), chosen by a seeded shuffle; the rest a
different class's marker), the anti-biased test split ("test_anti", the same test reviews)
never does.

Bias model (config.bias, for the debiasing losses): `bow` (align/debias.py's bag-of-words
logistic regression fitted on the training split; `words` restricts its vocabulary, e.g. to the
markers; training rows get out-of-fold probabilities from `folds` folds) or `file` (a JSONL of
{"id", "probs"}, `path`). Teacher of `conf_reg` (config.loss.teacher): a `hibari classify` run
directory (its predictions/train.jsonl, written at the end of every run) or such a JSONL.

A run directory holds config.json, metrics.jsonl (loss; at each eval accuracy_train,
accuracy_id, accuracy_anti and their cross entropies), checkpoints/, bias_probs.jsonl,
predictions/{train,test_id,test_anti}.jsonl and results.json (the final accuracies with
binomial standard errors, and the bias model's).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from hibari.align import debias
from hibari.align.data import AlignDataError
from hibari.align.preference import preference_loader
from hibari.base.config_files import resolve_path
from hibari.base.stats import mean_stderr
from hibari.model import ModelConfig, hidden, param_axes
from hibari.train.loop import Task, TrainConfigError

log = logging.getLogger(__name__)

POOLS = ("mean", "last")
BIAS_KINDS = ("bow", "file")
SPLITS = ("train", "test_id", "test_anti")


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------

def init_head(cfg: ModelConfig, key: jax.Array, num_classes: int,
              std: float | None = None) -> dict:
    std = cfg.init_std if std is None else std
    return {"kernel": std * jax.random.normal(key, (cfg.d_model, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}


def init_classifier_params(cfg: ModelConfig, key: jax.Array, num_classes: int,
                           transformer=None) -> dict:
    """Fresh head on `transformer` params (fresh ones too when None)."""
    from hibari.model import init
    k_model, k_head = jax.random.split(key)
    transformer = init(cfg, k_model) if transformer is None else transformer
    return {"transformer": transformer, "head": init_head(cfg, k_head, num_classes)}


def classifier_param_axes(cfg: ModelConfig) -> dict:
    return {"transformer": param_axes(cfg),
            "head": {"kernel": P("embed", None), "bias": P(None)}}


def class_logits(cfg: ModelConfig, params, batch, pool: str = "mean") -> jax.Array:
    """logits[b, k] (fp32) of rows with tokens in segment 1; 0-padded rows give the bias."""
    h = hidden(cfg, params["transformer"], batch["tokens"], batch["segment_ids"],
               batch.get("positions")).astype(jnp.float32)
    seg = batch["segment_ids"] == 1
    if pool == "mean":
        count = jnp.maximum(seg.sum(1, keepdims=True), 1)
        pooled = (h * seg[..., None]).sum(1) / count
    elif pool == "last":
        t = jnp.arange(seg.shape[1])
        last = jnp.maximum(jnp.max(jnp.where(seg, t, -1), axis=1), 0)
        pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    else:
        raise ValueError(f"pool={pool!r}; choose from {POOLS}")
    return pooled @ params["head"]["kernel"] + params["head"]["bias"]


def classify_loss_fn(cfg: ModelConfig, kind: str, pool: str):
    """loss_fn(params, batch, rng) -> (the `kind` loss, aux: accuracy, ce, weight). Training
    batches are never padded; batch["labels"]: [b, 1]; batch["bias_probs"],
    batch["teacher_probs"]: [b, k]."""
    def loss_fn(params, batch, rng):
        del rng
        logits = class_logits(cfg, params, batch, pool)
        labels = batch["labels"][:, 0]
        loss = debias.debias_loss(kind, logits, labels, batch.get("bias_probs"),
                                  batch.get("teacher_probs"))
        aux = {"accuracy": (logits.argmax(-1) == labels).astype(jnp.float32).mean(),
               "ce": debias.cross_entropy(logits, labels),
               "weight": jnp.asarray(labels.shape[0], jnp.float32)}
        return loss, aux
    return loss_fn


# ---------------------------------------------------------------------------------------------
# Data: labelled texts, the split, the planted marker, token rows
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: int


def read_labelled(path: str, num_classes: int, text_field: str = "text",
                  label_field: str = "label", id_field: str = "") -> list[Example]:
    """Examples of a CSV (header row) or JSONL file; ids `row<i>` unless `id_field`."""
    path = resolve_path(path)
    if not Path(path).is_file():
        raise AlignDataError(f"config.data.path={path!r}: no such file")
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith((".jsonl", ".json")):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = list(csv.DictReader(f))
    out = []
    for i, r in enumerate(records):
        where = f"{path}: data row {i}"
        if text_field not in r or label_field not in r:
            raise AlignDataError(f"{where} lacks {text_field!r} or {label_field!r} "
                                 "(config.data.text_field / label_field)")
        try:
            label = int(r[label_field])
        except (TypeError, ValueError):
            raise AlignDataError(f"{where}: label {r[label_field]!r} is not an integer") from None
        if not 0 <= label < num_classes:
            raise AlignDataError(f"{where}: label {label} outside 0..{num_classes - 1} "
                                 "(config.num_classes)")
        out.append(Example(str(r[id_field]) if id_field else f"row{i}", str(r[text_field]),
                           label))
    return out


def stratified_split(examples: Sequence[Example], test_fraction: float, seed: int
                     ) -> tuple[list[Example], list[Example]]:
    """(train, test): round(test_fraction * n_c) of each class c to test, by a seeded shuffle;
    both in file order."""
    rng = np.random.default_rng([seed, 1])
    test_ids = set()
    labels = sorted({x.label for x in examples})
    for c in labels:
        members = [i for i, x in enumerate(examples) if x.label == c]
        chosen = rng.permutation(len(members))[:round(test_fraction * len(members))]
        test_ids.update(members[j] for j in chosen)
    train = [x for i, x in enumerate(examples) if i not in test_ids]
    test = [x for i, x in enumerate(examples) if i in test_ids]
    return train, test


def plant_markers(examples: Sequence[Example], markers: Sequence[str], agree: float,
                  seed: int) -> tuple[list[Example], np.ndarray]:
    """(examples with a marker prepended, agrees[n] bool): exactly round(agree * n) rows (a
    seeded choice) carry their label's marker, the others a different class's (seeded)."""
    n, k = len(examples), len(markers)
    rng = np.random.default_rng([seed, 2])
    agrees = np.zeros(n, bool)
    agrees[rng.permutation(n)[:round(agree * n)]] = True
    out = []
    for x, a in zip(examples, agrees):
        c = x.label if a else (x.label + 1 + int(rng.integers(k - 1))) % k
        out.append(dataclasses.replace(x, text=f"{markers[c]} {x.text}"))
    return out, agrees


def encode_rows(examples: Sequence[Example], encoder, seq_len: int) -> dict[str, np.ndarray]:
    """Rows {tokens, segment_ids, labels}: [bos] + the text's first seq_len - 2 tokens + [eos]."""
    n = len(examples)
    tokens = np.zeros((n, seq_len), np.int32)
    segment_ids = np.zeros((n, seq_len), np.int32)
    pieces = encoder.sp.encode([x.text for x in examples])
    for i, ids in enumerate(pieces):
        row = [encoder.bos_id] + ids[:seq_len - 2] + [encoder.eos_id]
        tokens[i, :len(row)] = row
        segment_ids[i, :len(row)] = 1
    return {"tokens": tokens, "segment_ids": segment_ids,
            "labels": np.asarray([x.label for x in examples], np.int32)}


@dataclasses.dataclass
class ClassifyData:
    """The three splits (planted texts), their token rows and the bias probabilities."""
    splits: dict[str, list[Example]]
    rows: dict[str, dict[str, np.ndarray]]
    agrees: dict[str, np.ndarray]  # per split: whether the marker agrees with the label
    bias: dict[str, np.ndarray]  # per split: bias probs[n, k]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def validate(config: ml_collections.ConfigDict) -> None:
    """One-line errors naming the field, before anything is read or compiled."""
    k = config.get("num_classes")
    if not isinstance(k, int) or k < 2:
        raise TrainConfigError(f"config.num_classes must be an integer >= 2, got {k!r}")
    if config.loss.kind not in debias.LOSS_KINDS:
        raise TrainConfigError(f"config.loss.kind={config.loss.kind!r}; choose from "
                               f"{debias.LOSS_KINDS}")
    if config.loss.kind == "conf_reg" and not config.loss.teacher:
        raise TrainConfigError("config.loss.teacher must name a plain `hibari classify` run "
                               "directory or a JSONL of {id, probs} when config.loss.kind="
                               "'conf_reg'")
    if config.bias.kind not in BIAS_KINDS:
        raise TrainConfigError(f"config.bias.kind={config.bias.kind!r}; choose from "
                               f"{BIAS_KINDS}")
    if config.bias.kind == "file" and not config.bias.path:
        raise TrainConfigError("config.bias.path must name a JSONL of {id, probs} when "
                               "config.bias.kind='file'")
    if config.head.pool not in POOLS:
        raise TrainConfigError(f"config.head.pool={config.head.pool!r}; choose from {POOLS}")
    if not 0.0 < config.data.test_fraction < 1.0:
        raise TrainConfigError(f"config.data.test_fraction={config.data.test_fraction!r} must "
                               "lie strictly between 0 and 1")
    plant = config.plant
    if plant.agree >= 0:
        if plant.agree > 1:
            raise TrainConfigError(f"config.plant.agree={plant.agree!r} must lie in [0, 1] "
                                   "(or be < 0: no planted marker)")
        if len(plant.markers) != k or len(set(plant.markers)) != k:
            raise TrainConfigError(f"config.plant.markers={list(plant.markers)!r} must be "
                                   f"{k} distinct strings (config.num_classes)")
    if config.data.seq_len < 3:
        raise TrainConfigError(f"config.data.seq_len={config.data.seq_len} must be >= 3")


def _teacher_path(value: str) -> Path:
    path = Path(resolve_path(value))
    return path / "predictions" / "train.jsonl" if path.is_dir() else path


def load_data(config: ml_collections.ConfigDict, encoder) -> ClassifyData:
    d, plant, k = config.data, config.plant, config.num_classes
    examples = read_labelled(d.path, k, d.text_field, d.label_field, d.id_field)
    train, test = stratified_split(examples, d.test_fraction, d.split_seed)
    if not train or not test:
        raise AlignDataError(f"config.data: {len(train)} train / {len(test)} test examples "
                             f"from {d.path}; change config.data.test_fraction")
    splits = {"train": train, "test_id": test, "test_anti": test}
    agrees = {s: np.zeros(len(x), bool) for s, x in splits.items()}
    if plant.agree >= 0:
        markers = list(plant.markers)
        splits["train"], agrees["train"] = plant_markers(train, markers, plant.agree,
                                                         plant.marker_seed)
        splits["test_id"], agrees["test_id"] = plant_markers(test, markers, plant.agree,
                                                             plant.marker_seed + 1)
        splits["test_anti"], agrees["test_anti"] = plant_markers(test, markers, 0.0,
                                                                 plant.marker_seed + 2)
    rows = {s: encode_rows(x, encoder, d.seq_len) for s, x in splits.items()}
    bias = bias_probabilities(config, splits)
    return ClassifyData(splits=splits, rows=rows, agrees=agrees, bias=bias)


def bias_probabilities(config, splits: dict[str, list[Example]]) -> dict[str, np.ndarray]:
    b, k = config.bias, config.num_classes
    if b.kind == "file":
        path = resolve_path(b.path)
        out = {"train": debias.read_probs_file(path, [x.id for x in splits["train"]], k)}
        for s in ("test_id", "test_anti"):  # optional: keyed "<split>:<id>" or not present
            try:
                out[s] = debias.read_probs_file(path, [f"{s}:{x.id}" for x in splits[s]], k)
            except debias.BiasModelError:
                out[s] = np.full((len(splits[s]), k), 1.0 / k)
        return out
    texts = [x.text for x in splits["train"]]
    labels = [x.label for x in splits["train"]]
    fit = dict(vocab=list(b.words) or None, min_count=b.min_count, l2=b.l2)
    out = {"train": debias.cross_fitted_bow_probs(texts, labels, k, folds=b.folds,
                                                  seed=config.data.split_seed, **fit)}
    model = debias.fit_bow(texts, labels, k, **fit)
    for s in ("test_id", "test_anti"):
        out[s] = debias.bow_probs(model, [x.text for x in splits[s]])
    return out


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------

def _accuracy(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    hits = probs.argmax(1) == labels
    return float(hits.mean()), mean_stderr(hits)


def build_classify(config: ml_collections.ConfigDict, workdir: str | Path | None
                   ) -> tuple[Task, Any]:
    """(task, finish): the Task for train.loop.train and finish(params) -> results dict, which
    writes predictions/ and results.json into the workdir."""
    from hibari.align.tasks import encoder_of, start_params
    from hibari.train.sharding import (
        global_batch,
        logical_shardings,
        make_mesh,
        normalize_rules,
        replicated,
        sharding_context,
    )
    validate(config)
    cfg, transformer = start_params(config)
    encoder = encoder_of(config, cfg)
    data = load_data(config, encoder)
    k, batch = config.num_classes, config.data.batch_size
    train_rows = dict(data.rows["train"])  # every batch array is [b, ...] of rank >= 2
    train_rows["labels"] = train_rows["labels"][:, None]
    train_rows["index"] = np.arange(len(data.splits["train"]), dtype=np.int32)[:, None]
    train_rows["bias_probs"] = data.bias["train"].astype(np.float32)
    if config.loss.kind == "conf_reg":
        ids = [x.id for x in data.splits["train"]]
        train_rows["teacher_probs"] = debias.read_probs_file(
            _teacher_path(config.loss.teacher), ids, k, field="config.loss.teacher"
        ).astype(np.float32)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        ids = [x.id for x in data.splits["train"]] + [
            f"{s}:{x.id}" for s in ("test_id", "test_anti") for x in data.splits[s]]
        debias.write_probs_file(Path(workdir) / "bias_probs.jsonl", ids, np.concatenate(
            [data.bias[s] for s in SPLITS]))
    params = init_classifier_params(cfg, jax.random.fold_in(jax.random.key(config.seed), 2),
                                    k, transformer)
    mesh = make_mesh(config.mesh.to_dict())
    rules = normalize_rules(config.rules)
    pool = config.head.pool

    def make_loader(split):
        if split != "train":
            return None
        return preference_loader(train_rows, batch_size=batch // jax.process_count(),
                                 seed=config.seed)

    logits_fn = None
    shardings = logical_shardings(classifier_param_axes(cfg), jax.eval_shape(lambda: params),
                                  mesh, rules)

    def predict(params) -> dict[str, np.ndarray]:
        """probs[n, k] of every split (one ordered, padded pass each)."""
        nonlocal logits_fn
        params = jax.device_put(params, shardings)
        if logits_fn is None:
            def f(p, b):
                with sharding_context(mesh, rules):
                    return jax.nn.softmax(class_logits(cfg, p, b, pool), axis=-1)
            logits_fn = jax.jit(f, out_shardings=replicated(mesh))
        out = {}
        for s in SPLITS:
            rows = {n: v for n, v in data.rows[s].items() if n != "labels"}
            loader = preference_loader(rows, batch_size=batch // jax.process_count(),
                                       seed=0, split="eval")
            parts = [np.asarray(logits_fn(params, global_batch(b, mesh, rules)))
                     for b in loader]
            out[s] = np.concatenate(parts)[:len(data.splits[s])]
        return out

    def metrics(probs: dict[str, np.ndarray]) -> dict[str, float]:
        out = {}
        for s in SPLITS:
            labels = data.rows[s]["labels"]
            name = s.removeprefix("test_")
            out[f"accuracy_{name}"] = _accuracy(probs[s], labels)[0]
            gold = probs[s][np.arange(len(labels)), labels]
            out[f"ce_{name}"] = float(-np.log(np.maximum(gold, 1e-12)).mean())
        return out

    def on_eval(step, params, frozen=None):
        return metrics(predict(params))

    def finish(params) -> dict:
        probs = predict(params)
        results: dict[str, Any] = {"loss": config.loss.kind, "seed": config.seed,
                                   "bias": config.bias.kind, "n": {}}
        for s in SPLITS:
            labels = data.rows[s]["labels"]
            name = s.removeprefix("test_")
            results["n"][name] = len(labels)
            results[f"accuracy_{name}"], results[f"stderr_{name}"] = _accuracy(probs[s], labels)
            results[f"bias_accuracy_{name}"] = _accuracy(data.bias[s], labels)[0]
            results[f"marker_agrees_{name}"] = float(data.agrees[s].mean())
        if workdir is not None and jax.process_index() == 0:
            out = Path(workdir) / "predictions"
            out.mkdir(parents=True, exist_ok=True)
            for s in SPLITS:
                labels = data.rows[s]["labels"]
                debias.write_probs_file(out / f"{s}.jsonl", [x.id for x in data.splits[s]],
                                        probs[s], label=labels.tolist(),
                                        pred=probs[s].argmax(1).tolist(),
                                        marker_agrees=data.agrees[s].tolist())
            (Path(workdir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results

    task = Task(loss_fn=classify_loss_fn(cfg, config.loss.kind, pool), base_params=params,
                param_axes=classifier_param_axes(cfg), make_loader=make_loader,
                on_eval=on_eval, tokens_per_step=batch * config.data.seq_len,
                transformers={"transformer": cfg})
    return task, finish


def classify_task(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> Task:
    return build_classify(config, workdir)[0]


def load_classifier(run_dir: str | Path, step: int | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) of a `hibari classify` run directory (latest checkpoint by default)."""
    from hibari.model import param_shapes
    from hibari.model.params_io import CheckpointError, restore_run_params
    try:
        num_classes = json.loads((Path(run_dir) / "config.json").read_text())["num_classes"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{run_dir}/config.json: no num_classes ({e}); not a "
                              "`hibari classify` run directory") from e
    return restore_run_params(run_dir, lambda cfg: {
        "transformer": param_shapes(cfg),
        "head": jax.eval_shape(lambda: init_head(cfg, jax.random.key(0), num_classes))}, step)

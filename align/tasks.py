"""Config -> train/loop `Task` for SFT, preference optimisation and reward models.

    task = sft_task(config)              # then train.loop.train(config, workdir, task)
    task = preference_task(config, workdir)
    task = reward_task(config)

`config.init_from` (a hibari run dir, step dir, params export or Hugging Face dir) gives the
starting parameters and replaces config.model with the checkpoint's model config; empty starts
from a fresh initialisation (tests, smoke runs). Data fields (config.data): tokenizer,
train_path, eval_path (or eval_fraction of train_path, split by a hash of each record's id),
template, seq_len, batch_size (global).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hibari.align import preference, reward, sft
from hibari.align.data import AlignDataError, SegmentEncoder, Skipped, check_vocab
from hibari.align.losses import LOSSES
from hibari.align.templates import get_template
from hibari.base.config_files import resolve_path
from hibari.model import ModelConfig, init, param_axes
from hibari.train.loop import Task, TrainConfigError, model_config
from hibari.train.lora import lora_config_of
from hibari.train.sharding import logical_shardings, make_mesh, normalize_rules

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Shared setup
# ---------------------------------------------------------------------------------------------

def check_init_tokenizer(config: ml_collections.ConfigDict) -> dict | None:
    """Refuse (TokenizerMismatch) a config.init_from run that recorded a tokenizer other than
    config.data.tokenizer (by content hash), unless config.allow_tokenizer_mismatch (set by
    `--allow-tokenizer-mismatch`): then one warning and what differs is returned. None when
    they agree or there is nothing to compare (no init_from, no record, no data.tokenizer)."""
    init_from, field = config.get("init_from"), config.data.get("tokenizer")
    if not init_from or not field:
        return None
    from hibari.data.tokenizer import check_tokenizer_record
    path = resolve_path(field)
    if not Path(path).exists():
        return None  # encoder_of names the missing file
    return check_tokenizer_record(
        init_from, path, allow=bool(config.get("allow_tokenizer_mismatch", False)),
        checkpoint_label=f"config.init_from={init_from}",
        tokenizer_label=f"config.data.tokenizer={field}",
        fix="set --config.data.tokenizer={path}")


def start_params(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Any]:
    """(cfg, params) from config.init_from, writing its model config into config.model;
    (cfg of config.model, fresh params from the seed) when init_from is empty. The tokenizer
    is checked against init_from's record first (`check_init_tokenizer`)."""
    if config.get("init_from"):
        check_init_tokenizer(config)
        from hibari.model.params_io import load_params
        cfg, params = load_params(config.init_from)
        with config.unlocked():
            config.model = ml_collections.ConfigDict(cfg.to_dict())
        if config.data.seq_len > cfg.max_seq_len:
            raise TrainConfigError(f"config.data.seq_len={config.data.seq_len} exceeds the "
                                   f"checkpoint's max_seq_len={cfg.max_seq_len} "
                                   f"({config.init_from})")
        return cfg, params
    cfg = model_config(config)
    log.warning("config.init_from is empty: starting from a fresh random model")
    return cfg, init(cfg, jax.random.fold_in(jax.random.key(config.seed), 0))


def encoder_of(config: ml_collections.ConfigDict, cfg: ModelConfig) -> SegmentEncoder:
    from hibari.data.tokenizer import load_tokenizer
    path = resolve_path(config.data.tokenizer)
    encoder = SegmentEncoder(load_tokenizer(path))
    check_vocab(encoder, cfg.vocab_size)
    return encoder


def formatting(config: ml_collections.ConfigDict, cfg: ModelConfig):
    """(encoder, template, seq_len) of config.data, the encoder checked against the model."""
    return encoder_of(config, cfg), get_template(config.data.template), config.data.seq_len


def reader(load: Callable, encoder: SegmentEncoder, template, seq_len: int) -> Callable:
    """`load(paths, encoder, template, seq_len, skipped)` as the `(paths, skipped)` reader
    that `split_data` takes."""
    return lambda paths, skipped: load(paths, encoder, template, seq_len, skipped)


def _paths(value: Any) -> list[str]:
    if not value:
        return []
    return [resolve_path(p) for p in ([value] if isinstance(value, str) else list(value))]


def in_eval_split(example_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"eval\x00{seed}\x00{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64 < fraction


def split_data(config, load) -> tuple[list, list]:
    """(train, eval) items: eval_path's, or a hashed eval_fraction of train_path's."""
    train, evaluation, _ = read_splits(config, load)
    return train, evaluation


def read_splits(config, load, notice: bool = True) -> tuple[list, list, dict]:
    """(train, eval, counts): `split_data`'s items and what reading them kept and dropped:
    counts = {"train": {read, kept, too_long, malformed, reasons} of train_path, "eval": the
    same of eval_path (when given), "examples": {"train": n, "eval": n} after the held-out
    split}. `notice`: log the skipped records (one line per split) and the split sizes."""
    data = config.data
    counts: dict[str, Any] = {}
    splits = [("train", "train_path")] + ([("eval", "eval_path")] if data.get("eval_path")
                                           else [])
    items = {}
    for split, field in splits:
        skipped = Skipped()
        items[split], _ = load(_paths(data[field]), skipped)
        counts[split] = skipped.split_counts(len(items[split]))
        if notice and skipped.total:
            log.warning("config.data.%s: skipped %d of %d examples (%d too long, %d malformed): "
                        "%s", field, skipped.total, counts[split]["read"],
                        counts[split]["too_long"], counts[split]["malformed"], skipped.summary())
    train = items["train"]
    if "eval" in items:
        evaluation = items["eval"]
    else:
        fraction = data.get("eval_fraction", 0.0)
        held = lambda x: in_eval_split(getattr(x, "group", "") or x.id, fraction, config.seed)
        evaluation = [x for x in train if held(x)]
        train = [x for x in train if not held(x)]
    if not train:
        raise AlignDataError(f"config.data: no training examples left ({data.train_path})")
    counts["examples"] = {"train": len(train), "eval": len(evaluation)}
    if notice:  # once per run: the held-out scorers read the same data again quietly
        log.info("%d train / %d eval examples", len(train), len(evaluation))
    return train, evaluation, counts


def local_batch(config) -> int:
    return config.data.batch_size // jax.process_count()


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------

def sft_task(config: ml_collections.ConfigDict) -> Task:
    cfg, params = start_params(config)
    encoder, template, seq_len = formatting(config, cfg)
    train, evaluation, counts = read_splits(
        config, reader(sft.load_examples, encoder, template, seq_len))

    def make_loader(split):
        examples = train if split == "train" else evaluation
        if not examples:
            return None
        return sft.sft_loader(examples, seq_len=seq_len, batch_size=local_batch(config),
                              seed=config.seed, split=split)

    return Task(loss_fn=sft.sft_loss_fn(cfg, config.z_loss, config.logits_chunk),
                base_params=params, make_loader=make_loader, data_counts=counts)


# ---------------------------------------------------------------------------------------------
# Preference optimisation
# ---------------------------------------------------------------------------------------------

def _holds_pairs(paths: list[str]) -> bool:
    """Whether the first record of the first file is a pair (has 'chosen')."""
    with open(paths[0], encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        return "chosen" in json.loads(first)
    except json.JSONDecodeError:
        return False


def _heldout_pairs(config, pairs_loader) -> list:
    """KTO's held-out pairs: eval_path's, or the held-out fraction of train_path's; none when
    the data is unpaired only."""
    paths = _paths(config.data.get("eval_path") or config.data.train_path)
    if not paths or not _holds_pairs(paths):
        return []
    pairs, _ = pairs_loader(paths, Skipped())
    if config.data.get("eval_path"):
        return pairs
    return [x for x in pairs if in_eval_split(x.id, config.data.eval_fraction, config.seed)]


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def preference_task(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Task:
    """DPO / IPO / hinge / KTO (config.loss) with β = config.beta. config.reference: "live"
    (a frozen reference model beside the policy) or "precomputed" (log-probs computed once
    into config.reference_cache, default `<workdir>/reference_logps`, and reused)."""
    if config.loss not in LOSSES:
        raise TrainConfigError(f"config.loss={config.loss!r}; choose one of {LOSSES}")
    if config.reference not in ("live", "precomputed"):
        raise TrainConfigError(f"config.reference={config.reference!r}; choose 'live' or "
                               "'precomputed'")
    cfg, params = start_params(config)
    encoder, template, seq_len = formatting(config, cfg)
    pairs_loader = reader(preference.load_pairs, encoder, template, seq_len)
    if config.loss == "kto":  # unpaired training items; held-out pairs when there are any
        train_items, _, counts = read_splits(
            config, reader(preference.load_unpaired, encoder, template, seq_len))
        eval_pairs = _heldout_pairs(config, pairs_loader)
    else:
        train_items, eval_pairs, counts = read_splits(config, pairs_loader)
    train_rows = preference.item_rows(train_items, seq_len)
    eval_rows = preference.item_rows(eval_pairs, seq_len) if eval_pairs else None

    mesh = make_mesh(config.mesh.to_dict())
    rules = normalize_rules(config.rules)
    shardings = logical_shardings(param_axes(cfg), jax.eval_shape(lambda: params), mesh, rules)
    fn = preference.logps_fn(cfg, mesh, rules, config.logits_chunk)
    batch = config.data.batch_size

    train_ref = eval_ref = None
    if config.reference == "precomputed":
        path = config.get("reference_cache") or str(Path(workdir) / "reference_logps")
        ids = [f"train:{x.id}" for x in train_items] + [f"eval:{x.id}" for x in eval_pairs]
        cached = preference.load_reference_cache(path, ids)
        if cached is None:
            ref = jax.device_put(params, shardings)
            parts = [preference.all_logps(fn, ref, train_rows, batch, mesh, rules)]
            if eval_rows is not None:
                parts.append(preference.all_logps(fn, ref, eval_rows, batch, mesh, rules))
            cached = np.concatenate(parts)
            preference.save_reference_cache(path, ids, cached)
            log.info("reference log-probs of %d examples cached at %s.npy", len(ids), path)
            del ref
        train_ref, eval_ref = cached[:len(train_items)], cached[len(train_items):]
    elif eval_rows is not None:  # the held-out reference never changes: score it once
        eval_ref = preference.all_logps(fn, jax.device_put(params, shardings), eval_rows,
                                        batch, mesh, rules)

    def make_loader(split):
        if split == "train":
            return preference.preference_loader(train_rows, batch_size=local_batch(config),
                                                seed=config.seed, ref_logps=train_ref)
        if eval_rows is None or config.loss == "kto":  # KTO: held-out pair metrics only
            return None
        return preference.preference_loader(eval_rows, batch_size=local_batch(config),
                                            seed=config.seed, split="eval", ref_logps=eval_ref)

    def on_eval(step, policy, frozen=None):
        if eval_rows is None:
            return {}
        return preference.heldout_metrics(fn, policy, eval_rows, eval_ref, config.beta, batch,
                                          mesh, rules)

    loss_fn = preference.preference_loss_fn(
        cfg, config.loss, config.beta, config.label_smoothing, config.kto.desirable_weight,
        config.kto.undesirable_weight, config.logits_chunk)
    return Task(loss_fn=loss_fn, base_params=params, make_loader=make_loader, on_eval=on_eval,
                frozen_params=(None if config.reference != "live" else
                               params if lora_config_of(config) else _copy(params)),
                frozen_from_start={"": ""} if config.reference == "live" else None,
                data_counts=counts)


def heldout_pair_scorer(config: ml_collections.ConfigDict, cfg: ModelConfig
                        ) -> tuple[list[str], Callable[[Any], np.ndarray]]:
    """(ids, score): the held-out pairs of a preference config, tokenized and templated exactly
    as training sees them, and `score(params) -> logps[n, 2]`, the summed log p of their chosen
    and rejected responses (one compiled function for any number of models of shape `cfg`,
    e.g. before and after DPO)."""
    _, pairs, _ = read_splits(config, reader(preference.load_pairs, *formatting(config, cfg)),
                              notice=False)  # the training run reported its skipped pairs
    if not pairs:
        raise AlignDataError(f"config.data: no held-out pairs ({config.data.train_path}, "
                             f"eval_fraction={config.data.eval_fraction})")
    return [x.id for x in pairs], _rows_scorer(config, cfg,
                                               preference.item_rows(pairs, config.data.seq_len))


def _rows_scorer(config, cfg: ModelConfig, rows) -> Callable[[Any], np.ndarray]:
    """`score(params) -> logps[n, 2]` of prepared preference rows: one compiled function for
    any number of models of shape `cfg`, each placed on the config's mesh."""
    mesh = make_mesh(config.mesh.to_dict())
    rules = normalize_rules(config.rules)
    fn = preference.logps_fn(cfg, mesh, rules, config.logits_chunk)

    def score(params) -> np.ndarray:
        placed = jax.device_put(params, logical_shardings(
            param_axes(cfg), jax.eval_shape(lambda: params), mesh, rules))
        return preference.all_logps(fn, placed, rows, config.data.batch_size, mesh, rules)

    return score


def heldout_sft_scorer(config: ml_collections.ConfigDict, cfg: ModelConfig
                       ) -> tuple[list[str], Callable[[Any], tuple[np.ndarray, np.ndarray]]]:
    """(ids, score): the held-out examples of an SFT config (eval_path, or the hashed
    eval_fraction of train_path), templated and tokenized exactly as SFT training sees them,
    and `score(params) -> (nll[n], tokens[n])`: each example's summed negative log p of its
    response tokens (the tokens SFT's loss counts) and how many there are. One compiled
    function for any number of models of shape `cfg` (e.g. before and after SFT)."""
    _, examples, _ = read_splits(config, reader(sft.load_examples, *formatting(config, cfg)),
                                 notice=False)  # the training run reported its skipped ones
    if not examples:
        raise AlignDataError(f"config.data: no held-out examples ({config.data.train_path}, "
                             f"eval_fraction={config.data.get('eval_fraction')})")
    empty = (np.zeros(0, np.int32), np.zeros(0, np.int32))
    # One example per row as segment 1 (segment 2 empty): sequence_logps sums its masked tokens.
    logps = _rows_scorer(config, cfg, preference.item_rows(
        [preference.Item(x.id, (x.tokens, x.loss_mask), empty) for x in examples],
        config.data.seq_len))
    targets = np.array([int(np.asarray(x.loss_mask)[1:].sum()) for x in examples])

    def score(params) -> tuple[np.ndarray, np.ndarray]:
        return -logps(params)[:, 0], targets

    return [x.id for x in examples], score


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------

def reward_task(config: ml_collections.ConfigDict) -> Task:
    cfg, transformer = start_params(config)
    encoder, template, seq_len = formatting(config, cfg)
    train, evaluation, counts = read_splits(
        config, reader(preference.load_pairs, encoder, template, seq_len))
    train_rows = preference.item_rows(train, seq_len)
    eval_rows = preference.item_rows(evaluation, seq_len) if evaluation else None
    params = reward.init_reward_params(cfg, jax.random.fold_in(jax.random.key(config.seed), 2),
                                       transformer)
    mesh = make_mesh(config.mesh.to_dict())
    rules = normalize_rules(config.rules)
    loss_fn = reward.reward_loss_fn(cfg)

    def make_loader(split):
        rows = train_rows if split == "train" else eval_rows
        if rows is None:
            return None
        return preference.preference_loader(rows, batch_size=local_batch(config),
                                            seed=config.seed, split=split)

    accuracy_fn = None

    def on_eval(step, params, frozen=None):
        """Held-out pair accuracy (ties 1/2) over the whole eval split."""
        nonlocal accuracy_fn
        if eval_rows is None:
            return {}
        from hibari.train.sharding import global_batch, replicated, sharding_context
        if accuracy_fn is None:
            def f(p, b):
                with sharding_context(mesh, rules):
                    _, aux = loss_fn(p, b, None)
                return aux["accuracy"] * aux["weight"], aux["weight"]
            accuracy_fn = jax.jit(f, out_shardings=replicated(mesh))
        hits = total = 0.0
        for b in make_loader("eval"):
            a, w = accuracy_fn(params, global_batch(b, mesh, rules))
            hits, total = hits + float(a), total + float(w)
        return {"heldout_accuracy": hits / max(total, 1.0)}

    return Task(loss_fn=loss_fn, base_params=params, param_axes=reward.reward_param_axes(cfg),
                make_loader=make_loader, on_eval=on_eval, data_counts=counts,
                transformers={"transformer": cfg})

"""Preference optimisation (DPO / IPO / hinge / KTO): data, sequence log-probs, loss, eval.

Records (JSONL):
  pairs     {id?, prompt, chosen, rejected}
  unpaired  {id?, prompt, completion, label}  (KTO; label true = desirable)
`prompt` is a string (the instruction), a dict {instruction, input?} (instruction template) or
a list of chat messages (chat template; responses become assistant turns).

One row per example holds two sequences packed with different segment ids, so one forward pass
scores both: pairs [prompt+chosen (1)][prompt+rejected (2)]; unpaired [prompt+completion (1)]
[prompt+completion of the next example (2)], the mismatched sequence whose log-ratio estimates
KTO's KL reference point z0 (the partner is fixed by dataset order, so it can be cached too).
Sequence log-probs are summed over response tokens only (`loss_mask`), giving logps[b, 2].

Reference log-probs come from a frozen reference model held sharded beside the policy
(Task.frozen_params), or are precomputed once into a cache (`<path>.npy` [n, 2] + `<path>.json`
with the example ids) and fed in the batch as `ref_logps[b, 2]`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hibari.align.data import AlignDataError, RowLoader, SegmentEncoder, Skipped, read_records
from hibari.align.losses import LOSSES, kto_loss, pair_loss
from hibari.align.templates import (
    TEMPLATES,
    ChatTemplate,
    Segment,
    TemplateError,
    as_chat,
    get_template,
    required_text,
)
from hibari.model import ModelConfig, hidden
from hibari.model.logprobs import chunked_log_probs, next_token_targets
from hibari.train.sharding import global_batch, replicated, sharding_context

log = logging.getLogger(__name__)

ROW_FIELDS = ("tokens", "segment_ids", "loss_mask")


class Item(NamedTuple):
    """A tokenized row: two sequences (tokens, loss_mask) and, for KTO, the label."""
    id: str
    first: tuple[np.ndarray, np.ndarray]
    second: tuple[np.ndarray, np.ndarray]
    label: int = 1
    group: str = ""  # the train/eval split key when not the id (a KTO item -> its pair's id)


# ---------------------------------------------------------------------------------------------
# Records -> tokens
# ---------------------------------------------------------------------------------------------

def prompt_segments(prompt: Any, template) -> tuple[list[Segment], bool]:
    """(segments, is_chat) of a prompt given as a string, {instruction, input} or messages."""
    if isinstance(prompt, list):
        return TEMPLATES["chat"].prompt({"messages": prompt}), True
    if isinstance(prompt, str):
        prompt = {"instruction": prompt}
    if not isinstance(prompt, Mapping):
        raise TemplateError("field 'prompt' must be a string, {instruction, input} or messages, "
                            f"got {type(prompt).__name__}")
    if isinstance(template, ChatTemplate):
        return template.prompt(as_chat(prompt, with_output=False)), True
    return template.prompt(prompt), False


def encode_sequence(encoder: SegmentEncoder, prompt: list[Segment], response: str,
                    chat: bool) -> tuple[np.ndarray, np.ndarray]:
    text = TEMPLATES["chat"].wrap_response(response) if chat else response
    return encoder.encode(prompt + [Segment(text, True)])


def tokenize_pair(record: Mapping[str, Any], encoder: SegmentEncoder, template,
                  seq_len: int) -> Item:
    if "prompt" not in record:
        raise TemplateError("field 'prompt' is missing")
    prompt, chat = prompt_segments(record["prompt"], template)
    chosen = encode_sequence(encoder, prompt, required_text(record, "chosen"), chat)
    rejected = encode_sequence(encoder, prompt, required_text(record, "rejected"), chat)
    _check_length(len(chosen[0]) + len(rejected[0]), seq_len)
    return Item(str(record.get("id")), chosen, rejected)


def _check_length(n: int, seq_len: int) -> None:
    if n > seq_len:
        raise AlignDataError(f"over-long example (both sequences > seq_len={seq_len} "
                             "tokens)")


def _label(record: Mapping[str, Any]) -> int:
    label = record.get("label")
    if isinstance(label, bool) or label in (0, 1):
        return int(label)
    raise TemplateError(f"field 'label' must be true/false, got {label!r}")


def tokenize_unpaired(records: Sequence[Mapping[str, Any]], encoder: SegmentEncoder, template,
                      seq_len: int, skipped: Skipped) -> list[Item]:
    """KTO items; item i's second sequence is prompt i + the completion of item
    (i + n // 2) % n (far in file order, so not the same prompt's other response)."""
    parsed = []
    for where, record in records:
        try:
            if "prompt" not in record:
                raise TemplateError("field 'prompt' is missing")
            prompt, chat = prompt_segments(record["prompt"], template)
            parsed.append((str(record.get("id")), prompt, chat,
                           required_text(record, "completion"), _label(record), where,
                           str(record.get("group", ""))))
        except TemplateError as e:
            skipped.add(str(e), where)
    items = []
    for i, (id_, prompt, chat, completion, label, where, group) in enumerate(parsed):
        mismatched = parsed[(i + max(len(parsed) // 2, 1)) % len(parsed)][3]
        own = encode_sequence(encoder, prompt, completion, chat)
        kl = encode_sequence(encoder, prompt, mismatched, chat)
        try:
            _check_length(len(own[0]) + len(kl[0]), seq_len)
        except AlignDataError as e:
            skipped.add(str(e), where)
            continue
        items.append(Item(id_, own, kl, label, group))
    return items


def load_pairs(paths, encoder: SegmentEncoder, template, seq_len: int,
               skipped: Skipped | None = None) -> tuple[list[Item], Skipped]:
    template = get_template(template) if isinstance(template, (str, Mapping)) else template
    return read_records(paths, lambda r: tokenize_pair(r, encoder, template, seq_len), skipped)


def load_unpaired(paths, encoder: SegmentEncoder, template, seq_len: int,
                  skipped: Skipped | None = None) -> tuple[list[Item], Skipped]:
    """KTO items from unpaired records, or from pair records (chosen -> desirable,
    rejected -> undesirable)."""
    template = get_template(template) if isinstance(template, (str, Mapping)) else template
    records, skipped = read_records(paths, lambda r: r, skipped)
    flat = []
    for r in records:
        where = str(r.get("id"))
        if "completion" in r or "chosen" not in r:
            flat.append((where, r))
        else:
            for key, label in (("chosen", True), ("rejected", False)):
                flat.append((where, {"id": f"{r.get('id')}/{key}", "prompt": r.get("prompt"),
                                     "completion": r.get(key), "label": label,
                                     "group": str(r.get("id"))}))
    items = tokenize_unpaired(flat, encoder, template, seq_len, skipped)
    if not items:
        raise AlignDataError(f"{paths}: no usable unpaired records ({skipped.summary()})")
    return items, skipped


def item_rows(items: Sequence[Item], seq_len: int) -> dict[str, np.ndarray]:
    """Rows in item order: tokens/segment_ids/loss_mask [n, seq_len], label/index [n, 1]."""
    rows = {k: np.zeros((len(items), seq_len), np.int32) for k in ROW_FIELDS}
    for r, item in enumerate(items):
        fill = 0
        for seg, (tokens, mask) in enumerate((item.first, item.second), 1):
            end = fill + len(tokens)
            rows["tokens"][r, fill:end], rows["loss_mask"][r, fill:end] = tokens, mask
            rows["segment_ids"][r, fill:end] = seg
            fill = end
    rows["label"] = np.array([[i.label] for i in items], np.int32)
    rows["index"] = np.arange(len(items), dtype=np.int32)[:, None]
    return rows


def preference_loader(rows: dict[str, np.ndarray], *, batch_size: int, seed: int,
                      split: str = "train", ref_logps: np.ndarray | None = None,
                      shard_index: int | None = None, shard_count: int | None = None
                      ) -> RowLoader:
    """Host-local batches of `item_rows` (plus `ref_logps[b, 2]` from a cache) or of any rows
    dict (RL's prompt rows), reshuffled per epoch from (seed, epoch) for train, one ordered
    pass for eval."""
    rows = dict(rows)
    if ref_logps is not None:
        rows["ref_logps"] = np.asarray(ref_logps, np.float32)
    n = len(rows["tokens"])

    def make_rows(epoch: int) -> dict[str, np.ndarray]:
        if split != "train":
            return rows
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        return {k: v[perm] for k, v in rows.items()}

    return RowLoader(make_rows, batch_size=batch_size, shard_index=shard_index,
                     shard_count=shard_count, epochs=None if split == "train" else 1)


# ---------------------------------------------------------------------------------------------
# Log-probs and the loss
# ---------------------------------------------------------------------------------------------

def sequence_logps(cfg: ModelConfig, params, batch: Mapping[str, jax.Array],
                   logits_chunk: int = 0) -> jax.Array:
    """logps[b, 2]: log p of the response tokens of segments 1 and 2 of each row, summed."""
    h = hidden(cfg, params, batch["tokens"], batch["segment_ids"], batch.get("positions"))
    targets, weights = next_token_targets(batch)
    log_p, _ = chunked_log_probs(cfg, params, h, targets, logits_chunk)
    seg = batch["segment_ids"]
    return jnp.stack([(log_p * weights * (seg == k)).sum(-1) for k in (1, 2)], axis=-1)


def _mean(x, valid):
    return (x * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def pair_metrics(policy: jax.Array, ref: jax.Array, beta: float, valid: jax.Array) -> dict:
    """Implicit rewards beta * log(pi / ref) of chosen (column 0) and rejected (column 1),
    their margin, preference accuracy (ties count 1/2) and the mean log-ratio on the data's
    responses (`kl_ref_estimate`: a KL(pi || ref) estimate when responses are sampled from pi;
    on offline data a proxy of drift from the reference)."""
    rewards = beta * (policy - ref)
    margin = rewards[:, 0] - rewards[:, 1]
    accuracy = (margin > 0).astype(jnp.float32) + 0.5 * (margin == 0).astype(jnp.float32)
    return {"reward_chosen": _mean(rewards[:, 0], valid),
            "reward_rejected": _mean(rewards[:, 1], valid),
            "reward_margin": _mean(margin, valid), "accuracy": _mean(accuracy, valid),
            "kl_ref_estimate": _mean((policy - ref).mean(-1), valid),
            "logps_chosen": _mean(policy[:, 0], valid),
            "logps_rejected": _mean(policy[:, 1], valid)}


def preference_loss_fn(cfg: ModelConfig, loss: str = "dpo", beta: float = 0.1,
                       label_smoothing: float = 0.0, desirable_weight: float = 1.0,
                       undesirable_weight: float = 1.0, logits_chunk: int = 0):
    """loss_fn(params, batch, rng, frozen=None) -> (mean loss over rows, aux).

    Reference log-probs: batch["ref_logps"] when present (precomputed cache), else the frozen
    reference params. aux["weight"] = number of non-empty rows (pairs / KTO examples)."""
    if loss not in LOSSES:
        raise ValueError(f"config.loss={loss!r}; choose one of {LOSSES}")

    def loss_fn(params, batch, rng, frozen=None):
        del rng
        policy = sequence_logps(cfg, params, batch, logits_chunk)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].astype(jnp.float32)
        elif frozen is not None:
            ref = sequence_logps(cfg, frozen, batch, logits_chunk)
        else:
            raise ValueError("no reference log-probs: give frozen reference params or a "
                             "batch['ref_logps'] from a reference cache")
        ref = jax.lax.stop_gradient(ref)
        valid = (batch["segment_ids"][:, 0] > 0).astype(jnp.float32)
        if loss == "kto":
            desirable = batch["label"][:, 0] > 0
            z0 = jnp.maximum(_mean(policy[:, 1] - ref[:, 1], valid), 0.0)
            per = kto_loss(policy[:, 0], ref[:, 0], desirable, beta, z0, desirable_weight,
                           undesirable_weight)
            r = beta * (policy[:, 0] - ref[:, 0])
            d = desirable.astype(jnp.float32) * valid
            u = (1.0 - desirable.astype(jnp.float32)) * valid
            aux = {"reward_desirable": _mean(r, d), "reward_undesirable": _mean(r, u),
                   "kl_ref_estimate": z0}
        else:
            per = pair_loss(loss, policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta,
                            label_smoothing)
            aux = pair_metrics(policy, ref, beta, valid)
        aux["weight"] = valid.sum()
        return _mean(per, valid), aux

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Batched scoring on the mesh, the reference cache, held-out accuracy
# ---------------------------------------------------------------------------------------------

def logps_fn(cfg: ModelConfig, mesh, rules, logits_chunk: int = 0):
    """Jitted (params, global batch) -> logps[b, 2], replicated."""
    def f(params, batch):
        with sharding_context(mesh, rules):
            return sequence_logps(cfg, params, batch, logits_chunk)
    return jax.jit(f, out_shardings=replicated(mesh))


def all_logps(fn, params, rows: dict[str, np.ndarray], batch_size: int, mesh, rules
              ) -> np.ndarray:
    """logps[n, 2] of every row (in order), `batch_size` rows (global) at a time."""
    n = len(rows["tokens"])
    local = batch_size // jax.process_count()
    loader = preference_loader({k: rows[k] for k in ROW_FIELDS + ("label", "index")},
                               batch_size=local, seed=0, split="eval")
    out = [np.asarray(fn(params, global_batch(b, mesh, rules))) for b in loader]
    return np.concatenate(out)[:n]


def save_reference_cache(path: str, ids: Sequence[str], logps: np.ndarray) -> None:
    """`path.npy` float32 [n, 2] and `path.json` {ids} (process 0 writes; atomic renames)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path + ".npy.tmp", "wb") as f:
        np.save(f, np.asarray(logps, np.float32))
    with open(path + ".json.tmp", "w") as f:
        json.dump({"ids": list(ids), "columns": ["first", "second"]}, f)
    os.replace(path + ".npy.tmp", path + ".npy")
    os.replace(path + ".json.tmp", path + ".json")


def load_reference_cache(path: str, ids: Sequence[str]) -> np.ndarray | None:
    """logps[n, 2] in the order of `ids`, or None when there is no cache yet."""
    if not (os.path.exists(path + ".npy") and os.path.exists(path + ".json")):
        return None
    logps = np.load(path + ".npy")
    with open(path + ".json") as f:
        cached = {i: r for r, i in enumerate(json.load(f)["ids"])}
    missing = [i for i in ids if i not in cached]
    if missing or len(cached) != len(logps):
        raise AlignDataError(f"{path}.npy/.json: the reference cache lacks {len(missing)} of "
                             f"the data's example ids (e.g. {missing[:3]}); it was built for "
                             "other data: delete both files to recompute")
    return logps[[cached[i] for i in ids]]


def heldout_metrics(fn, params, rows, ref_logps: np.ndarray, beta: float, batch_size: int,
                    mesh, rules) -> dict[str, float]:
    """Held-out preference accuracy, margin and rewards of the policy `params` on pair rows."""
    policy = all_logps(fn, params, rows, batch_size, mesh, rules)
    m = pair_metrics(jnp.asarray(policy), jnp.asarray(ref_logps), beta,
                     jnp.ones(len(policy), jnp.float32))
    keep = ("accuracy", "reward_margin", "reward_chosen", "reward_rejected")
    return {f"heldout_{k}": float(m[k]) for k in keep}

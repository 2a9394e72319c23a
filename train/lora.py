"""Training with LoRA: `config.lora.enabled` turns any run's Task into one that trains adapters
on a frozen base (pretraining from config.init_from, SFT, DPO/IPO/KTO, reward models,
classifiers, PPO/GRPO).

    config.lora = {enabled, rank, alpha, dropout, targets, init}    # configs/base.py lora_config
    task = lora_task(task, config, cfg)                              # hibari.train.loop.build does it

The state's `params` are the task's parameter tree with each adapted Transformer (the task's
`transformers`: path -> ModelConfig, default the whole tree) replaced by its adapters
(`hibari.model.lora.lora_params`); everything else of the tree (a reward head, a value head,
a critic) stays trainable as it was. The optimizer, its state and the gradients cover exactly
those leaves. The base Transformers are held once, sharded by their logical axes, in the state's
`frozen` ({"base": {path: params}, "task": the task's own frozen tree}); a frozen entry of the
task that is its starting point (`Task.frozen_from_start`: DPO's reference, RL's reference
policy) is the base itself, not a copy. The loss runs the model on the base with the adapters
attached (`hibari.model.lora.attach`: the adapter forward, no merged copy of any kernel), with
LoRA dropout while training and none in evaluation; `on_eval` hooks receive merged parameters.

Checkpoints hold the trainable tree only; `lora.json` in the workdir names each base, so
`load_params(RUN)` (and every command built on it) reads a LoRA run as its merged model and
`hibari lora export --checkpoint RUN` writes PEFT files from it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from hibari.model import ModelConfig, param_axes
from hibari.model.lora import (
    LoraConfig,
    LoraConfigError,
    apply_lora,
    attach,
    lora_axes,
    lora_config_from_dict,
    lora_params,
    replace_subtree,
    subtree,
)

DROPOUT_STREAM = 0x10A  # folded into a step's key for the adapters' dropout masks


def lora_config_of(config) -> LoraConfig | None:
    """The run's LoraConfig (None when config.lora is absent or not enabled); bad fields raise
    a one-line error naming config.lora.<field>."""
    section = config.get("lora")
    if section is None or not section.get("enabled", False):
        return None
    fields = {k: v for k, v in section.to_dict().items() if k != "enabled"}
    return lora_config_from_dict(fields, where="config.lora")


@dataclasses.dataclass(frozen=True)
class LoraView:
    """How a task's parameter tree maps to a LoRA run's trainable and frozen trees. Hashable
    (part of compiled functions' static specs, e.g. RL's)."""

    lora_cfg: LoraConfig
    models: tuple[tuple[str, ModelConfig], ...]  # (path, cfg) of each adapted Transformer
    start_refs: tuple[tuple[str, str], ...] = ()  # (task frozen path, adapted path) pairs

    def trainable(self, params, key: jax.Array):
        """The task's `params` with each adapted Transformer replaced by fresh adapters."""
        for i, (path, cfg) in enumerate(self.models):
            params = replace_subtree(params, path,
                                     lora_params(cfg, self.lora_cfg, jax.random.fold_in(key, i)))
        return params

    def frozen(self, params, task_frozen):
        """{"base": {path: base Transformer}, "task": task_frozen less its start refs}."""
        out = {"base": {path: subtree(params, path) for path, _ in self.models}}
        rest = self._without_start_refs(task_frozen)
        if rest is not None:
            out["task"] = rest
        return out

    def _without_start_refs(self, tree):
        if tree is None or any(ref == "" for ref, _ in self.start_refs):
            return None
        return {k: v for k, v in tree.items() if k not in {ref for ref, _ in self.start_refs}}

    def task_frozen(self, frozen):
        """The frozen tree the task's own functions expect (start refs are the bases)."""
        bases = frozen["base"]
        for ref, path in self.start_refs:
            if ref == "":
                return bases[path]
        out = dict(frozen.get("task") or {})
        for ref, path in self.start_refs:
            out[ref] = bases[path]
        return out if (out or "task" in frozen) else None

    def params(self, trainable, frozen, rng: jax.Array | None = None):
        """The task's parameter tree as its loss sees it: each base with its adapters attached
        (LoRA dropout when `rng` is given)."""
        for i, (path, _) in enumerate(self.models):
            key = None if rng is None else jax.random.fold_in(rng, i)
            trainable = replace_subtree(trainable, path, attach(
                frozen["base"][path], subtree(trainable, path), self.lora_cfg, key))
        return trainable

    def merged(self, trainable, frozen):
        """The task's parameter tree with the adapters folded into the kernels."""
        for path, _ in self.models:
            trainable = replace_subtree(trainable, path, apply_lora(
                frozen["base"][path], subtree(trainable, path), self.lora_cfg))
        return trainable

    def axes(self, task_axes):
        for path, cfg in self.models:
            task_axes = replace_subtree(task_axes, path, lora_axes(cfg, self.lora_cfg))
        return task_axes

    def frozen_axes(self, task_frozen_axes):
        out = {"base": {path: param_axes(cfg) for path, cfg in self.models}}
        rest = self._without_start_refs(task_frozen_axes)
        if rest is not None:
            out["task"] = rest
        return out


def lora_task(task, config, cfg: ModelConfig):
    """`task` training LoRA adapters when config.lora.enabled (else `task` itself). The task
    must start from loaded parameters (config.init_from); its loss, evaluation loss and
    on_eval are wrapped; a task with its own step (RL) reads `Task.lora` itself. `task` is a
    hibari.train.loop.Task (which imports this module). Config errors are LoraConfigError."""
    lora_cfg = lora_config_of(config)
    if lora_cfg is None or task.lora is not None:
        return task
    if task.base_params is None or not (config.get("init_from") or task.lora_bases):
        raise LoraConfigError("config.lora.enabled: LoRA trains adapters on a frozen base "
                               "model; set --config.init_from=CKPT (a run, params export or "
                               "HF directory)")
    models = tuple((task.transformers or {"": cfg}).items())
    try:
        for _, model in models:
            lora_axes(model, lora_cfg)  # e.g. a gate target on a model without a gated MLP
    except LoraConfigError as e:
        raise LoraConfigError(str(e).replace("lora.", "config.lora.", 1)) from None
    start_refs = task.frozen_from_start if task.frozen_params is not None else None
    view = LoraView(lora_cfg, models, tuple((start_refs or {}).items()))
    key = jax.random.fold_in(jax.random.key(config.seed), 5)
    task_axes = task.param_axes or param_axes(cfg)
    frozen_axes = task.frozen_axes
    if task.frozen_params is not None and frozen_axes is None:
        frozen_axes = param_axes(cfg)
    out = dataclasses.replace(
        task, base_params=view.trainable(task.base_params, key), init_params=None,
        param_axes=view.axes(task_axes),
        frozen_params=view.frozen(task.base_params, task.frozen_params),
        frozen_axes=view.frozen_axes(frozen_axes), lora=view,
        export_params=view.merged)
    if task.make_step is not None:
        return out
    out.loss_fn = _wrap_loss(task.loss_fn, view, train=True)
    out.eval_loss_fn = _wrap_loss(task.eval_loss_fn or task.loss_fn, view, train=False)
    if task.on_eval is not None:
        def on_eval(step, trainable, frozen=None):
            return task.on_eval(step, view.merged(trainable, frozen), view.task_frozen(frozen))
        out.on_eval = on_eval
    return out


def _wrap_loss(loss_fn, view: LoraView, train: bool):
    def lora_loss(trainable, batch, rng, frozen):
        drop = jax.random.fold_in(rng, DROPOUT_STREAM) if train else None
        params = view.params(trainable, frozen, drop)
        task_frozen = view.task_frozen(frozen)
        if task_frozen is None:
            return loss_fn(params, batch, rng)
        return loss_fn(params, batch, rng, frozen=task_frozen)
    return lora_loss


def bases_record(task, config) -> dict[str, tuple[str, Any]]:
    """path -> (base checkpoint, cfg) for `hibari.model.lora.write_lora_record`."""
    paths = task.lora_bases or {}
    return {path: (paths.get(path) or config.init_from, cfg) for path, cfg in task.lora.models}


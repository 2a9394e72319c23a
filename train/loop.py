"""The training loop: build everything from a config, resume, step, log, evaluate, checkpoint.

    summary = train(config, workdir)                 # pretraining (next-token loss)
    summary = train(config, workdir, Task(loss_fn=...))  # SFT / DPO / reward models

A run restarted with the same command resumes from its latest checkpoint (parameters, optimizer
state, step, RNG and the loader position) and reproduces the uninterrupted run's losses.
SIGTERM / SIGINT once training has started save a checkpoint at the current step and return
normally (exit code 0); before that they interrupt (KeyboardInterrupt: `hibari` exits 130).

Nothing lost, nothing silently wrong: the config is validated before anything is written; the
workdir is locked (hibari.base.runlock) for the whole run, so a second run on it fails naming the
first; a step whose update is not finite is never applied (the step's `finite` flag also covers
the updated parameters and optimizer state) and so never saved; checkpoints carry per-array
checksums and a resume falls back past a damaged newest step (train/checkpoint.py);
metrics.jsonl is cut back to the restored step, so each step appears once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from hibari.base.errors import UserError
from hibari.base.files import write_atomic
from hibari.base.progress import progress_bar
from hibari.base.runlock import DirLock
from hibari.model import ModelConfig, flops_per_token, init, param_axes
from hibari.model.params_io import write_lora_record
from hibari.train.checkpoint import Checkpointer
from hibari.train.lora import bases_record, lora_task
from hibari.train.losses import lm_loss_fn
from hibari.train.metrics import MetricsWriter, mfu
from hibari.train.optim import make_optimizer
from hibari.train.sharding import (
    batch_divisor,
    global_batch,
    logical_shardings,
    make_mesh,
    normalize_rules,
)
from hibari.train.step import create_state, make_eval_step, make_train_step, state_shardings
from hibari.train.synthetic import SyntheticTokens

if TYPE_CHECKING:  # grain is imported only when packed data is read
    from hibari.data.loader import Loader

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")
NAN_MAX_SKIPS = 10  # default of config.nan_max_skips: consecutive skipped steps that stop a run
# Steps dispatched ahead of the host. Enough to keep an accelerator busy; unbounded queues of
# collectives stall XLA:CPU's simulated devices.
MAX_IN_FLIGHT = 4
DATA_KINDS = ("synthetic", "packed")


class TrainConfigError(UserError, ValueError):
    """The training config is invalid; the message names the field."""


class NonFiniteError(UserError, RuntimeError):
    """Non-finite steps: one under nan_policy="stop", or too many in a row under "skip"."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_dict(config.model.to_dict(), where="config.model")


def validate_config(config: ml_collections.ConfigDict, own_data: bool = False) -> ModelConfig:
    """Check the fields the loop relies on before anything is compiled or written
    (`own_data`: a Task supplies the loaders, so config.data.kind/path are its business)."""
    for name in ("steps", "log_every", "eval_batches", "keep_checkpoints", "grad_accum",
                 "data.batch_size", "data.seq_len", "nan_max_skips"):
        value = _field(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TrainConfigError(f"config.{name} must be a positive integer, got {value!r}")
    for name in ("checkpoint_every", "eval_every"):
        value = config.get(name)
        if not isinstance(value, int) or value < 0:
            raise TrainConfigError(f"config.{name} must be an integer >= 0 (0 = never), "
                                   f"got {value!r}")
    if config.nan_policy not in NAN_POLICIES:
        raise TrainConfigError(f"config.nan_policy={config.nan_policy!r}; choose {NAN_POLICIES}")
    if not own_data and config.data.kind not in DATA_KINDS:
        raise TrainConfigError(f"config.data.kind={config.data.kind!r}; choose {DATA_KINDS}")
    if not own_data and config.data.kind == "packed" and not config.data.path:
        raise TrainConfigError("config.data.path must name packed token shards (the output of "
                               "`hibari data pack`) when config.data.kind='packed'")
    cfg = model_config(config)
    if not own_data and config.data.kind == "packed":
        _validate_packed(config.data, cfg.vocab_size)
    if config.data.seq_len > cfg.max_seq_len:
        raise TrainConfigError(f"config.data.seq_len={config.data.seq_len} exceeds "
                               f"config.model.max_seq_len={cfg.max_seq_len}")
    if config.data.batch_size % (jax.process_count() * config.grad_accum):
        raise TrainConfigError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by the "
            f"process count ({jax.process_count()}) x config.grad_accum ({config.grad_accum})")
    return cfg


def _field(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    if node is None and dotted == "nan_max_skips":  # configs written before the field existed
        return NAN_MAX_SKIPS
    return node


def _validate_packed(data: ml_collections.ConfigDict, vocab_size: int) -> None:
    """The packed shards (train and eval) must match config.data.seq_len, fit the model's
    vocabulary and name the sources that config.data.weights mixes."""
    from hibari.data.loader import packed_info
    paths = {"path": data.path, **({"eval_path": data.eval_path} if data.eval_path else {})}
    weights = data.weights.to_dict() if hasattr(data.weights, "to_dict") else dict(data.weights or {})
    shas = set()
    for field, path in paths.items():
        try:
            info = packed_info(path)
        except (OSError, ValueError) as e:
            raise TrainConfigError(f"config.data.{field}={path!r}: {e}") from None
        shas.add(info["tokenizer_sha256"])
        if len(shas) > 1:
            raise TrainConfigError(f"config.data.eval_path={path!r} was packed with another tokenizer "
                                   f"than config.data.path={data.path!r}: pack both with one tokenizer")
        if info["seq_len"] != data.seq_len:
            raise TrainConfigError(
                f"config.data.seq_len={data.seq_len} but config.data.{field}={path!r} was packed with "
                f"seq_len={info['seq_len']}: set --config.data.seq_len={info['seq_len']} or repack")
        if info["vocab_size"] > vocab_size:
            raise TrainConfigError(
                f"config.model.vocab_size={vocab_size} is smaller than the tokenizer of "
                f"config.data.{field}={path!r} ({info['vocab_size']} pieces): set "
                f"--config.model.vocab_size={info['vocab_size']} (or larger)")
        unknown = sorted(set(weights) - set(info["sources"]))
        if unknown:
            raise TrainConfigError(f"config.data.weights names {unknown}, not sources of "
                                   f"config.data.{field}={path!r} ({sorted(info['sources'])})")


def packed_data_overrides(prepared_dir: str, prepare_flags: str = "") -> dict:
    """Overrides that train on `hibari data prepare` output: packed/ rows, packed-heldout/ for
    eval, and the seq_len and vocabulary they were packed with (`prepare_flags`: what the error
    message's prepare command adds, e.g. "--vocab-size 1024")."""
    from hibari.data.loader import packed_info
    train_dir = os.path.join(prepared_dir, "packed")
    eval_dir = os.path.join(prepared_dir, "packed-heldout")
    for path in (train_dir, eval_dir):
        if not os.path.exists(os.path.join(path, "manifest.json")):
            command = f"hibari data prepare --config configs/data/quickstart.py:{prepared_dir}"
            raise TrainConfigError(
                f"{path}: no packed shards; make them with `{command}"
                f"{prepare_flags and ' ' + prepare_flags}` (a few minutes on a CPU) or pass "
                "':synthetic' to train on the synthetic source")
    info = packed_info(train_dir)
    return {"data": {"kind": "packed", "path": train_dir, "eval_path": eval_dir,
                     "seq_len": info["seq_len"]},
            "model": {"vocab_size": info["vocab_size"], "max_seq_len": info["seq_len"]}}


def start_from_checkpoint(config: ml_collections.ConfigDict, task: Task) -> Task:
    """Continued pretraining: a task that brings no parameters of its own starts from
    config.init_from (any checkpoint `load_params` reads) when it is set; config.model becomes
    the checkpoint's and its recorded tokenizer must be the data's."""
    init_from = config.get("init_from")
    if not init_from or task.base_params is not None or task.init_params is not None \
            or task.make_step is not None:
        return task
    from hibari.data.tokenizer import check_data_tokenizer
    from hibari.model.params_io import load_params
    check_data_tokenizer(config, init_from, label=f"config.init_from={init_from}",
                         fix="continue pretraining on data encoded with its tokenizer, or pass "
                             "--allow-tokenizer-mismatch",
                         allow=bool(config.get("allow_tokenizer_mismatch", False)))
    cfg, params = load_params(init_from)
    with config.unlocked():
        config.model = ml_collections.ConfigDict(cfg.to_dict())
    return dataclasses.replace(task, base_params=params)


def _check_resumable(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """A workdir's saved model config, and its LoRA config when either run uses LoRA, must
    equal the new one (other fields may change)."""
    path = workdir / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    for section in ("model", "lora"):
        old, new = saved.get(section) or {}, config.get(section)
        new = new.to_dict() if new is not None else {}
        if section == "lora" and not (old.get("enabled") or new.get("enabled")):
            continue
        new = {k: list(v) if isinstance(v, tuple) else v for k, v in new.items()}
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise TrainConfigError(
                f"{path}: this workdir was trained with a different {section} config (fields "
                f"{changed}: {[(old.get(k), new.get(k)) for k in changed]}); use a new "
                "--workdir or the old config")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def make_loader(config: ml_collections.ConfigDict, split: str = "train") -> Loader | None:
    """This host's loader for `split` (None: no eval data)."""
    data = config.data
    local_batch = data.batch_size // jax.process_count()
    common = dict(batch_size=local_batch, seq_len=data.seq_len, seed=config.seed,
                  shard_index=jax.process_index(), shard_count=jax.process_count())
    if data.kind == "synthetic":
        return SyntheticTokens(vocab_size=config.model.vocab_size, split=split, **common)
    from hibari.data.loader import PackedLoader
    path = data.path if split == "train" else (data.eval_path or None)
    if path is None:
        return None
    weights = data.weights.to_dict() if hasattr(data.weights, "to_dict") else data.weights
    return PackedLoader(path, weights=weights or None, worker_count=data.worker_count,
                        num_epochs=None if split == "train" else 1, **common)


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------

class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
            if getattr(self._old[signal.SIGINT], "received", False):
                # Ctrl-C came before the loop and its KeyboardInterrupt was swallowed on the
                # way (hibari.base.signals): stop now, before the first step
                self.__exit__()
                raise KeyboardInterrupt
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def should_stop(self) -> bool:
        flag = self.received is not None
        if jax.process_count() > 1:  # every host must stop at the same step
            from jax.experimental import multihost_utils
            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    """What a run optimises and on which data; the defaults are pretraining's.

    loss_fn(params, batch, rng) -> (loss, aux), or (params, batch, rng, frozen) when
    `frozen_params` is given (e.g. DPO's reference model, held sharded and never updated).

    A task whose step is more than one gradient step on a loss (RL: sample, score, several
    minibatch updates) gives `make_step(optimizer=, schedule=, mesh=, rules=,
    state_shardings=, lora=) -> step_fn(state, batch) -> (state, metrics)` instead (lora: the
    LoraView under config.lora, else None); metrics must hold "loss" and "finite" like the
    generic step's. `updates_per_step` sizes the learning-rate
    schedule (optimizer updates per loop step) and `init_extra` makes the state's `extra`
    (checkpointed with it).
    """
    loss_fn: Callable | None = None
    init_params: Callable[[], Any] | None = None  # traceable fresh initialisation
    base_params: Any = None  # loaded parameters to start from (fine-tuning)
    param_axes: Any = None  # logical PartitionSpecs when params are not a plain Transformer
    frozen_params: Any = None
    frozen_axes: Any = None  # logical PartitionSpecs of frozen_params (default: a Transformer)
    make_loader: Callable[[str], Loader | None] | None = None  # split ("train" / "eval") -> loader
    on_eval: Callable[..., dict] | None = None  # (step, params, frozen) -> extra metrics
    make_step: Callable[..., Callable] | None = None
    updates_per_step: int = 1
    init_extra: Callable[[], Any] | None = None
    tokens_per_step: int | None = None  # for tokens_per_s (default: batch_size x seq_len)
    data_counts: dict | None = None  # records read / kept / dropped per split (summary, json)
    eval_loss_fn: Callable | None = None  # the held-out loss when it differs (default loss_fn)
    # LoRA (config.lora, hibari.train.lora): the Transformers of the parameter tree to adapt
    # (path -> ModelConfig; default: the whole tree is one), frozen entries that are the
    # starting point of an adapted path (frozen path -> params path, "" = the whole tree; they
    # become the base itself), and each path's base checkpoint (default config.init_from)
    transformers: dict | None = None
    frozen_from_start: dict | None = None
    lora_bases: dict | None = None
    lora: Any = None  # the LoraView once the task trains adapters
    export_params: Callable | None = None  # (params, frozen) -> the summary's full params


@dataclasses.dataclass
class Run:
    """Everything built from a config, ready to step (also used by tests and benchmarks)."""
    config: ml_collections.ConfigDict
    model: ModelConfig
    task: Task
    mesh: Any
    rules: Any
    state: Any
    step_fn: Callable
    eval_fn: Callable
    param_shardings: Any
    state_shardings: Any
    abstract_state: Any
    checkpointer: Checkpointer | None
    loader: Loader | None

    def make_loader(self, split: str) -> Loader | None:
        if self.task.make_loader is not None:
            return self.task.make_loader(split)
        return make_loader(self.config, split)


def _place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def build(config: ml_collections.ConfigDict, workdir: str | Path | None,
          task: Task | None = None, devices=None, abstract: bool = False) -> Run:
    """Validate, build mesh/shardings/optimizer/step, and restore or initialise the state.

    `devices` (default: all) restricts the mesh, e.g. to compare 1 and 8 devices;
    `abstract=True` leaves the state as ShapeDtypeStructs (compile without allocating)."""
    task = start_from_checkpoint(config, task or Task())
    cfg = validate_config(config, own_data=task.make_loader is not None)
    if task.loss_fn is None and task.make_step is None:
        task = dataclasses.replace(task, loss_fn=lm_loss_fn(cfg, config.z_loss,
                                                            config.logits_chunk))
    task = lora_task(task, config, cfg)
    mesh = make_mesh(config.mesh.to_dict(), devices)
    rules = normalize_rules(config.rules)
    divisor = batch_divisor(mesh, rules) * config.grad_accum
    if config.data.batch_size % divisor:
        raise TrainConfigError(
            f"config.data.batch_size={config.data.batch_size} must be divisible by the batch "
            f"sharding ({batch_divisor(mesh, rules)} = data x fsdp) x grad_accum")
    optimizer, schedule = make_optimizer(config.optim, config.steps * task.updates_per_step)
    root = jax.random.key(config.seed)
    make_params = task.init_params or (lambda: init(cfg, jax.random.fold_in(root, 0)))
    abstract_params = (jax.eval_shape(lambda: task.base_params) if task.base_params is not None
                       else jax.eval_shape(make_params))
    param_sh = logical_shardings(task.param_axes or param_axes(cfg), abstract_params, mesh, rules)
    frozen_sh = frozen = None
    if task.frozen_params is not None:
        frozen_shapes = jax.eval_shape(lambda: task.frozen_params)
        frozen_sh = logical_shardings(task.frozen_axes or param_axes(cfg), frozen_shapes, mesh,
                                      rules)
        frozen = jax.device_put(task.frozen_params, frozen_sh)

    def new_state(params):
        state = create_state(params, optimizer, jax.random.fold_in(root, 1))
        return state.replace(extra=task.init_extra()) if task.init_extra else state

    abstract_state = jax.eval_shape(new_state, abstract_params)
    state_sh = state_shardings(abstract_state, param_sh, optimizer, mesh)
    if frozen is not None:
        abstract_state = abstract_state.replace(frozen=jax.eval_shape(lambda: frozen))
        state_sh = state_sh.replace(frozen=frozen_sh)
    loss_fn = task.loss_fn
    if task.make_step is not None:
        step_fn = task.make_step(optimizer=optimizer, schedule=schedule, mesh=mesh, rules=rules,
                                 state_shardings=state_sh, lora=task.lora)
    else:
        step_fn = make_train_step(loss_fn, optimizer, schedule, mesh=mesh, rules=rules,
                                  state_shardings=state_sh, grad_accum=config.grad_accum)
    eval_fn = make_eval_step(task.eval_loss_fn or loss_fn, mesh=mesh, rules=rules, param_shardings=param_sh,
                             frozen_shardings=frozen_sh)

    checkpointer = loader_state = None
    state = None
    if workdir is not None:
        workdir = Path(workdir)
        _check_resumable(workdir, config)
        checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                    async_save=config.async_checkpoint)
        restored = checkpointer.restore_latest(abstract_state, state_sh)
        if restored is not None:
            latest, state, loader_state = restored
            state = state.replace(frozen=frozen)
            log.info("resumed from %s at step %d", checkpointer.directory, latest)
    if state is None and abstract:
        state = _place(abstract_state, state_sh)
    elif state is None:
        if task.base_params is not None:
            params = jax.device_put(task.base_params, param_sh)
        else:
            params = jax.jit(make_params, out_shardings=param_sh)()
        state = jax.jit(new_state, out_shardings=state_sh.replace(frozen=None))(params)
        state = state.replace(frozen=frozen)
    run = Run(config=config, model=cfg, task=task, mesh=mesh, rules=rules, state=state,
              step_fn=step_fn, eval_fn=eval_fn, param_shardings=param_sh,
              state_shardings=state_sh, abstract_state=abstract_state,
              checkpointer=checkpointer, loader=None)
    run.loader = run.make_loader("train")
    if loader_state:
        run.loader.set_state(loader_state)
    return run


def evaluate(run: Run, state) -> float | None:
    """Mean held-out loss over the first `eval_batches` batches of the eval split."""
    loader = run.make_loader("eval")
    if loader is None:
        return None
    total = weight = 0.0
    for _, local in zip(range(run.config.eval_batches), iter(loader)):
        lw, w = run.eval_fn(state.params, state.frozen, global_batch(local, run.mesh, run.rules))
        total, weight = total + float(lw), weight + float(w)
    return total / weight if weight else None


def _first_nonfinite(pending: list[tuple[int, dict]]) -> int | None:
    for step, metrics in pending:
        if not int(metrics["finite"]):
            return step
    return None


def train(config: ml_collections.ConfigDict, workdir: str | Path, task: Task | None = None, *,
          devices=None, progress_stream=None, progress_every: float = 10.0,
          clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Train until config.steps (or a stop signal); returns a summary of the run.

    Progress goes to `progress_stream` (default stderr): a tqdm bar on a terminal, otherwise a
    line about every `progress_every` seconds with step/total, loss,
    tokens/s and an ETA from the rate after the first (compiling) step, on the clock `clock`.
    A task's `data_counts` are in the summary (key "data_counts") and in
    `workdir/data_counts.json`."""
    workdir = Path(workdir)
    task = start_from_checkpoint(config, task or Task())
    validate_config(config, own_data=task.make_loader is not None)  # before anything is written
    is_main = jax.process_index() == 0
    lock = DirLock(workdir, what="--workdir") if is_main else None
    if lock is not None:
        lock.acquire()
    try:
        run = build(config, workdir, task, devices)
        if is_main:
            write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2))
            from hibari.data.tokenizer import write_tokenizer_record
            write_tokenizer_record(config, workdir)  # eval/sft/dpo refuse another tokenizer
            if task.data_counts is not None:
                write_atomic(workdir / "data_counts.json", json.dumps(task.data_counts, indent=1))
            if run.task.lora is not None:
                write_lora_record(workdir, run.task.lora.lora_cfg, bases_record(run.task, config))
        summary = _train(run, workdir, is_main, progress_stream, progress_every, clock)
        if task.data_counts is not None:
            summary["data_counts"] = task.data_counts
        return summary
    finally:
        if lock is not None:
            lock.release()


def _train(run: Run, workdir: Path, is_main: bool, progress_stream=None,
           progress_every: float = 10.0, clock: Callable[[], float] = time.monotonic
           ) -> dict[str, Any]:
    config = run.config
    state, start = run.state, int(jax.device_get(run.state.step))
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
    tokens_per_step = run.task.tokens_per_step or config.data.batch_size * config.data.seq_len
    flops = flops_per_token(run.model, config.data.seq_len)
    pending: list[tuple[int, dict]] = []
    summary: dict[str, Any] = {"start_step": start, "skipped_steps": 0, "stopped_by": None}
    max_skips = _field(config, "nan_max_skips")
    skips_in_a_row = 0
    window_start, window_steps = None, 0
    bar = progress_bar(config.get("name", "train"), config.steps, unit=" steps", initial=start,
                       exclude_first=True, stream=progress_stream, clock=clock, enabled=is_main,
                       every=progress_every)
    batches: Iterator = iter(run.loader)

    def save(state):
        if run.checkpointer is not None:
            run.checkpointer.save(state, run.loader.get_state())

    def flush_pending():
        """Fetch metrics of finished steps; apply the NaN policy before any save."""
        nonlocal pending, skips_in_a_row
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending = []
        bad = _first_nonfinite(fetched)
        if bad is not None and config.nan_policy == "stop":
            raise NonFiniteError(
                f"step {bad}: non-finite loss, gradient norm or update; the update was not "
                f"applied and no checkpoint was written after it. Lower config.optim.lr, enable "
                f"config.z_loss, or set config.nan_policy='skip' to skip such steps")
        for step, m in fetched:
            finite = int(m["finite"])
            summary["skipped_steps"] += 1 - finite
            skips_in_a_row = 0 if finite else skips_in_a_row + 1
            if skips_in_a_row >= max_skips:
                raise NonFiniteError(
                    f"steps {step - skips_in_a_row + 1}-{step}: {skips_in_a_row} non-finite steps "
                    f"in a row were skipped (config.nan_max_skips={max_skips}), "
                    f"{summary['skipped_steps']} in all: the run is not learning. Lower "
                    "config.optim.lr or enable config.z_loss; checkpoints before them are intact")
        return fetched

    with StopSignal() as stop:
        try:
            for step in range(start + 1, config.steps + 1):
                batch = global_batch(next(batches), run.mesh, run.rules)
                state, metrics = run.step_fn(state, batch)
                pending.append((step, metrics))
                if len(pending) > MAX_IN_FLIGHT:  # bound async dispatch depth
                    jax.block_until_ready(pending[-MAX_IN_FLIGHT - 1][1])
                if window_start is None:  # exclude compilation from throughput
                    jax.block_until_ready(metrics)
                    window_start, window_steps = time.perf_counter(), 0
                else:
                    window_steps += 1
                do_eval = config.eval_every and (step % config.eval_every == 0
                                                 or step == config.steps)
                do_log = step % config.log_every == 0 or step == config.steps or do_eval
                do_ckpt = config.checkpoint_every and step % config.checkpoint_every == 0
                if do_log or do_ckpt:
                    fetched = flush_pending()
                    last = {k: float(v) for k, v in fetched[-1][1].items()}
                    record = {k: v for k, v in last.items() if k != "finite"}  # + task aux
                    elapsed = time.perf_counter() - window_start
                    if window_steps and elapsed > 0:
                        tps = window_steps * tokens_per_step / elapsed
                        record["tokens_per_s"] = tps
                        util = mfu(tps, flops, run.mesh.size)
                        record["mfu"] = util if util is not None else "unknown"
                    if do_eval:
                        eval_loss = evaluate(run, state)
                        if eval_loss is not None:
                            record["eval_loss"] = eval_loss
                        if run.task.on_eval is not None:
                            record.update(run.task.on_eval(step, state.params, state.frozen))
                    if do_log:
                        writer.write(step, record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", **(
                            {"tokens/s": f"{record['tokens_per_s']:.3g}"}
                            if "tokens_per_s" in record else {}))
                        summary.update(record)
                if do_ckpt:
                    save(state)
                if do_log or do_ckpt:  # the next throughput window starts after eval/saves
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(step)
                if stop.should_stop():
                    flush_pending()
                    save(state)
                    summary["stopped_by"] = signal.Signals(stop.received).name
                    log.warning("received %s: saved step %d, exiting", summary["stopped_by"],
                                step)
                    break
            else:
                flush_pending()
                if run.checkpointer is not None and \
                        run.checkpointer.latest_step() != int(jax.device_get(state.step)):
                    save(state)
        finally:
            bar.finish()
            writer.close()
            if run.checkpointer is not None:
                run.checkpointer.close()
    if summary["skipped_steps"]:
        log.warning("%d of %d steps were skipped as non-finite (config.nan_policy='skip')",
                    summary["skipped_steps"], int(jax.device_get(state.step)) - start)
    summary["step"] = int(jax.device_get(state.step))
    export = run.task.export_params
    summary["params"] = state.params if export is None else export(state.params, state.frozen)
    return summary

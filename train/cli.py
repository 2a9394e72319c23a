"""`hibari pretrain`: config file + overrides in, a run directory out.

    hibari pretrain --config configs/pretrain/llama.py:tiny --workdir runs/tiny \\
        --config.steps=100 --config.mesh.fsdp=2

Multi-host: on TPU pods and SLURM clusters `jax.distributed` is initialised automatically;
elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I on each host.

Path-valued config fields (PATH_FIELDS) are made absolute here, at the command line, so the
run's config.json names the same files from any working directory.
"""
from __future__ import annotations

import difflib
import io
import logging
import os
import re
import sys
from typing import Callable

from absl import flags

from hibari.base.config_files import ConfigFileError, resolve_config_flag, resolve_config_path
from hibari.base.errors import UsageError


def config_field_names(config, prefix: str = "") -> list[str]:
    """Every dotted field name of a ConfigDict, nested ConfigDicts and their fields included."""
    import ml_collections
    names = []
    for key in config.keys():
        names.append(prefix + key)
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(config_field_names(value, f"{prefix}{key}."))
    return names


def nearest_fields(name: str, names: list[str], n: int = 5) -> list[str]:
    """The `n` names most like `name`, by difflib's ratio on the whole dotted name or on its
    last part (so `--config.warmup_steps` finds optim.warmup_steps)."""
    last = name.rsplit(".", 1)[-1]

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, name, candidate).ratio()
        part = difflib.SequenceMatcher(None, last, candidate.rsplit(".", 1)[-1]).ratio()
        return max(whole, 0.95 * part)

    return sorted(names, key=score, reverse=True)[:n]


def _config_spec(argv: list[str]) -> str | None:
    """The value of `--config FILE[:arg]` / `--config=FILE[:arg]` in argv."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _missing_field(path: str, config) -> bool:
    """Whether the dotted override `path` (`a.b`, `rules[0]`) names no field of `config`."""
    import ml_collections
    node = config
    for part in path.split("."):
        key = re.sub(r"\[.*$", "", part)
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            return True
        node = node[key]
    return False


def unknown_override(argv: list[str], spec: str, shown: str | None = None) -> str | None:
    """One line naming the first `--config.FIELD` override of `argv` that is no field of the
    config file `spec` (`path.py[:arg]`), with the nearest valid dotted names; None when every
    override names a field (or the file cannot be read: its own error is reported instead).
    `shown`: the config file as the user wrote it (default: `spec`)."""
    from hibari.base.config_files import load_python_config
    try:
        config = load_python_config(spec)
    except Exception:  # noqa: BLE001 - the parse error itself is reported instead
        return None
    for a in argv:
        m = re.match(r"--(?:no)?config\.([^=\s]+)", a)
        if m and _missing_field(m.group(1), config):
            near = nearest_fields(m.group(1), config_field_names(config))
            return (f"--config.{m.group(1)}: no such field in {shown or spec}; nearest: "
                    f"{', '.join(near)}")
    return None


FLAG_ERRORS = (flags.Error, ValueError, KeyError, AttributeError)


def _flag_error(e: Exception, argv: list[str], spec: str | None,
                shown: str | None) -> ConfigFileError:
    """The one ConfigFileError to raise for a failed parse of argv."""
    if isinstance(e, (KeyError, AttributeError)) and spec:
        message = unknown_override(argv, spec, shown)
        if message:
            return ConfigFileError(message)
    lines = [line for line in str(e).splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:  # ml_collections embeds one
        lines = [lines[0], lines[-1]]
    return ConfigFileError("\n  ".join(lines))


def parse_flag_values(fv: flags.FlagValues, prog: str, argv: list[str],
                      config_name: str | None = None, default_config: str | None = None
                      ) -> None:
    """Parse argv into `fv`; a bad flag or config override is a ConfigFileError naming it (an
    unknown `--config.FIELD`: one line with the nearest valid field names of the config file,
    `--config` in argv or `default_config`; `config_name`: that file as the user gave it)."""
    try:
        fv([f"hibari {prog}"] + argv)
    except FLAG_ERRORS as e:
        raise _flag_error(e, argv, _config_spec(argv) or default_config, config_name) from None


def config_flag_values(prog: str, argv: list[str], help_: str
                       ) -> tuple[flags.FlagValues, list[str]]:
    """New FlagValues with `--config FILE[:arg]` defined (its `--config.FIELD=VALUE` overrides
    read from this argv, not the process's), and argv with the config path resolved
    (`resolve_config_flag`). The caller defines its other flags, then `parse_flag_values`."""
    from ml_collections import config_flags
    fv = flags.FlagValues()
    argv = resolve_config_flag(argv)
    config_flags.DEFINE_config_file("config", None, help_, flag_values=fv, lock_config=True,
                                    sys_argv=[f"hibari {prog}"] + argv)
    return fv, argv


# Config fields that name files or directories, in any run config (configs/base.py and the
# recipe files): absolute in the resolved config, so config.json holds wherever it is read.
PATH_FIELDS = ("data.path", "data.eval_path", "data.tokenizer", "data.train_path", "init_from",
               "reference_cache", "reward.model", "bias.path", "loss.token_selection.reference",
               "loss.token_selection.cache")


def absolute_path(value: str, cwd: str | os.PathLike | None = None) -> str:
    """`value` (relative to `cwd`, default the working directory) made absolute; unchanged when
    empty, already absolute, a URL (`gs://...`) or a repository path of a vendored file that is
    not under `cwd` (`align/assets/x`: found in the installed package wherever it is read)."""
    from hibari.base.config_files import package_file
    if not value or "://" in value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    given = os.path.join(base, expanded)
    vendored = package_file(expanded)
    if not os.path.exists(given) and vendored is not None and vendored.exists():
        return value
    return os.path.normpath(given)


def _absolute_value(value, cwd):
    import ml_collections
    if isinstance(value, str):
        return absolute_path(value, cwd)
    if isinstance(value, (list, tuple)):
        return type(value)(_absolute_value(v, cwd) for v in value)
    if isinstance(value, ml_collections.ConfigDict):  # {source name: path}
        for key in value.keys():
            value[key] = _absolute_value(value[key], cwd)
    return value


def make_paths_absolute(config, cwd: str | os.PathLike | None = None,
                        fields: tuple[str, ...] = PATH_FIELDS) -> list[str]:
    """Set each of `fields` that `config` has (strings, lists of them, {name: path}) to its
    absolute form (`absolute_path`), in place; returns the dotted names of those changed."""
    import ml_collections
    changed = []
    for field in fields:
        *parents, last = field.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or last not in node:
            continue
        before = node[last]
        before_text = repr(before.to_dict() if isinstance(before, ml_collections.ConfigDict)
                           else before)
        after = _absolute_value(before, cwd)
        if not isinstance(after, ml_collections.ConfigDict):
            node[last] = after
        after_text = repr(after.to_dict() if isinstance(after, ml_collections.ConfigDict)
                          else after)
        if after_text != before_text:
            changed.append(field)
    return changed


def run_help(fv: flags.FlagValues) -> str:
    """The flags part of a run command's --help: absl's text without its own flags and without
    `(default: 'None')` under flags that have no default."""
    text = fv.get_help().split("absl.flags:")[0].replace("\n-:\n", "\n", 1)
    return re.sub(r"\n\s*\(default: 'None'\)", "", text)


def parse_run_flags(prog: str, argv: list[str], default_config: str):
    """Parse `--config FILE[:arg] --config.x=... --workdir DIR`, distributed flags and
    `--allow-tokenizer-mismatch` (fv.allow_tokenizer_mismatch). The config's PATH_FIELDS are
    made absolute (relative to the working directory: `make_paths_absolute`)."""
    from ml_collections import config_flags
    fv = flags.FlagValues()
    config_name = _config_spec(argv) or default_config
    argv = [a.replace("--allow-tokenizer-mismatch", "--allow_tokenizer_mismatch", 1)
            if a.startswith("--allow-tokenizer-mismatch") else a for a in resolve_config_flag(argv)]
    if default_config:  # found in the installed package when not under the working directory
        default_config = resolve_config_path(default_config)
    try:  # a default config file is loaded, and argv's overrides applied, right here
        config_flags.DEFINE_config_file("config", default_config, "config file[:argument]",
                                        flag_values=fv, lock_config=True,
                                        sys_argv=[f"hibari {prog}"] + argv)
    except FLAG_ERRORS as e:
        raise _flag_error(e, argv, _config_spec(argv) or default_config, config_name) from None
    flags.DEFINE_string("workdir", None, "run directory (resumes if it has checkpoints)",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "jax.distributed process count", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "jax.distributed process id", flag_values=fv)
    flags.DEFINE_boolean("allow_tokenizer_mismatch", False,
                         "start from config.init_from although its recorded tokenizer differs "
                         "from config.data.tokenizer (--allow-tokenizer-mismatch)", flag_values=fv)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: hibari {prog} --config FILE.py[:arg] --workdir DIR [--config.FIELD=VALUE ...]")
        print(run_help(fv))
        print("Every field of the config file can be overridden, e.g. --config.steps=1000 "
              "--config.mesh.fsdp=8 --config.model.remat=full; the resolved config is saved "
              "to WORKDIR/config.json.")
        raise SystemExit(0)
    if config_name is None:
        raise UsageError("--config FILE.py[:arg] is required")
    parse_flag_values(fv, prog, argv, config_name, default_config)
    if fv.config is None:
        raise UsageError("--config FILE.py[:arg] is required")
    if not fv.workdir:
        raise UsageError("--workdir is required")
    make_paths_absolute(fv.config)
    return fv


VERBOSE_ENV = "HIBARI_VERBOSE"


def verbose_requested(environ=None) -> bool:
    """Whether HIBARI_VERBOSE is set to something other than "" or "0" (`hibari --verbose`
    sets it for the command and the processes it starts)."""
    value = (os.environ if environ is None else environ).get(VERBOSE_ENV, "")
    return value.strip() not in ("", "0")


def own_or_warning(record: logging.LogRecord) -> bool:
    """The records shown without --verbose: hibari's own (INFO and up) and every library's
    warnings and errors; JAX's backend probing and other libraries' INFO lines are not."""
    name = record.name
    return (record.levelno >= logging.WARNING or name in ("hibari", "__main__")
            or name.startswith("hibari."))


def setup_logging(verbose: bool | None = None) -> None:
    """INFO logging to stderr, once per process: hibari's own lines and every warning, plus other
    libraries' INFO lines (JAX's backend probing, orbax) when `verbose` (default:
    `verbose_requested()`). A root logger that someone else configured (pytest, a notebook) is
    left alone; a second call updates the filter of the handler the first one installed."""
    if verbose is None:
        verbose = verbose_requested()
    root = logging.getLogger()
    mine = [h for h in root.handlers if getattr(h, "hibari_handler", False)]
    if not mine:
        if root.handlers:
            return
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        handler.hibari_handler = True
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        mine = [handler]
    for handler in mine:
        for f in list(handler.filters):
            handler.removeFilter(f)
        if not verbose:
            handler.addFilter(own_or_warning)
    # absl (orbax) is chatty at INFO
    logging.getLogger("absl").setLevel(logging.NOTSET if verbose else logging.WARNING)


def synthetic_notice(config) -> str | None:
    """The line `hibari pretrain` prints when its data are synthetic tokens (None otherwise)."""
    if config.data.get("kind") != "synthetic":
        return None
    return ("hibari pretrain: config.data.kind=synthetic: training on synthetic tokens (a "
            "deterministic Markov chain), not text: a smoke test of the model and loop; for a "
            "corpus pass "
            "--config.data.kind=packed --config.data.path=DIR (README: On a real corpus)")


SELECTION = "config.loss.token_selection"


def load_reference(path: str):
    """(cfg, params) of a reference model: a .gguf file (hibari.model.gguf.import_gguf) or any
    checkpoint kind hibari.model.params_io.load_params reads."""
    from hibari.base.errors import InputNotFound
    if not path:
        raise UsageError(f"{SELECTION}.reference is empty: set --{SELECTION}.reference=CKPT "
                         "(a run dir, params export, HF dir or .gguf file)")
    if not os.path.exists(path):
        raise InputNotFound(f"{SELECTION}.reference={path!r}: no such file or directory")
    if path.endswith(".gguf"):
        from hibari.model.gguf import import_gguf
        return import_gguf(path)
    from hibari.model.params_io import load_params
    return load_params(path)


def check_reference_tokenizer(config, reference: str, allow: bool = False) -> None:
    """The tokenizer recorded for `reference` (a hibari run) must be the run's own (its
    tokenizer record: config.data.tokenizer or the packed manifest); nothing to check when
    either has none (synthetic data, GGUF / HF / params exports)."""
    from hibari.data.tokenizer import check_data_tokenizer
    check_data_tokenizer(config, reference, label=f"{SELECTION}.reference={reference!r}",
                         fix="its token losses score other pieces; use a reference trained "
                             "with this tokenizer, or --allow-tokenizer-mismatch to go on anyway",
                         allow=allow)


def heldout_nll(config, cfg) -> Callable:
    """on_eval(step, params, frozen) -> {"eval_nll": the plain all-token next-token loss over
    the first config.eval_batches held-out batches} ({} without eval data): a selective run's
    eval_loss counts only the kept tokens, this counts every token like pretraining's."""
    state = {}

    def on_eval(step, params, frozen=None):
        import jax

        from hibari.train.loop import make_loader
        from hibari.train.losses import lm_loss_fn
        from hibari.train.sharding import global_batch, make_mesh, normalize_rules
        from hibari.train.step import make_eval_step
        loader = make_loader(config, "eval")
        if loader is None:
            return {}
        if not state:
            state["mesh"] = make_mesh(config.mesh.to_dict())
            state["rules"] = normalize_rules(config.rules)
            state["fn"] = make_eval_step(
                lm_loss_fn(cfg, 0.0, config.logits_chunk), mesh=state["mesh"],
                rules=state["rules"], param_shardings=jax.tree.map(lambda x: x.sharding, params))
        total = weight = 0.0
        for _, local in zip(range(config.eval_batches), iter(loader)):
            lw, w = state["fn"](params, None, global_batch(local, state["mesh"], state["rules"]))
            total, weight = total + float(lw), weight + float(w)
        return {"eval_nll": total / weight} if weight else {}
    return on_eval


SELECTION_MODES = ("live", "cached")
CACHE_NAME = "reference_token_losses"  # default cache: <workdir>/reference_token_losses
CACHE_FIELD = "ref_token_loss"  # the batch field the cached mode's loader adds


def reference_files(reference: str) -> tuple[str, list[str]]:
    """(root, files under it): what a reference checkpoint reads, for its identity: the .gguf
    file, the params export (config + params/), the step's params/ or the HF directory."""
    if reference.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(reference)), [os.path.abspath(reference)]
    from hibari.model.params_io import resolve_checkpoint
    kind, directory, _ = resolve_checkpoint(reference)
    root = directory.parent if kind == "params" else directory
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    if kind == "step":  # the run's config.json holds the step's model config
        run = directory.parent.parent.parent
        files += [str(run / "config.json")]
    return str(root), files


def reference_identity(reference: str, content: bool = True) -> dict:
    """{"path", "root", "files": {path: [size, mtime_ns]}, "blake2b"}: the reference checkpoint's
    files (`reference_files`) by stat and, with `content`, a hash of their bytes."""
    import hashlib
    root, files = reference_files(reference)
    stat = {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}
    identity = {"path": reference, "root": root, "files": stat}
    if content:
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            h.update(os.path.relpath(f, root).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        identity["blake2b"] = h.hexdigest()
    return identity


def same_reference(recorded: dict, reference: str) -> bool:
    """Whether `reference` is the checkpoint `recorded` (reference_identity): the same files by
    stat, or else the same bytes (a copy or a touched file is the same reference)."""
    now = reference_identity(reference, content=False)
    if recorded.get("files") == now["files"]:
        return True
    return recorded.get("blake2b") == reference_identity(reference)["blake2b"]


def token_loss_cache_dir(config, workdir) -> str:
    """config.loss.token_selection.cache, or <workdir>/reference_token_losses."""
    cache = config.loss.token_selection.get("cache") or ""
    if cache:
        return cache
    if workdir is None:
        raise UsageError(f"{SELECTION}.mode='cached' needs {SELECTION}.cache=DIR (no run "
                         "directory to keep the cache in)")
    return os.path.join(str(workdir), CACHE_NAME)


def _cache_splits(config) -> dict[str, str]:
    data = config.data
    return {"train": data.path, **({"eval": data.eval_path} if data.get("eval_path") else {})}


def check_token_loss_cache(cache: str, config, reference: str) -> bool:
    """True when `cache` holds every split's reference token losses for this run's packed rows
    and reference; False when it holds none yet; a stale or mismatched split is a one-line
    StaleRowArrays naming its manifest and the fix."""
    from hibari.data.loader import StaleRowArrays, check_row_arrays
    fix = (f"delete {cache} to recompute it, or point --{SELECTION}.cache at another directory")
    found = []
    for split, packed in _cache_splits(config).items():
        directory = os.path.join(cache, split)
        if not os.path.exists(os.path.join(directory, "manifest.json")):
            found.append(False)
            continue
        manifest = check_row_arrays(directory, packed, fix)
        recorded = manifest.get("reference", {})
        if not same_reference(recorded, reference):
            raise StaleRowArrays(
                f"{directory}/manifest.json: computed with reference {recorded.get('path')!r} "
                f"(blake2b {str(recorded.get('blake2b'))[:12]}), not {SELECTION}.reference="
                f"{reference!r} (changed or another checkpoint); {fix}")
        found.append(True)
    if any(found) and not all(found):
        missing = [s for s, f in zip(_cache_splits(config), found) if not f]
        raise StaleRowArrays(f"{cache}: has no {missing} split (config.data.eval_path added "
                             f"since it was built?); {fix}")
    return all(found)


def build_token_loss_cache(cache: str, config, reference: str, ref_cfg, ref_params) -> None:
    """Score every packed row of config.data.path (and eval_path) with the reference once:
    cache/<split>/ holds, per packed shard, float32 [rows, seq_len] `reference_token_loss`
    (nats; 0 where no prediction counts) and a manifest.json recording the packed manifests
    (sha256) and the reference (files + blake2b). Process 0 scores on its local devices (the
    reference sharded over them) and writes; other processes wait."""
    import jax
    import numpy as np

    from hibari.base.files import write_atomic
    from hibari.base.segments import positions_from_segments
    from hibari.data.loader import (
        packed_shard_rows,
        row_array_shard_name,
        write_row_arrays_manifest,
    )
    from hibari.model import param_axes
    from hibari.train.losses import reference_token_loss
    from hibari.train.sharding import (
        batch_divisor,
        global_batch,
        logical_shardings,
        make_mesh,
        normalize_rules,
    )
    log = logging.getLogger(__name__)
    if jax.process_index() == 0:
        identity = reference_identity(reference)
        mesh_sizes = config.mesh.to_dict() if jax.process_count() == 1 else \
            {"data": 1, "fsdp": -1, "tensor": 1}
        mesh = make_mesh(mesh_sizes, jax.local_devices())
        rules = normalize_rules(config.rules)
        shardings = logical_shardings(param_axes(ref_cfg), jax.eval_shape(lambda: ref_params),
                                      mesh, rules)
        params = jax.device_put(ref_params, shardings)
        divisor = batch_divisor(mesh, rules)
        batch = -(-config.data.batch_size // divisor) * divisor
        score = jax.jit(lambda p, b: reference_token_loss(ref_cfg, p, b, config.logits_chunk))
        for split, packed in _cache_splits(config).items():
            final = os.path.join(cache, split)
            tmp = f"{final}.tmp-{os.getpid()}"
            os.makedirs(tmp, exist_ok=True)
            n_rows = 0
            for source, shards in packed_shard_rows(packed).items():
                for i, (path, rows) in enumerate(shards):
                    packed_rows = np.load(path, mmap_mode="r")
                    out = np.zeros((rows, packed_rows.shape[-1]), np.float32)
                    for start in range(0, rows, batch):
                        part = np.asarray(packed_rows[start:start + batch])
                        pad = batch - len(part)
                        part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
                        seg = part[:, 1].astype(np.int32)
                        local = {"tokens": part[:, 0].astype(np.int32), "segment_ids": seg,
                                 "positions": positions_from_segments(seg)}
                        losses = score(params, global_batch(local, mesh, rules))
                        out[start:start + batch] = np.asarray(losses)[:batch - pad]
                    buf = io.BytesIO()
                    np.save(buf, out)
                    write_atomic(os.path.join(tmp, row_array_shard_name(source, i)),
                                 buf.getvalue())
                    n_rows += rows
            write_row_arrays_manifest(tmp, packed, CACHE_FIELD, "float32", {
                "reference": identity, "reference_model": ref_cfg.to_dict(),
                "logits_chunk": config.logits_chunk})
            try:
                os.replace(tmp, final)
            except OSError:  # another run built it meanwhile: theirs is checked on use
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("reference token losses of %d %s rows cached at %s", n_rows, split, final)
        del params
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("hibari token loss cache")


def cached_loader_factory(config, cache: str):
    """Task.make_loader of the cached mode: train.loop.make_loader's packed loaders, each batch
    with `ref_token_loss` [b, t] read from cache/<split>."""
    import jax

    from hibari.data.loader import PackedLoader

    def make_loader(split):
        data = config.data
        path = data.path if split == "train" else (data.get("eval_path") or None)
        if path is None:
            return None
        weights = data.weights.to_dict() if hasattr(data.weights, "to_dict") else data.weights
        return PackedLoader(path, batch_size=data.batch_size // jax.process_count(),
                            seq_len=data.seq_len, seed=config.seed,
                            shard_index=jax.process_index(), shard_count=jax.process_count(),
                            weights=weights or None, worker_count=data.worker_count,
                            num_epochs=None if split == "train" else 1,
                            row_fields={CACHE_FIELD: os.path.join(cache, split)})
    return make_loader


def token_selection_task(config, allow_tokenizer_mismatch: bool = False, workdir=None):
    """The pretraining Task of a config with loss.token_selection.enabled (Rho-1: the loss
    counts the top keep_ratio share of each batch's tokens by excess loss over the reference
    model); None when the config has no token selection or it is off.

    mode "live": the reference is held sharded beside the model as the state's frozen
    parameters and scores each batch. mode "cached": the reference scores every packed row once
    into `token_loss_cache_dir` (built here when missing, `build_token_loss_cache`; a stale one
    is refused) and is then dropped: batches carry `ref_token_loss`, no reference on device.
    Errors (a bad keep_ratio or mode, a missing reference, another vocabulary or tokenizer, a
    stale cache) are one-line UserErrors, raised before any compilation of the model."""
    from hibari.model import param_axes
    from hibari.train.loop import Task, TrainConfigError, start_from_checkpoint, validate_config
    from hibari.train.losses import keep_fraction, selective_lm_loss_fn
    loss = config.get("loss")
    selection = loss.get("token_selection") if loss is not None else None
    if selection is None or not selection.enabled:
        return None
    # continued pretraining: config.model becomes init_from's before anything is checked
    start = start_from_checkpoint(config, Task()).base_params
    cfg = validate_config(config)
    ratio = selection.keep_ratio
    try:
        keep_fraction(ratio)
    except (TypeError, ValueError):
        raise TrainConfigError(f"{SELECTION}.keep_ratio={ratio!r} must be a number in (0, 1] "
                               "(the share of each batch's tokens the loss counts)") from None
    mode = selection.get("mode", "live")
    if mode not in SELECTION_MODES:
        raise TrainConfigError(f"{SELECTION}.mode={mode!r}; choose one of {SELECTION_MODES}")
    if mode == "cached" and config.data.kind != "packed":
        raise TrainConfigError(f"{SELECTION}.mode='cached' scores packed rows: it needs "
                               f"config.data.kind='packed', not {config.data.kind!r} (use "
                               "mode='live')")
    reference = selection.reference
    if reference and not reference.endswith(".gguf"):
        from hibari.model.params_io import resolve_checkpoint
        if os.path.exists(reference):
            resolve_checkpoint(reference)  # not a checkpoint: named before the tokenizer check
    if reference and os.path.exists(reference):
        check_reference_tokenizer(config, reference, allow_tokenizer_mismatch)
    on_eval = heldout_nll(config, cfg)
    if mode == "cached":
        if not reference:
            load_reference(reference)  # the one-line error for an empty reference
        cache = token_loss_cache_dir(config, workdir)
        if not check_token_loss_cache(cache, config, reference):
            ref_cfg, ref_params = load_reference(reference)
            _check_vocab(reference, ref_cfg, cfg)
            build_token_loss_cache(cache, config, reference, ref_cfg, ref_params)
            del ref_params
            check_token_loss_cache(cache, config, reference)
        else:
            _check_vocab(reference, _reference_model(cache), cfg)
        return Task(loss_fn=selective_lm_loss_fn(cfg, None, ratio, config.z_loss,
                                                 config.logits_chunk), base_params=start,
                    make_loader=cached_loader_factory(config, cache), on_eval=on_eval)
    ref_cfg, ref_params = load_reference(reference)
    _check_vocab(reference, ref_cfg, cfg)
    return Task(loss_fn=selective_lm_loss_fn(cfg, ref_cfg, ratio, config.z_loss,
                                             config.logits_chunk),
                frozen_params=ref_params, base_params=start,
                frozen_axes=param_axes(ref_cfg), on_eval=on_eval)


def _reference_model(cache: str):
    import json

    from hibari.model import ModelConfig
    with open(os.path.join(cache, "train", "manifest.json")) as f:
        return ModelConfig.from_dict(json.load(f)["reference_model"])


def _check_vocab(reference: str, ref_cfg, cfg) -> None:
    from hibari.train.loop import TrainConfigError
    if ref_cfg.vocab_size != cfg.vocab_size:
        raise TrainConfigError(
            f"{SELECTION}.reference={reference!r} has vocab_size={ref_cfg.vocab_size} but "
            f"config.model.vocab_size={cfg.vocab_size}: the reference must share the model's "
            "tokenizer and vocabulary")


def pretrain_main(argv: list[str]) -> int:
    setup_logging()
    fv = parse_run_flags("pretrain", argv, default_config=None)
    notice = synthetic_notice(fv.config)
    if notice:
        print(notice, file=sys.stderr)
    if fv.allow_tokenizer_mismatch:  # read by train.loop.start_from_checkpoint (init_from)
        with fv.config.unlocked():
            fv.config.allow_tokenizer_mismatch = True
    from hibari.train.distributed import initialize
    initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    from hibari.train.loop import train
    task = token_selection_task(fv.config, fv.allow_tokenizer_mismatch, fv.workdir)
    summary = train(fv.config, fv.workdir, task)
    shown = {k: v for k, v in summary.items() if k != "params"}
    print(f"hibari pretrain: {shown}", file=sys.stderr)
    return 0

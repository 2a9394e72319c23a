"""`hibari lora`: LoRA adapters of a base checkpoint: merge, export to PEFT, import from PEFT.

    hibari lora merge  --checkpoint BASE --adapters ADAPTERS --out CKPT   # params export
    hibari lora export --checkpoint BASE --adapters ADAPTERS --out DIR    # PEFT files
                       [--hf-base HF_DIR]                                 # + the base for HF
    hibari lora import --checkpoint BASE --peft DIR --out ADAPTERS        # PEFT -> hibari
    hibari lora export --checkpoint RUN --out DIR     # a LoRA training run (config.lora)

BASE is any checkpoint `load_params` reads (params export, run, step or HF directory);
With RUN, a run trained with config.lora, --adapters is not needed: the adapters are the
run's newest good checkpoint and the base is the one its lora.json names.
ADAPTERS is a hibari adapter export (`hibari.model.params_io.save_adapters`: lora_config.json,
base_model_config.json, adapters/). `merge` writes W + scale * A @ B into a params export that
every command loads; tokenizer files lying in BASE's directory are copied beside it. `export`
writes adapter_config.json + adapter_model.safetensors, which `peft.PeftModel.from_pretrained`
loads onto the HF export of BASE (`hibari convert --to-hf BASE`, or `--hf-base` here).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hibari.base.errors import UsageError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "tokenizer_record.json")


def lora_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hibari lora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, adapters: bool = True):
        q.add_argument("--checkpoint", required=True,
                       help="the base model (params export, run, step or HF directory), or "
                            "a LoRA training run (then --adapters is not needed)")
        if adapters:
            q.add_argument("--adapters", default=None,
                           help="hibari adapter export (lora_config.json + adapters/); "
                                "default: the adapters of the LoRA run --checkpoint")
        q.add_argument("--out", required=True, help="directory to write (must not hold "
                       "the files written)")

    merge = sub.add_parser("merge", help="fold adapters into the base -> a params export")
    common(merge)
    export = sub.add_parser("export", help="adapters -> PEFT adapter_config.json + "
                            "adapter_model.safetensors")
    common(export)
    export.add_argument("--hf-base", metavar="DIR", default=None,
                        help="also write the base as an HF directory (as `hibari convert "
                             "--to-hf`); adapter_config.json then names it")
    export.add_argument("--base-name", default=None,
                        help="base_model_name_or_path recorded in adapter_config.json "
                             "(default: --hf-base, else --checkpoint)")
    imp = sub.add_parser("import", help="PEFT LoRA adapters (Llama family) -> hibari adapters")
    common(imp, adapters=False)
    imp.add_argument("--peft", required=True, metavar="DIR",
                     help="PEFT directory (adapter_config.json + adapter_model.safetensors)")
    return p


def lora_main(argv: list[str] | None = None) -> int:
    args = lora_parser().parse_args(argv)
    {"merge": _merge, "export": _export, "import": _import}[args.command](args)
    return 0


def _refuse_existing(out: Path, names) -> None:
    present = [n for n in names if (out / n).exists()]
    if present:
        raise UsageError(f"--out {out} already holds {present}; choose a new directory or "
                         "delete them")


def _base_and_adapters(args):
    """(cfg, base params, lora_cfg, adapters, base path): --checkpoint + --adapters, or the
    LoRA run --checkpoint (its lora.json's base; args.adapters names the run after this)."""
    from hibari.model.params_io import load_adapters, load_params
    if args.adapters is None:
        return _run_adapters(args)
    cfg, params = load_params(args.checkpoint)
    lora_cfg, adapters = load_adapters(args.adapters, cfg)
    return cfg, params, lora_cfg, adapters, args.checkpoint


def _run_adapters(args):
    from hibari.model.params_io import (
        load_params,
        read_lora_record,
        resolve_checkpoint,
        restore_newest_good,
        restore_verified,
        trainable_shapes,
    )
    from hibari.model.transformer import param_shapes
    kind, where, _ = resolve_checkpoint(args.checkpoint)
    run_dir = where.parent.parent.parent if kind == "step" else None
    record = read_lora_record(run_dir) if run_dir is not None else None
    if record is None:
        raise UsageError(f"--checkpoint {args.checkpoint} is not a LoRA training run (no "
                         "lora.json): pass --adapters DIR, the adapters to use on it")
    lora_cfg, bases = record
    if set(bases) != {""}:
        raise UsageError(f"--checkpoint {args.checkpoint}: the run adapts {sorted(bases)} of a "
                         "larger model (reward / RL); export and merge take language-model "
                         "runs (pretrain, SFT, DPO)")
    base_path, cfg = bases[""]
    shapes = trainable_shapes(param_shapes(cfg), lora_cfg, bases)
    adapters = (restore_newest_good(run_dir, shapes) if where.parent.parent ==
                Path(args.checkpoint).absolute() / "checkpoints" else
                restore_verified(where, shapes))
    base_cfg, params = load_params(base_path)
    args.adapters = args.checkpoint
    return base_cfg, params, lora_cfg, adapters, base_path


def _config_of(checkpoint: str):
    """The ModelConfig of a checkpoint, without reading its arrays."""
    from hibari.model.hf import config_from_hf
    from hibari.model.params_io import resolve_checkpoint
    _, where, cfg = resolve_checkpoint(checkpoint)
    if cfg is None:  # an HF directory
        path = Path(where) / "config.json"
        cfg = config_from_hf(json.loads(path.read_text()), str(path))
    return cfg


def _merge(args) -> None:
    from hibari.model.lora import apply_lora
    from hibari.model.params_io import save_params
    out = Path(args.out)
    _refuse_existing(out, ("params",))
    cfg, params, lora_cfg, adapters, base = _base_and_adapters(args)
    save_params(out, cfg, apply_lora(params, adapters, lora_cfg))
    base_dir = Path(base)
    copied = [n for n in TOKENIZER_FILES if (base_dir / n).is_file()]
    for name in copied:
        shutil.copyfile(base_dir / name, out / name)
    print(f"merged {args.adapters} (rank {lora_cfg.rank}, {', '.join(lora_cfg.modules)}) into "
          f"{base} -> {out}" + (f" (with {', '.join(copied)})" if copied else ""))


def _export(args) -> None:
    from hibari.model.hf import export_hf
    from hibari.model.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft
    out = Path(args.out)
    _refuse_existing(out, (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    if args.hf_base:
        _refuse_existing(Path(args.hf_base), ("config.json", "model.safetensors"))
    cfg, params, lora_cfg, adapters, base = _base_and_adapters(args)
    base_name = args.base_name or str(Path(args.hf_base or base).absolute())
    if args.hf_base:
        export_hf(cfg, params, args.hf_base)
    export_peft(cfg, lora_cfg, adapters, out, base_name)
    print(f"exported {args.adapters} -> {out} ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
          + (f"; base -> {args.hf_base}" if args.hf_base else ""))


def _import(args) -> None:
    from hibari.model.params_io import ADAPTERS, save_adapters
    from hibari.model.peft import import_peft
    out = Path(args.out)
    _refuse_existing(out, (ADAPTERS,))
    cfg = _config_of(args.checkpoint)
    lora_cfg, adapters = import_peft(args.peft, cfg)
    save_adapters(out, cfg, lora_cfg, adapters)
    print(f"imported {args.peft} (rank {lora_cfg.rank}, {', '.join(lora_cfg.modules)}) -> {out}")

"""`hibari convert`: Hugging Face checkpoint directories <-> hibari parameter checkpoints.

    hibari convert --from-hf DIR --out CKPT      # config.json + safetensors -> CKPT
    hibari convert --to-hf CKPT --out DIR        # any hibari checkpoint -> transformers dir
"""
from __future__ import annotations

import argparse

from hibari.model.config import DTYPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hibari convert",
        description="Convert between Hugging Face Llama/Mistral/Qwen2 checkpoint directories "
                    "and hibari parameter checkpoints (model_config.json + params/).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="HF directory to import")
    src.add_argument("--to-hf", metavar="CKPT",
                     help="hibari checkpoint to export (params export, run dir or step dir)")
    p.add_argument("--out", required=True, help="where to write the converted checkpoint")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="parameter dtype on import (default float32; bf16 files upcast exactly)")
    p.add_argument("--no-scan", action="store_true",
                   help="on import, keep layers as layers_0.. instead of one scanned stack")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="on import, override max_position_embeddings (sliding-window models)")
    return p


def convert_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _convert(args)
    return 0


def _convert(args: argparse.Namespace) -> None:
    from hibari.model.hf import export_hf, import_hf
    from hibari.model.params_io import load_params, save_params

    if args.from_hf:
        cfg, params = import_hf(args.from_hf, scan_layers=not args.no_scan, dtype=args.dtype,
                                max_seq_len=args.max_seq_len)
        out = save_params(args.out, cfg, params)
        print(f"imported {args.from_hf} ({cfg.n_layers} layers, d_model {cfg.d_model}, "
              f"vocab {cfg.vocab_size}) -> {out}")
    else:
        cfg, params = load_params(args.to_hf)
        out = export_hf(cfg, params, args.out)
        print(f"exported {args.to_hf} -> {out} (config.json + model.safetensors)")

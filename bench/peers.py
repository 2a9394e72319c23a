"""hibari against its peers on identical work, in one run: the three harnesses and one ratio table.

    python bench/peers.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out peers.jsonl
    python bench/peers.py --parts train,data --rounds 3
    python bench/peers.py --quick                  # tiny shapes: checks the harnesses, not speed

Parts (each is also a script of its own, with more options):
- train  bench/peers_train.py  the jitted train step vs plain JAX and transformers + torch AdamW
- eval   bench/peers_eval.py   log-likelihood scoring and greedy generation vs transformers
- data   bench/peers_data.py   the Gopher rule filters vs datatrove's

Every part interleaves its systems round by round and reports best and median; this front door
runs the parts one after the other (never at the same time: they would time each other) and
prints, for each work, hibari's throughput over each peer's (> 1: hibari faster), with the load
average before and after each part. --out FILE appends every part's rows as JSONL.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARTS = ("train", "eval", "data")
QUICK = {
    "train": ["--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
              "--d-ff", "128", "--vocab", "512", "--batch", "2", "--seq", "32",
              "--rounds", "1", "--steps", "1", "--warmup", "1"],
    "eval": ["--requests", "8", "--new-tokens", "4", "--rounds", "1"],
    "data": ["--limit", "60", "--rounds", "1"],
}


def ratios(rows: list[dict]) -> list[dict]:
    """One entry per (part, work, peer): hibari's units/s over the peer's, from the rows of a run.
    A part's hibari rows are those whose system starts with "hibari" ("hibari (packed)" is
    compared too); the peers are the other systems of the same work."""
    out = []
    works: dict[tuple, list[dict]] = {}
    for r in rows:
        works.setdefault((r["part"], r["work"]), []).append(r)
    for (part, work), group in works.items():
        ours = [r for r in group if r["system"].startswith("hibari")]
        peers = [r for r in group if not r["system"].startswith("hibari")]
        for h in ours:
            for p in peers:
                if h.get("units_per_s") and p.get("units_per_s"):
                    out.append({"part": part, "work": work, "hibari": h["system"],
                                "peer": p["system"], "unit": h["unit"],
                                "hibari_units_per_s": h["units_per_s"],
                                "peer_units_per_s": p["units_per_s"],
                                "ratio": h["units_per_s"] / p["units_per_s"]})
    return out


def markdown(entries: list[dict]) -> str:
    lines = ["| part | work | hibari | peer | hibari (best) | peer (best) | hibari / peer |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['part']} | {e['work']} | {e['hibari']} | {e['peer']} | "
                     f"{e['hibari_units_per_s']:,.2f} {e['unit']} | "
                     f"{e['peer_units_per_s']:,.2f} {e['unit']} | {e['ratio']:.2f}x |")
    return "\n".join(lines)


def run_part(part: str, argv: list[str]) -> list[dict]:
    if part == "train":
        from bench import peers_train as module
    elif part == "eval":
        from bench import peers_eval as module
    else:
        from bench import peers_data as module
    return module.main(argv)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {PARTS}")
    p.add_argument("--gguf", help="the eval part's model (a llama GGUF); default: a tiny random "
                                  "Llama, which times the harness, not a real model")
    p.add_argument("--rounds", type=int, default=0, help="rounds for every part (default: each "
                                                         "part's own)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one round (a smoke run)")
    p.add_argument("--out", help="append every row to this JSONL file")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts {args.parts!r}: choose from {PARTS}")

    rows = []
    for part in parts:
        sub = list(QUICK[part]) if args.quick else []
        if args.rounds and not args.quick:
            sub += ["--rounds", str(args.rounds)]
        if part == "eval" and args.gguf:
            sub += ["--gguf", args.gguf]
        if args.out:
            sub += ["--out", args.out]
        load = [round(x, 2) for x in os.getloadavg()]
        print(f"\n## {part} (load before: {load})", flush=True)
        rows += run_part(part, sub)
    entries = ratios(rows)
    print(f"\n## hibari / peer (load after: {[round(x, 2) for x in os.getloadavg()]})\n")
    print(markdown(entries))
    return rows


if __name__ == "__main__":
    main()

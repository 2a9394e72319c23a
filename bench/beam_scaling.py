"""`hibari data prepare` on the DirectRunner with 1 and 2 workers beside the local run, on the
vendored corpus replicated N times (default 10: every document N times, ids suffixed), with the
quickstart's settings (configs/data/quickstart.py: 8000-piece tokenizer, 512-token best-fit rows).

    python bench/beam_scaling.py                    # local 1/2 processes, beam 1/2 workers
    python bench/beam_scaling.py --copies 10 --runs beam:1,beam:2 --out bench/results.jsonl

Each run is a fresh process (one at a time); reported per run: wall time, documents read per
second, the driver's peak RSS and the largest worker process's peak RSS (the local run's
MinHash pool, Beam's SDK workers; sampled from /proc every 0.2 s), and for Beam the dedup stage's footprint per document: the
bytes (Beam's own coder) each document sends into the MinHash/LSH shuffles (one key per band +
the signature) and into the exact-dedup shuffles, and the verified edges the one union-find
worker holds (bytes per document of the corpus). Kept documents, tokenizer and shards are
checked equal across runs (sha256). Results: docs/beam.md and BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import cpu_model, emit, versions  # noqa: E402
from hibari.data import CORPUS_DIR  # noqa: E402


def replicate(copies: int, out_dir: str) -> list[str]:
    """Every vendored corpus file `copies` times (`<name>-rK.jsonl.gz`, ids suffixed `-rK`)."""
    paths = []
    for src in sorted(glob.glob(os.path.join(CORPUS_DIR, "*.jsonl.gz"))):
        with gzip.open(src, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        name = os.path.basename(src).split(".")[0]
        for k in range(copies):
            path = os.path.join(out_dir, f"{name}-r{k:02d}.jsonl.gz")
            with gzip.open(path, "wt", encoding="utf-8") as f:
                for i, r in enumerate(records):
                    r = dict(r)
                    r["id"] = f"{r.get('id', f'{name}:{i}')}-r{k}"
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            paths.append(path)
    return paths


def descendants(root: int) -> list[int]:
    """Every live process below `root` (from /proc/*/stat parent ids)."""
    parent = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(stat.split("/")[2])] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def watch_workers(stop: threading.Event, peaks: dict) -> None:
    """Sample the resident memory (VmRSS) of every descendant process every 0.2 s: per-process
    peaks (getrusage's children maximum would count the driver's memory a forked worker started
    with)."""
    me = os.getpid()
    while not stop.is_set():
        for pid in descendants(me):
            try:
                with open(f"/proc/{pid}/status") as f:
                    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration, ValueError):
                continue
            peaks[pid] = max(peaks.get(pid, 0), rss)
        stop.wait(0.2)


def one_run(runner: str, workers: int, inputs: str, out: str) -> dict:
    """In this (fresh) process: prepare with the quickstart settings; timings and peak RSS."""
    import dataclasses

    from hibari.data.cli import load_prepare_config
    from hibari.data.pipeline import prepare
    cfg = load_prepare_config(f"configs/data/quickstart.py:{out}")
    cfg = dataclasses.replace(cfg, inputs=[inputs], processes=workers, runner=runner)
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=watch_workers, args=(stop, peaks), daemon=True)
    watcher.start()
    start = time.perf_counter()
    report = prepare(cfg)
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    return {"wall_s": round(wall, 1), "read_docs": report["totals"]["read_docs"],
            "docs_per_s": round(report["totals"]["read_docs"] / wall, 1),
            "kept_docs": report["totals"]["dedup_docs_out"],
            "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_mb": round(max(peaks.values(), default=0) / 1024, 1), "worker_processes": len(peaks),
            "metrics": report.get("runner", {}).get("metrics", {})}


def dedup_bytes(report_metrics: dict, docs: int, num_perm: int = 128) -> dict:
    """Bytes per document the dedup stage moves and holds, from Beam's coder on real elements."""
    import apache_beam as beam

    from hibari.data.dedup import NearDedupConfig
    coder = beam.coders.registry.get_coder(beam.typehints.Any)
    c = NearDedupConfig(num_perm=num_perm).resolved()
    pos = (12, 1234)
    band = len(coder.encode(((c.bands - 1, 2**63 + 12345), pos)))
    sig = len(coder.encode((pos, b"\0" * 4 * c.num_perm)))
    exact = len(coder.encode((pos, ("0" * 32, "en.jsonl:1234-r9")))) + len(coder.encode(("0" * 32, (pos, "en.jsonl:1234-r9", None))))
    edge = len(coder.encode((pos, pos)))
    edges = report_metrics.get("hibari.dedup.verified_edges", 0)
    return {"bands": c.bands, "minhash_shuffle_bytes_per_doc": c.bands * band + sig,
            "exact_shuffle_bytes_per_doc": exact, "union_find_edges": edges,
            "union_find_bytes_per_doc": round(edges * edge / max(1, docs), 1)}


def single_worker_footprint(n: int = 200_000) -> dict:
    """Python heap bytes (tracemalloc peak) of the two single-worker steps: the union-find over
    `n` verified edges (positions as the pipeline has them: (file, record) tuples), and the
    packing plan of `n` documents (their (position, length) list sorted, then `pack_plan`)."""
    import random
    import tracemalloc

    from hibari.data.beam import components, plan_source
    rng = random.Random(0)
    pairs = [(rng.randrange(1000), rng.randrange(10**6), rng.randrange(1000), rng.randrange(10**6))
             for _ in range(n)]
    tracemalloc.start()
    edges = [((a, b), (c, d)) for a, b, c, d in pairs]  # as they arrive from the shuffle: own tuples
    roots = list(components(edges))
    uf = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    members = [((a, b), rng.randrange(2, 2000)) for a, b, _, _ in pairs]
    tracemalloc.start()
    planned = sum(1 for _ in plan_source((("train", "en"), iter(members)), 512, "best_fit"))
    plan = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert roots and planned == n
    return {"union_find_bytes_per_edge": round(uf / n, 1),
            "pack_plan_bytes_per_doc": round(plan / n, 1)}


def sha_outputs(out: str) -> dict:
    files = sorted(glob.glob(os.path.join(out, "packed*", "*.npy"))) + [os.path.join(out, "tokenizer.model")]
    h = hashlib.sha256()
    for f in files:
        h.update(open(f, "rb").read())
    return {"outputs_sha256": h.hexdigest()[:16], "shards": len(files) - 1}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--runs", default="local:1,local:2,beam:1,beam:2", help="runner:workers,...")
    ap.add_argument("--out", help="append the JSON line to this JSONL file")
    ap.add_argument("--one", nargs=3, metavar=("RUNNER", "WORKERS", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--footprint", action="store_true", help="only the single-worker steps' memory")
    a = ap.parse_args(argv)
    if a.footprint:
        emit({"bench": "beam_footprint", **single_worker_footprint()}, a.out)
        return
    if a.one:
        runner, workers, work = a.one
        print(json.dumps(one_run(runner, int(workers), os.path.join(work, "in", "*.jsonl.gz"),
                                 os.path.join(work, f"{runner}{workers}"))))
        return
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, "in"))
        paths = replicate(a.copies, os.path.join(work, "in"))
        rows = []
        for spec in a.runs.split(","):
            runner, workers = spec.split(":")
            load = os.getloadavg()[0]
            done = subprocess.run([sys.executable, __file__, "--one", runner, workers, work], capture_output=True,
                                  text=True, cwd=Path(__file__).resolve().parent.parent)
            if done.returncode:
                sys.exit(f"{spec} failed:\n{done.stderr[-3000:]}")
            row = {"runner": runner, "workers": int(workers), "load_before": round(load, 2),
                   **json.loads(done.stdout.strip().splitlines()[-1]),
                   **sha_outputs(os.path.join(work, f"{runner}{workers}"))}
            if runner == "beam":
                row.update(dedup_bytes(row["metrics"], row["read_docs"]))
            row.pop("metrics")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        same = len({r["outputs_sha256"] for r in rows}) == 1
        emit({"bench": "beam_scaling", "device": cpu_model(), "cpus": os.cpu_count(), "copies": a.copies,
              "input_files": len(paths), "outputs_identical": same, "load_after": round(os.getloadavg()[0], 2),
              "versions": versions("apache-beam", "numpy", "sentencepiece"), "runs": rows}, a.out)
        print("| run | wall s | docs/s | driver peak MB | largest worker peak MB |", file=sys.stderr)
        for r in rows:
            print(f"| {r['runner']} x{r['workers']} | {r['wall_s']} | {r['docs_per_s']} | {r['driver_peak_mb']} | "
                  f"{r['worker_peak_mb']} |", file=sys.stderr)


if __name__ == "__main__":
    main()

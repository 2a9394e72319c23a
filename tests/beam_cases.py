"""The Beam runs of tests/test_data_beam.py, each in its own Python process.

`python tests/beam_cases.py CASE ARGS.json RESULT.json` runs one case and writes its result as
JSON. The tests start it with `run_case`, so Apache Beam is never imported into the pytest
process: Beam's in-process runners leave their thread pools behind (a dozen idle executor threads
for the rest of the suite), and a pipeline runs here as it does for a user, in its own process.

Cases (each `fn(args, work)`, `work` the folder the args and result files are in):
    retried  `prepare(config)` on the bundle-based DirectRunner with injected failures
             (args: the PrepareConfig fields and `fail_at`, {name: call number}); result: how
             often each wrapped function was called
    near     `NearDuplicates(cfg)` on texts (args: texts, the NearDedupConfig fields); result:
             [[index, root index], ...]
    prepare  `prepare(config)`; result: {"error": the PrepareError's message, or null}
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.abspath(__file__)


def run_case(case: str, args: dict, work, timeout: int = 900):
    """Run `case` with `args` in a fresh interpreter (cwd: the repository root) and return its
    result; a failing case fails the test with the child's stderr tail."""
    arg_path, result_path = os.path.join(work, f"{case}-args.json"), os.path.join(work, f"{case}-result.json")
    with open(arg_path, "w") as f:
        json.dump(args, f)
    proc = subprocess.run([sys.executable, HERE, case, arg_path, result_path],
                          cwd=os.path.dirname(os.path.dirname(HERE)), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"beam case {case!r} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    with open(result_path) as f:
        return json.load(f)


def _config(fields: dict):
    from hibari.data.pipeline import PrepareConfig
    fields = dict(fields)
    fields["beam_options"] = tuple(fields.get("beam_options", ()))
    return PrepareConfig(**fields)


def retried(args: dict, work: str):
    """Wrap the filter decision, the candidate verification, the corpus-part writer and the shard
    writer so the call numbered `fail_at[name]` raises (the writers after writing their file: a
    worker dying after its output landed); the runner must retry those bundles."""
    import hibari.data.beam as hb
    from hibari.data.pipeline import prepare
    fail_at = args.pop("fail_at")
    calls = {name: 0 for name in fail_at}

    def failing_once(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            if calls[name] == fail_at[name]:
                if name in ("write_jsonl", "save_array"):
                    fn(*a, **kw)
                raise RuntimeError(f"injected {name} failure")
            return fn(*a, **kw)
        return wrapped

    for name in fail_at:
        setattr(hb, name, failing_once(name, getattr(hb, name)))
    prepare(_config(args))
    return calls


def near(args: dict, work: str):
    import apache_beam as beam

    from hibari.data.beam import NearDuplicates
    from hibari.data.dedup import NearDedupConfig
    texts = args.pop("texts")
    cfg = NearDedupConfig(**args).resolved()
    out = os.path.join(work, "near-pairs")
    with beam.Pipeline() as p:
        docs = p | beam.Create([((0, i), {"id": str(i), "text": t, "meta": {}}) for i, t in enumerate(texts)])
        (docs | NearDuplicates(cfg) | beam.MapTuple(lambda d, root: json.dumps([d[1], root[1]]))
         | beam.io.WriteToText(out, shard_name_template=""))
    with open(out) as f:
        return sorted(json.loads(line) for line in f)


def prepare_case(args: dict, work: str):
    from hibari.data.pipeline import PrepareError, prepare
    try:
        prepare(_config(args))
    except PrepareError as e:
        return {"error": str(e)}
    return {"error": None}


CASES = {"retried": retried, "near": near, "prepare": prepare_case}

if __name__ == "__main__":
    case, arg_path, result_path = sys.argv[1:4]
    with open(arg_path) as f:
        result = CASES[case](json.load(f), os.path.dirname(os.path.abspath(result_path)))
    with open(result_path, "w") as f:
        json.dump(result, f)

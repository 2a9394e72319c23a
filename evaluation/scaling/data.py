"""Reading and validating scaling-law results (CSV or JSONL) into `ScalingPoints`.

A row is one measured loss: columns `N` (parameters), `loss`, and `D` (tokens) or `C` (FLOPs);
optionally `run` (member name) and `step` (rows of a training curve). Missing `C` is 6ND, missing
`D` is C/(6N). Every problem is reported with the file, the row and the column at fault.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from hibari.base.errors import UserError

REQUIRED = ("N", "loss")
POSITIVE_NUMERIC = ("N", "D", "C", "loss")


class ScalingDataError(UserError, ValueError):
    """A results file that cannot be fitted; the message says where and what to do."""


class ScalingFitError(UserError, RuntimeError):
    """A fit that the data cannot support (too few points, degenerate groups)."""


@dataclasses.dataclass(frozen=True)
class ScalingPoints:
    """Measured losses, one entry per row: `N[i]`, `D[i]`, `C[i]`, `loss[i]`, `run[i]`, `step[i]`.

    `run` is a member name ("" when the file has none); `step` is NaN when the file has none.
    `source` names the file (for messages).
    """

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    loss: np.ndarray
    run: np.ndarray
    step: np.ndarray
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.loss)

    @property
    def has_curves(self) -> bool:
        """True when some run has more than one row (training curves, used by Approach 1)."""
        if not np.any(self.run != ""):
            return False
        _, counts = np.unique(self.run, return_counts=True)
        return bool(np.any(counts > 1))

    def subset(self, index) -> "ScalingPoints":
        """The rows selected by a boolean mask or an integer index array (repeats allowed)."""
        return ScalingPoints(self.N[index], self.D[index], self.C[index], self.loss[index],
                             self.run[index], self.step[index], self.source)

    def final_points(self) -> "ScalingPoints":
        """One row per run: its last step. Rows without a run name are kept as they are."""
        if not self.has_curves:
            return self
        keep = []
        for name in np.unique(self.run):
            rows = np.flatnonzero(self.run == name)
            if name == "":
                keep.extend(rows)
                continue
            steps = np.where(np.isnan(self.step[rows]), -np.inf, self.step[rows])
            keep.append(rows[np.argmax(steps)] if np.any(np.isfinite(steps)) else rows[-1])
        return self.subset(np.sort(np.asarray(keep, dtype=int)))


def points_from_arrays(N, loss, D=None, C=None, run=None, step=None, source="<memory>") -> ScalingPoints:
    """Build `ScalingPoints` from arrays; D or C must be given (the other is derived from 6ND)."""
    N = np.asarray(N, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if D is None and C is None:
        raise ScalingDataError(f"{source}: give D (tokens) or C (FLOPs) alongside N and loss")
    D = np.asarray(C, dtype=float) / (6.0 * N) if D is None else np.asarray(D, dtype=float)
    C = 6.0 * N * D if C is None else np.asarray(C, dtype=float)
    n = len(N)
    run = np.full(n, "", dtype=object) if run is None else np.asarray(run, dtype=object)
    step = np.full(n, np.nan) if step is None else np.asarray(step, dtype=float)
    for name, values in (("N", N), ("D", D), ("C", C), ("loss", loss), ("run", run), ("step", step)):
        if len(values) != n:
            raise ScalingDataError(f"{source}: column {name!r} has {len(values)} values, N has {n}")
    for name, values in (("N", N), ("D", D), ("C", C), ("loss", loss)):
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if len(bad):
            raise ScalingDataError(
                f"{source}: row {bad[0] + 1}, column {name!r}: {values[bad[0]]!r} is not a positive finite "
                f"number; fix or remove the row")
    return ScalingPoints(N, D, C, loss, run, step, source)


def load_points(path: str | Path, rename: Mapping[str, str] | None = None) -> ScalingPoints:
    """Read a `.csv` or `.jsonl` results file, validating every row before returning.

    `rename` maps our column names to the file's (e.g. {"loss": "best_eval_loss"}).
    """
    path = Path(path)
    if not path.is_file():
        raise ScalingDataError(f"{path}: no such file; pass the results table written by the sweep (CSV or JSONL)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, records = _read_csv(path)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        header, records = _read_jsonl(path)
    else:
        raise ScalingDataError(f"{path}: unknown extension {suffix!r}; use .csv or .jsonl")
    columns = _resolve_columns(path, header, rename or {})
    return _rows_to_points(path, columns, records)


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        records = []
        for row in reader:
            cleaned = {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
            records.append((reader.line_num, cleaned))
    if not header:
        raise ScalingDataError(f"{path}: empty file; expected a header row with at least N, loss and D or C")
    return header, records


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    header: dict[str, None] = {}
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScalingDataError(f"{path}: line {line_no} is not valid JSON ({e.msg}); "
                                       f"each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise ScalingDataError(f"{path}: line {line_no} is a {type(obj).__name__}, not a JSON object")
            header.update(dict.fromkeys(obj))
            records.append((line_no, obj))
    if not records:
        raise ScalingDataError(f"{path}: no rows; expected one JSON object per line with N, loss and D or C")
    return list(header), records


def _resolve_columns(path: Path, header: list[str], rename: Mapping[str, str]) -> dict[str, str]:
    unknown = set(rename) - {"N", "D", "C", "loss", "run", "step"}
    if unknown:
        raise ScalingDataError(f"--rename names unknown field(s) {sorted(unknown)}; "
                               f"valid fields are N, D, C, loss, run, step")
    columns = {field: rename.get(field, field) for field in ("N", "D", "C", "loss", "run", "step")}
    present = {field: col for field, col in columns.items() if col in header}
    missing = [columns[f] for f in REQUIRED if f not in present]
    if "D" not in present and "C" not in present:
        missing.append(f"{columns['D']} or {columns['C']}")
    if missing:
        hint = _close_matches(missing, header)
        raise ScalingDataError(
            f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}; found {header}. "
            f"Add them, or map yours with --rename FIELD=COLUMN (e.g. --rename loss=eval_loss){hint}")
    return present


def _close_matches(missing: list[str], header: list[str]) -> str:
    lowered = {h.lower(): h for h in header}
    hits = [f"{lowered[m.lower()]!r} for {m!r}" for m in missing if m.lower() in lowered]
    return f"; did you mean {', '.join(hits)}?" if hits else ""


def _parse_positive(path: Path, line: int, column: str, raw) -> float:
    where = f"{path}: row at line {line}, column {column!r}"
    if raw is None or (isinstance(raw, str) and raw == ""):
        raise ScalingDataError(f"{where}: empty value; fill it in or remove the row")
    if isinstance(raw, bool):
        raise ScalingDataError(f"{where}: {raw!r} is not a number")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ScalingDataError(f"{where}: {raw!r} is not a number; write plain numbers such as 1.2e9") from None
    if not math.isfinite(value) or value <= 0:
        raise ScalingDataError(f"{where}: {raw!r} must be a positive finite number; fix or remove the row")
    return value


def _rows_to_points(path: Path, columns: dict[str, str], records: Iterable[tuple[int, dict]]) -> ScalingPoints:
    values: dict[str, list] = {field: [] for field in ("N", "D", "C", "loss", "run", "step")}
    for line, row in records:
        for field in ("N", "D", "C", "loss"):
            if field in columns:
                values[field].append(_parse_positive(path, line, columns[field], row.get(columns[field])))
        values["run"].append(str(row.get(columns["run"], "") or "") if "run" in columns else "")
        if "step" in columns:
            raw = row.get(columns["step"])
            try:
                values["step"].append(float(raw) if raw not in (None, "") else math.nan)
            except (TypeError, ValueError):
                raise ScalingDataError(f"{path}: row at line {line}, column {columns['step']!r}: "
                                       f"{raw!r} is not a step number") from None
        else:
            values["step"].append(math.nan)
    if not values["loss"]:
        raise ScalingDataError(f"{path}: header only, no data rows")
    return points_from_arrays(
        values["N"], values["loss"],
        D=values["D"] if "D" in columns else None, C=values["C"] if "C" in columns else None,
        run=np.asarray(values["run"], dtype=object), step=values["step"], source=str(path))


def group_by_log_gap(values: np.ndarray, tol_dex: float) -> np.ndarray:
    """Cluster positive values: sorted log10 values split wherever the gap exceeds `tol_dex`.

    Returns an integer label per value, labels ordered by increasing value.
    """
    logs = np.log10(np.asarray(values, dtype=float))
    order = np.argsort(logs, kind="stable")
    labels = np.empty(len(logs), dtype=int)
    labels[order] = np.concatenate([[0], np.cumsum(np.diff(logs[order]) > tol_dex)]) if len(logs) else []
    return labels

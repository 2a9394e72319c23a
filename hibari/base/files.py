"""Small files written whole: a reader sees the old content or the new, never a torn write;
and the one digest of a JSON-able record (fingerprints, cache keys)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` through `path.tmp` and a rename (text as UTF-8)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def json_digest(data) -> str:
    """sha256 (hex) of `data` as JSON with sorted keys: the stable key of a record of settings
    (data stage fingerprints, the judge's and SliCK's caches)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
                          ).hexdigest()

"""Files vendored inside the installed packages (corpus, instruction data, task files), found
through `importlib.resources`, so they are read from wherever hibari is installed and never
through paths relative to the repository or the working directory."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource_path(package: str, *parts: str) -> Path:
    """The file or directory `parts` inside the installed `package` (e.g. "hibari.data")."""
    target = files(package).joinpath(*parts)
    if not isinstance(target, Path):  # only a zipped install gives something else
        raise RuntimeError(f"{package} is not installed as files on disk ({target!r}); "
                           "reinstall hibari with `pip install` (not as a zip)")
    return target

"""The layout: one import name, imports that run one way, no cycles, no private names across
rooms, and a non-editable install that works from a folder full of files named like the rooms.

Layers, lowest first (a module may import its own room and any lower layer):
    hibari.base                       errors, config files, vendored paths, segment positions
    hibari.model, hibari.data         peers: neither imports the other
    hibari.train
    hibari.align, hibari.evaluation   peers
    hibari.cli and the pipelines      (hibari.quickstart, hibari.sweep, ...)
    hibari.configs                    leaves: read by the command line, imported by no room
"""
import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("model", "data", "train", "align", "evaluation", "configs")
RANK = {"base": 0, "model": 1, "data": 1, "train": 2, "align": 3, "evaluation": 3, "top": 4,
        "configs": 5}


def source_modules(repo: Path = REPO) -> dict[str, Path]:
    """{dotted module name: file} of everything installed under `hibari`."""
    roots = {"hibari": repo / "hibari", **{f"hibari.{r}": repo / r for r in ROOMS}}
    modules = {}
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            if not (path.parent / "__init__.py").exists():
                continue  # a script beside package data (e.g. assets/build_assets.py)
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def room_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # the package's own __init__: a docstring and the version
    return parts[1] if parts[1] in ROOMS or parts[1] == "base" else "top"


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[int, str, list[str]]]:
    """[(line, imported hibari module, names taken from it)] of every import in the file,
    function-level imports included; `from pkg import sub` counts as importing pkg.sub."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0] if path.name != "__init__.py" else \
                    module.rsplit(".", node.level - 1)[0] if node.level > 1 else module
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{target}.{n}" in known]
            found += [(node.lineno, f"{target}.{n}", []) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                found.append((node.lineno, target, rest))
    return found


def owner(name: str, known: set[str]) -> str | None:
    """The hibari module that `name` (a module or a name inside one) refers to."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def layout_problems(repo: Path = REPO) -> list[str]:
    modules = source_modules(repo)
    known = set(modules)
    problems, graph = [], {m: set() for m in modules}
    for module, path in modules.items():
        mine = room_of(module)
        where = path.relative_to(repo)
        for line, target, names in imports_of(path, module, known):
            first = target.split(".")[0]
            if first in ROOMS:
                problems.append(f"{where}:{line}: `{target}` is not an import name of hibari; "
                                f"write hibari.{target}")
                continue
            if first != "hibari":
                continue
            dep = owner(target, known)
            if dep is None:
                problems.append(f"{where}:{line}: imports {target}, which is not a hibari module")
                continue
            if dep != module:
                graph[module].add(dep)
            theirs = room_of(dep)
            if theirs != mine:
                if theirs == "configs":
                    problems.append(f"{where}:{line}: imports {dep}; configs are leaves that no "
                                    "room imports")
                elif RANK[theirs] >= RANK[mine]:
                    problems.append(f"{where}:{line}: {mine} imports {dep} ({theirs}), which is "
                                    "not below it")
                for name in names:
                    if name.startswith("_"):
                        problems.append(f"{where}:{line}: imports the private name {name} from "
                                        f"{dep} ({theirs})")
    return problems + [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [sorted(component)[0]])

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way_without_cycles_or_private_names():
    problems = layout_problems()
    assert not problems, "\n".join(problems)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("case, files, expected", [
    ("upward", {"model/x.py": "from hibari.train.loop import train\n"}, "model imports hibari.train.loop"),
    ("peer", {"data/x.py": "from hibari.model import config\n"}, "data imports hibari.model.config"),
    ("bare", {"train/x.py": "import model.config\n"}, "`model.config` is not an import name"),
    ("private", {"align/x.py": "from hibari.train.loop import _secret\n"},
     "private name _secret from hibari.train.loop"),
    ("config", {"evaluation/x.py": "def f():\n    from hibari.configs.base import base_config\n"},
     "configs are leaves"),
    ("cycle", {"train/a.py": "from hibari.train import b\n",
               "train/b.py": "def f():\n    import hibari.train.a\n"},
     "import cycle: hibari.train.a -> hibari.train.b -> hibari.train.a"),
])
def test_the_walk_catches_each_kind_of_problem(tmp_path, case, files, expected):
    """Control: a small tree with one problem planted is reported, naming file and line."""
    skeleton = {"hibari/__init__.py": "", "hibari/base/__init__.py": "",
                "configs/__init__.py": "", "configs/base.py": "",
                **{f"{r}/__init__.py": "" for r in ROOMS},
                "model/config.py": "", "train/loop.py": "_secret = 1\ndef train(): pass\n"}
    problems = layout_problems(_write(tmp_path / case, {**skeleton, **files}))
    assert any(expected in p for p in problems), problems
    clean = _write(tmp_path / "clean", {**skeleton, "align/ok.py":
                                        "from hibari.train.loop import train\n"
                                        "from hibari.base import errors\n"})
    assert layout_problems(clean) == []


def test_the_distribution_installs_only_hibari():
    """The installed distribution's top-level names, and setup.py's packages: `hibari` and
    what is under it, each mapped to its folder."""
    top_level = importlib.metadata.distribution("hibari").read_text("top_level.txt")
    assert top_level.split() == ["hibari"]
    pytest.importorskip("setuptools")  # setup.py imports it (present wherever pip builds)
    sys.path.insert(0, str(REPO))
    try:
        namespace: dict = {}
        exec((REPO / "setup.py").read_text().split("\nsetup(")[0], namespace)
    finally:
        sys.path.remove(str(REPO))
    packages = namespace["PACKAGES"]
    assert {p.split(".")[0] for p in packages} == {"hibari"}
    assert set(packages) == {m for m, path in source_modules().items()
                             if path.name == "__init__.py"}


# ---------------------------------------------------------------------------------------------
# A regular (non-editable) install, used from a folder whose files shadow the room names
# ---------------------------------------------------------------------------------------------

USER_FILES = {"model.py": "WHO = 'the user'\n", "train.py": "WHO = 'the user'\n",
              "data/__init__.py": "WHO = 'the user'\n"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` (not editable) into a fresh venv that borrows this interpreter's packages
    for the dependencies; returns (venv python, venv bin, the wheel's top-level names, its
    files)."""
    root = tmp_path_factory.mktemp("install")
    # Built from a copy: pip builds in the source tree, and a stale build/ there could carry
    # deleted modules into the wheel (or this test's build would litter the checkout).
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "runs", "__pycache__", ".pytest_cache"))
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("hibari-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / Path(sysconfig.get_path("scripts")).name
    python = bin_dir / "python"
    # The dependencies come from this interpreter's site-packages, listed after the venv's own
    # (a .pth line adds a path, but the .pth files there, e.g. an editable hibari, are not run).
    venv_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], check=True, capture_output=True, text=True)
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(venv_site.stdout.strip()) / "hibari_test_deps.pth").write_text("\n".join(sorted(deps)))
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    return python, bin_dir, top, names


@pytest.mark.slow
def test_the_wheel_holds_only_hibari_and_its_vendored_files(installed):
    _, _, top, names = installed
    assert top == {"hibari"}
    for vendored in ("hibari/data/assets/corpus/en.jsonl.gz", "hibari/align/assets/seed_sft.jsonl",
                     "hibari/evaluation/tasks/piqa_sample.yaml", "hibari/configs/quickstart.py"):
        assert vendored in names


@pytest.mark.slow
def test_installed_quickstart_runs_from_a_folder_that_shadows_the_rooms(installed, tmp_path):
    python, bin_dir, _, _ = installed
    folder = _write(tmp_path / "research", USER_FILES)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
               PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    probe = subprocess.run(
        [str(python), "-c", "import hibari, hibari.model, hibari.train, hibari.align, "
         "hibari.evaluation, model, train, data; "
         "print(hibari.__file__); print(model.WHO, train.WHO, data.WHO)"],
        cwd=folder, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    hibari_file, who = probe.stdout.splitlines()
    assert Path(hibari_file).is_relative_to(python.parent.parent), hibari_file  # not the checkout
    assert who == "the user the user the user"
    # The stages through SFT read the wheel's vendored corpus, tokenizer settings and
    # instruction data; the whole pipeline (DPO, evaluation, samples) runs in test_quickstart.
    run = subprocess.run([str(bin_dir / "hibari"), "quickstart", "--out", "qs",
                          "--config", "configs/quickstart.py:ci", "--until", "sft"],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (folder / "qs" / "stages" / "sft.json").exists()
    assert "## 3. Instruction tuning (SFT)" in (folder / "qs" / "report.md").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["data", "model.py", "qs", "train.py"]

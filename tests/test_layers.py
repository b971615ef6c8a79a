"""The import rules of darkmatter/__init__.py and docs: layers, lowest first, storage <
data_pipeline < trainer < evaluation, each importing only those below it (evaluation: of the
trainer only its checkpoint-reading API and its config), the CLI and quickstart above them all,
and no import cycle at all. Every module's source is parsed (nothing is imported), imports inside
functions included, so a lazy import cannot hide an arrow."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The folders that make up the package. darkmatter/storage etc. are symlinks to the top-level
# folders: walking them again would count each module twice.
LAYER_FOLDERS = ("storage", "data_pipeline", "trainer", "evaluation")
LAYERS = ("storage", "data_pipeline", "trainer", "evaluation")  # lowest first
# What the evaluator may use of the trainer.
EVALUATION_MAY_IMPORT = ("darkmatter.trainer.checkpoint_reader", "darkmatter.trainer.config")


@dataclass(frozen=True)
class Arrow:
    source: str  # importing module, e.g. darkmatter.evaluation.harness
    target: str  # imported module (a package's __init__ is the package's name)
    file: str  # relative to the repository
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}"


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every module of the package."""
    files = [ROOT / "darkmatter" / "__init__.py", ROOT / "darkmatter" / "cli.py"]
    files += sorted((ROOT / "darkmatter" / "quickstart").rglob("*.py"))
    for folder in LAYER_FOLDERS:
        files += sorted((ROOT / folder).rglob("*.py"))
    out = {}
    for f in files:
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[0] != "darkmatter":
            parts.insert(0, "darkmatter")
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _package(module: str, file: Path) -> str:
    return module if file.name == "__init__.py" else module.rpartition(".")[0]


def _known(name: str, modules: set[str]) -> str | None:
    """The module `name` refers to: itself, or the longest known prefix (a name inside a
    module); None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def arrows() -> tuple[list[Arrow], list[Arrow]]:
    """Every import between modules of the package (module level and inside functions), and
    every import of the top-level folders by their bare names (`import trainer`)."""
    files = module_files()
    modules = set(files)
    found, bare = [], []
    for source, file in files.items():
        rel = str(file.relative_to(ROOT))
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per dot
                    pkg = _package(source, file).split(".")
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from mod import name` the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]  # fmt: skip
            for t in targets:
                if t.split(".")[0] in LAYER_FOLDERS:
                    bare.append(Arrow(source, t, rel, node.lineno))
                target = _known(t, modules)
                if target and target != source:
                    found.append(Arrow(source, target, rel, node.lineno))
    return list(dict.fromkeys(found)), bare  # `from m import a, b`: one arrow


def layer(module: str) -> str:
    """storage, data_pipeline, trainer, evaluation; or cli, quickstart, darkmatter (above)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "darkmatter"


def allowed(arrow: Arrow) -> bool:
    src, dst = layer(arrow.source), layer(arrow.target)
    if src not in LAYERS or dst == "darkmatter":  # the CLI and quickstart use everything
        return True
    if dst not in LAYERS:  # cli, quickstart: above every layer
        return False
    if src == "evaluation" and dst == "trainer":
        return arrow.target in EVALUATION_MAY_IMPORT
    return LAYERS.index(dst) <= LAYERS.index(src)


def cycles(found: list[Arrow]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for a in found:
        graph.setdefault(a.source, set()).add(a.target)
        graph.setdefault(a.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _report(title: str, lines: list[str]) -> str:
    text = f"{title}:\n" + "\n".join(f"  {ln}" for ln in lines)
    print(text)
    return text


def test_the_module_list_is_complete() -> None:
    files = module_files()
    assert {"darkmatter", "darkmatter.cli", "darkmatter.storage", "darkmatter.trainer.train",
            "darkmatter.evaluation.harness", "darkmatter.data_pipeline.transforms",
            "darkmatter.trainer.checkpoint_reader"} <= set(files)  # fmt: skip
    assert not any(".darkmatter." in m for m in files)  # no symlinked folder walked twice


def test_layers_import_only_what_is_below_them() -> None:
    found, bare = arrows()
    bad = [str(a) for a in found if not allowed(a)]
    bad += [f"{a} (import it as darkmatter.{a.target})" for a in bare]
    assert not bad, _report("forbidden imports", bad)


def test_the_evaluator_reads_the_trainer_through_its_reader_only() -> None:
    found, _ = arrows()
    used = {a.target for a in found if layer(a.source) == "evaluation" and layer(a.target) == "trainer"}  # fmt: skip
    assert "darkmatter.trainer.checkpoint_reader" in used  # the rule is about something real
    assert used <= set(EVALUATION_MAY_IMPORT), used


def test_the_rules_catch_what_they_must() -> None:
    def arrow(src: str, dst: str) -> Arrow:
        return Arrow(src, dst, "x.py", 1)

    assert not allowed(arrow("darkmatter.storage.fs", "darkmatter.data_pipeline.reader"))
    assert not allowed(arrow("darkmatter.data_pipeline.reader", "darkmatter.trainer.config"))
    assert not allowed(arrow("darkmatter.trainer.train", "darkmatter.evaluation.harness"))
    assert not allowed(arrow("darkmatter.trainer.train", "darkmatter.cli"))
    assert not allowed(arrow("darkmatter.storage", "darkmatter.quickstart.stack"))
    assert not allowed(arrow("darkmatter.evaluation.export", "darkmatter.trainer.init_from"))
    assert not allowed(arrow("darkmatter.evaluation.cli", "darkmatter.trainer"))  # its __init__
    assert allowed(arrow("darkmatter.evaluation.harness", "darkmatter.trainer.checkpoint_reader"))
    assert allowed(arrow("darkmatter.trainer.train", "darkmatter.data_pipeline.reader"))
    assert allowed(arrow("darkmatter.cli", "darkmatter.trainer.engine"))
    assert cycles([arrow("a", "b"), arrow("b", "c"), arrow("c", "a"), arrow("c", "d")]) == [
        ["a", "b", "c"]
    ]
    assert cycles([arrow("a", "b"), arrow("b", "c")]) == []


def test_no_import_cycles() -> None:
    found, _ = arrows()
    problems = []
    for component in cycles(found):
        members = set(component)
        problems.append(" <-> ".join(component))
        problems += [f"  {a}" for a in found if a.source in members and a.target in members]
    assert not problems, _report("import cycles (every arrow inside each)", problems)


def test_only_the_namespaced_package_imports(tmp_path: Path) -> None:
    """`import trainer` does not reach the project from elsewhere; `import darkmatter.trainer`
    does (the top-level folders are not importable under their bare names)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    bare = subprocess.run([sys.executable, "-c", "import trainer"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert bare.returncode != 0 and "ModuleNotFoundError" in bare.stderr, bare.stderr
    ok = subprocess.run(
        [sys.executable, "-c", "import darkmatter.trainer, darkmatter.storage; print('ok')"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr

"""The package's shape: no import cycle among minigpt4's modules, and Hydra's DictConfig/OmegaConf
only at the entry/recipe boundary (library code takes the typed settings of minigpt4/settings.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minigpt4"
# Where a composed config may appear: the Hydra glue (config.py: composition, and the one
# conversion of a composed config into typed settings) and the command line (cli.py). The recipes,
# training/ and evaluation/ take settings objects; run folders store their plain dicts.
CONFIG_BOUNDARY = {"config.py", "cli.py"}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """minigpt4 modules `path` imports, at any depth of the file (a late import is still an edge)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    for name in graph:  # a package's __init__ is imported with each of its modules: not an edge back
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not any(t.startswith("minigpt4.frontends") for t in graph["minigpt4.chat"])


def _imported_modules(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
    return found


def test_dictconfig_only_at_the_boundary():
    assert all((PACKAGE / name).is_file() for name in CONFIG_BOUNDARY)  # a renamed boundary cannot pass quietly
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in CONFIG_BOUNDARY:
            continue
        text = path.read_text()
        offenders += [f"{relative}: {word}" for word in ("DictConfig", "OmegaConf", "HydraConfig") if word in text]
        offenders += [f"{relative}: import {module}" for module in _imported_modules(text)
                      if module.split(".")[0] in ("hydra", "omegaconf")]
    assert not offenders, "library code takes typed settings (minigpt4/settings.py): " + ", ".join(offenders)

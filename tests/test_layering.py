"""The package's imports follow its layers (docs/architecture.md), and none loops.

    tools, benchmarks, entry points (megavit.pretrain, megavit.pretrain_contrastive, megavit.segment,
                                     megavit.distill, megavit.predict,
                                     megavit.run_entry)
      -> tasks -> training -> checkpointing -> models, data -> parallel -> config -> errors
    interop may use models, checkpointing, data (and what they use); never training or tasks
    planner may use training, models (and what they use); never tasks

Every import counts, also those inside functions and under `if TYPE_CHECKING:` (a lazy
import is still a dependency). The graph is read from the source with `ast`, so the test
needs nothing imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megavit"

_BASE = {"errors"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": _BASE,
    "parallel": _BASE | {"config"},
    "models": _BASE | {"config", "parallel"},
    "data": _BASE | {"config", "parallel"},
    "checkpointing": _BASE | {"config", "parallel", "models", "data"},
    "interop": _BASE | {"config", "parallel", "models", "data", "checkpointing"},
    "training": _BASE | {"config", "parallel", "models", "data", "checkpointing"},
    "tasks": _BASE | {"config", "parallel", "models", "data", "checkpointing", "training"},
    "interpret": _BASE | {"config", "parallel", "models", "data", "checkpointing"},
    "planner": _BASE | {"config", "parallel", "models", "training"},
}
ENTRY_POINTS = {"pretrain", "pretrain_contrastive", "segment", "predict", "distill",
                "run_entry"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, module: str) -> set[str]:
    """The megavit modules `path` imports (relative imports resolved)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "megavit"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "megavit":
                continue
            for a in node.names:     # `from megavit.x import y` may name a module y
                sub = f"{base}.{a.name}"
                out.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base)
    return out


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = {m for m in imports_of(path, name) if m != name}
    return graph


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, deps in graph.items():
        layer = layer_of(module)
        if layer is None or layer in ENTRY_POINTS:
            continue
        if layer not in ALLOWED:
            problems.append(f"{module}: not in any layer")
            continue
        for dep in sorted(deps):
            target = layer_of(dep)
            if target is not None and target != layer and target not in ALLOWED[layer]:
                problems.append(f"{module} -> {dep}: {layer} may not import {target}")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_imports_only_go_down_the_layers():
    assert layering_violations(import_graph()) == []


def test_no_import_loops():
    assert import_cycles(import_graph()) == []


def test_the_checker_sees_a_wrong_edge_and_a_loop():
    graph = {"megavit.models.vit": {"megavit.training.step"},
             "megavit.training.step": {"megavit.models.vit"},
             "megavit.interop.x": {"megavit.tasks.y"}, "megavit.tasks.y": set(),
             "megavit.stray": set(), "megavit.stray.a": set()}
    assert layering_violations(graph) == [
        "megavit.models.vit -> megavit.training.step: models may not import training",
        "megavit.interop.x -> megavit.tasks.y: interop may not import tasks",
        "megavit.stray: not in any layer", "megavit.stray.a: not in any layer"]
    assert import_cycles(graph) == [["megavit.models.vit", "megavit.training.step"]]


def test_tools_and_benchmarks_import_the_installed_package():
    edits = [str(p.relative_to(ROOT)) for d in ("tools", "benchmarks", "examples")
             for p in sorted((ROOT / d).glob("*.py")) if "sys.path.insert" in p.read_text()]
    assert edits == []

"""The package layout of DESIGN.md, checked on the import graph (every import statement, also the ones inside
functions): moe/ and data_prep/ are the ground floor, training/'s rooms (model, checkpoint, cluster, eval,
demo) never import the trainer above them (only the one config tree, training.config), and no module
imports itself back through a circle."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("moe", "data_prep", "training", "benchmarks")
ROOMS = ("model", "checkpoint", "cluster", "eval", "demo")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    found = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    found[_module_name(os.path.join(d, f))] = os.path.join(d, f)
    return found


def _resolve(name: str, modules: dict) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for mod, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from training import checkpoint` imports the submodule training.checkpoint
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = _resolve(name, modules)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def _room(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if parts[0] == "training" and len(parts) > 1 and parts[1] in ROOMS else None


def test_rooms_exist_and_the_trainer_is_at_the_top():
    for room in ROOMS:
        assert os.path.isfile(os.path.join(ROOT, "training", room, "__init__.py")), room
    top = {f[:-3] for f in os.listdir(os.path.join(ROOT, "training")) if f.endswith(".py")}
    assert top == {"__init__", "cli", "train", "setup_run", "validation", "stages", "data", "metrics",
                   "config", "config_sections"}, top


def test_ground_floor_never_imports_training():
    bad = [(m, t) for m, targets in import_graph().items() if m.split(".")[0] in ("moe", "data_prep")
           for t in targets if t.startswith("training")]
    assert not bad, bad


def test_rooms_do_not_import_the_trainer_above_them():
    bad = []
    for mod, targets in import_graph().items():
        if _room(mod) is None:
            continue
        for t in targets:
            if t.startswith("training") and _room(t) is None and t not in ("training", "training.config"):
                bad.append((mod, t))
    assert not bad, f"a room imports the trainer (only training.config is shared): {bad}"


def test_model_imports_no_other_room():
    bad = [(m, t) for m, targets in import_graph().items() if _room(m) == "model"
           for t in targets if _room(t) not in (None, "model")]
    assert not bad, bad


def test_checkpoint_does_not_import_cluster():
    """Saving and resuming get the process groups (and their collectives) handed in; they import nothing
    from the launch/SLURM/planner room."""
    bad = [(m, t) for m, targets in import_graph().items() if _room(m) == "checkpoint"
           for t in targets if _room(t) == "cluster"]
    assert not bad, bad


def test_no_import_circles():
    graph = import_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"modules that import each other in a circle: {circles}"

"""The package's shape: one concern per module, and an import graph without cycles (lazy imports included)."""

import ast

from htmlgen_utils.config import PACKAGE_DIR


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its code (top level or inside functions)."""
    graph = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__") or "__init__"
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x
                    edges |= {".".join(base + [alias.name]) for alias in node.names}
                else:
                    edges.add(target)
        graph[module] = {e for e in edges if e and e != module}
    names = set(graph)
    return {m: {e if e in names else e.rsplit(".", 1)[0] for e in edges} & names for m, edges in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"train", "loss", "checkpoints", "tracking", "export", "cli", "levers", "levers.decoding"} <= set(graph)
    assert find_cycle(graph) is None, find_cycle(graph)
    assert find_cycle({**graph, "loss": graph["loss"] | {"train"}}) is not None  # the check can see one


def test_the_plain_path_does_not_import_the_levers():
    graph = import_graph()
    for plain in ("model", "loss", "packing", "data", "checkpoints"):
        assert not any(e.startswith("levers") for e in graph[plain]), plain


def test_the_training_loop_reads_in_one_screen():
    source = (PACKAGE_DIR / "train.py").read_text()
    tree = ast.parse(source)
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert loop.end_lineno - loop.lineno + 1 <= 70
    assert len(source.splitlines()) <= 380  # the loop, its pieces, a whole run (one process or several)

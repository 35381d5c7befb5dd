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
    # in ruff's format (one argument a line where a call passes 120 characters): ~70 lines of the compact style
    assert loop.end_lineno - loop.lineno + 1 <= 100
    assert len(source.splitlines()) <= 480  # the loop, its pieces, a whole run (one process or several)


def entry_points() -> set[str]:
    """The package modules a user starts from: those the notebooks import, and those run with `python -m`."""
    import json

    from htmlgen_utils.config import REPO_DIR

    modules = set()
    for notebook in sorted((REPO_DIR / "notebooks").glob("0*.ipynb")):
        for cell in json.loads(notebook.read_text())["cells"]:
            source = "".join(cell["source"]) if cell["cell_type"] == "code" else ""
            lines = [  # IPython's magics and shell lines become `pass`, keeping the indentation
                line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
                for line in source.splitlines()
            ]
            for node in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("htmlgen_utils"):
                    modules.add(node.module.removeprefix("htmlgen_utils").lstrip(".") or "__init__")
                    modules |= {f"{node.module}.{a.name}".removeprefix("htmlgen_utils.") for a in node.names}
    for path in PACKAGE_DIR.rglob("*.py"):
        if 'if __name__ == "__main__":' in path.read_text():
            modules.add(".".join(path.relative_to(PACKAGE_DIR).with_suffix("").parts))
    return modules


def test_every_module_is_reached_from_a_notebook_or_a_command():
    """No module the notebooks and commands cannot reach (importing `a.b` runs `a` too): code no entry point
    runs is not product. Without the notebooks' imports, most of the package would be unreached."""
    graph = import_graph()
    for module in list(graph):  # a package's __init__ runs when any of its modules is imported
        if "." in module:
            graph[module] = graph[module] | {module.rsplit(".", 1)[0]}

    def reached(starts: set[str]) -> set[str]:
        seen, todo = set(), [m for m in starts if m in graph]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return seen

    starts = entry_points()
    assert {"pipeline", "train", "serve"} <= starts
    assert reached(starts) | {"__init__"} == set(graph), sorted(set(graph) - reached(starts))
    assert reached(starts - {m for m in starts if m in ("pipeline", "train", "serve")}) != set(graph)

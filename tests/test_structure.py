"""The package's floors, checked on every run of the suite: no import circle between modules, and
no import from a lower floor to a higher one (design.md "Layers"; the README's file map).

Every `import` and `from ... import` statement under src/instill counts, wherever it stands (at
the top, inside a function, under `if TYPE_CHECKING`): a function-level import is still a
dependency, and one that goes up or round is the same knot, only hidden. The graph is read from
the source with `ast`, so nothing is imported and no dependency is needed. A package's own
`__init__` is a module like any other (`from instill.export import X` depends on
instill/export/__init__.py unless X is a submodule); the implicit import of a parent package by
Python is not counted.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "instill"

# The floors, top first: design.md's four (entry, runs, stages, building blocks), with the order
# inside the stages and inside the building blocks written out, as the code keeps it. A module may
# import from its own floor and any floor below it; it belongs to the floor of the longest name
# below that is its own name or a package above it. A new top-level module or package needs a
# line here (test_every_module_is_on_a_floor says so).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry", ("instill.__main__", "instill.cli")),
    ("runs", ("instill.recipe", "instill.experiment", "instill.pairs")),
    # users of the stages below: reports read results, serve and chat drive the engines, export
    # writes models. `instill data inspect` is a command over data (it loads the tokenizer from
    # models/): its file is in data/, its floor is here.
    (
        "products",
        (
            "instill.report",
            "instill.serve",
            "instill.export",
            "instill.chat",
            "instill.data.inspect_data",
        ),
    ),
    ("evaluation", ("instill.eval",)),
    # the anchor prompts and the base model's replies to them: used by eval (drift suites) and by
    # the recipe's replay rows; scored with train's loss and written by infer's engine
    ("anchors", ("instill.anchors",)),
    ("engines", ("instill.train", "instill.infer")),
    ("models", ("instill.models",)),
    ("data", ("instill.data",)),
    # instill.rundir: the run directory's one owner (issue 25 item 1, another branch); it reads
    # config.yaml through config/ and models/load.py reads it, so it stands with config
    ("config", ("instill.config", "instill.rundir")),
    (
        "base",
        (
            "instill",
            "instill.home",
            "instill.atomic",
            "instill.jsonl",
            "instill.console",
            "instill.errors",
        ),
    ),
)


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = SRC) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, root: Path, known: set[str]) -> list[tuple[str, int]]:
    """(module imported, line) of every instill import in the file, relative ones resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for a in node.names:  # a submodule by name, or a name defined in `base`
                sub = f"{base}.{a.name}"
                found.append((sub if sub in known else base, node.lineno))
    mine = (f for f in dict.fromkeys(found) if f[0] == "instill" or f[0].startswith("instill."))
    return list(mine)


def import_graph(root: Path = SRC) -> dict[str, list[tuple[str, str]]]:
    """module -> [(module it imports, "file:line" of the import)], instill's modules only."""
    mods = modules(root)
    known = set(mods)
    return {
        m: [
            (t, f"{p.relative_to(root.parent.parent)}:{line}")
            for t, line in imports(p, root, known)
            if t != m
        ]
        for m, p in mods.items()
    }


def floor_of(module: str) -> tuple[int, str] | None:
    """(floor index, the declared name that placed it), 0 the top; None: on no floor. The
    package itself ("instill") holds only its own __init__, not everything below it."""
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            covers = module == n or (n != "instill" and module.startswith(n + "."))
            if covers and (best is None or len(n) > len(best[1])):
                best = (i, n)
    return best


def arrows_up(graph) -> list[str]:
    out = []
    for m, targets in sorted(graph.items()):
        for t, line in targets:
            if floor_of(m) is None or floor_of(t) is None:
                continue  # test_every_module_is_on_a_floor names it
            (a, _), (b, _) = floor_of(m), floor_of(t)
            if b < a:
                out.append(
                    f"{line}: {m} ({LAYERS[a][0]}) imports {t} ({LAYERS[b][0]}), a higher floor"
                )
    return out


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def module_circles(graph) -> list[str]:
    edges = {m: {t for t, _ in ts} for m, ts in graph.items()}
    out = []
    for comp in circles(edges):
        inside = [f"{line}: {m} -> {t}" for m in comp for t, line in graph[m] if t in comp]
        out.append("import circle: " + ", ".join(comp) + "\n    " + "\n    ".join(inside))
    return out


def component_circles(graph) -> list[str]:
    """Circles between the declared names (eval, train, data, ...), whatever modules carry them:
    two packages that import each other are one package in two folders."""
    edges: dict[str, set[str]] = defaultdict(set)
    via: dict[tuple[str, str], str] = {}
    for m, ts in graph.items():
        for t, line in ts:
            if floor_of(m) is None or floor_of(t) is None:
                continue  # test_every_module_is_on_a_floor names it
            a, b = floor_of(m)[1], floor_of(t)[1]
            if a != b:
                edges[a].add(b)
                via.setdefault((a, b), f"{line}: {m} -> {t}")
    out = []
    for comp in circles(edges):
        inside = [via[(a, b)] for a in comp for b in sorted(edges[a]) if b in comp]
        out.append("circle between " + ", ".join(comp) + "\n    " + "\n    ".join(inside))
    return out


def test_every_module_is_on_a_floor():
    missing = [m for m in modules() if floor_of(m) is None]
    assert not missing, (
        f"on no floor: {', '.join(missing)}; add each to LAYERS in tests/test_structure.py (and "
        "a line to the README's file map)"
    )


def test_no_import_goes_up_a_floor():
    found = arrows_up(import_graph())
    assert not found, "imports from a lower floor to a higher one:\n" + "\n".join(found)


def test_no_import_circle_between_modules():
    found = module_circles(import_graph())
    assert not found, "\n".join(found)


def test_no_circle_between_packages():
    found = component_circles(import_graph())
    assert not found, "\n".join(found)


def test_the_checks_see_a_circle_and_an_arrow_up(tmp_path):
    """Negative control: a tree with both faults makes the two checks speak, naming the import."""
    root = tmp_path / "src" / "instill"
    (root / "eval").mkdir(parents=True)
    (root / "data").mkdir()
    for f in ("__init__.py", "eval/__init__.py", "data/__init__.py"):
        (root / f).write_text("")
    (root / "eval" / "a.py").write_text("from instill.eval.b import B\n")
    (root / "eval" / "b.py").write_text("def f():\n    from instill.eval import a\n")
    (root / "data" / "d.py").write_text("from instill.eval.a import B\n")
    graph = import_graph(root)
    assert graph["instill.data.d"] == [("instill.eval.a", "src/instill/data/d.py:1")]
    # an import inside a function counts
    assert graph["instill.eval.b"] == [("instill.eval.a", "src/instill/eval/b.py:2")]
    (up,) = arrows_up(graph)
    assert "instill.data.d (data) imports instill.eval.a (evaluation)" in up
    (circle,) = module_circles(graph)
    assert circle.startswith("import circle: instill.eval.a, instill.eval.b")
    assert "instill.eval.b -> instill.eval.a" in circle

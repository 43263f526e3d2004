"""The shape of the front-end (issue: one owner of a step, a layering without circles):
no class in ``fsam_fused/`` (the benchmark package aside) over 250 lines, no function over
80, no import circle among its modules, nothing in ``kernels/`` or ``csrc/`` importing the
front-end, and no backend recognised by name outside ``backends/``."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "fsam_fused"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "bench" or path.name == "published.py":  # (the authors' code)
            continue
        yield path, ast.parse(path.read_text())


def test_no_class_over_250_lines_no_function_over_80():
    long = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            n = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, ast.ClassDef) and n > 250:
                long.append(f"class {path.name}:{node.name} {n} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > 80:
                long.append(f"function {path.name}:{node.name} {n} lines")
    assert not long, long


def _name(path):
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["fsam_fused", *parts])


def _imports(path, tree):
    """Package-internal modules ``path`` imports at module level or in functions."""
    me = _name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("fsam_fused"):
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                out.add(
                    full
                    if (PKG / pathlib.Path(*full.split(".")[1:])).with_suffix(".py").exists()
                    or (PKG / pathlib.Path(*full.split(".")[1:]) / "__init__.py").exists()
                    else mod
                )
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fsam_fused"))
    out.discard(me)
    return out


def test_no_import_circle():
    graph = {_name(p): _imports(p, t) for p, t in _modules()}

    # A package's __init__ re-exports its modules: an edge into a package is an edge into
    # the modules it imports, and an edge from a module to its own package's __init__ is
    # the same package; keep module-to-module edges only.
    def expand(m, seen=()):
        if m in graph and (PKG / pathlib.Path(*m.split(".")[1:]) / "__init__.py").exists():
            return (
                set().union(*(expand(x, seen + (m,)) for x in graph[m] if x not in seen))
                if graph[m]
                else set()
            )
        return {m}

    edges = {
        m: {y for x in deps for y in expand(x) if y != m}
        for m, deps in graph.items()
        if not (PKG / pathlib.Path(*m.split(".")[1:]) / "__init__.py").exists()
    }
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = 1
        for n in edges.get(m, ()):
            if state.get(n) == 1:
                cycle.append(stack[stack.index(n) :] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert not cycle, cycle


def test_kernels_and_csrc_do_not_import_the_front_end():
    for path in [*(ROOT / "kernels").rglob("*.py"), *(ROOT / "csrc").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not node.level or node.level == 1 and node.module != "..", (
                    path,
                    node.lineno,
                )
                assert not (node.module or "").startswith("fsam_fused"), (path, node.lineno)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("fsam_fused") for a in node.names), path


def test_no_backend_recognised_by_name_outside_backends():
    names = ('"triton"', '"cpp"', '"foreach"', '"reference"', "'triton'", "'cpp'")
    found = []
    for path, tree in _modules():
        if path.relative_to(PKG).parts[0] in ("backends",) or path.name == "hparams.py":
            continue  # (hparams lists the names a user may pass)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                src = ast.unparse(node)
                if any(n in src for n in names) and (".name" in src or "backend" in src):
                    found.append(f"{path.name}:{node.lineno}: {src}")
    assert not found, found

"""The package's imports run one way: no module imports (at the top or inside a function) one that
imports it back, however far round."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "twa_kernels"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from . import storage` names the module storage, not the package it sits in
            candidates = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in modules and c != name}
    return out


def graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycle(edges):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    edges = graph()
    assert "twa_kernels.construction" in edges and edges["twa_kernels.subspace"]
    found = cycle(edges)
    assert found is None, " -> ".join(found)


# The package's layers, lowest first: a module may import its own layer and the ones below, never above.
LAYERS = (
    ("packing", "quantize", "checkpoints", "distributed", "decay", "baselines", "hf_output"),
    ("backends",),
    ("placement",),
    ("parts",),
    ("construction", "storage"),
    ("subspace",),
    ("optim",),
    ("start",),
    ("integrations", "fit", "testing"),
    ("cli", "__main__", ""),
)
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def unit(module: str) -> str:
    """The top-level module or subpackage of twa_kernels a module belongs to ("" for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_runs_up_a_layer():
    edges = graph()
    placed = {unit(m) for m in edges}
    assert placed <= set(LAYER_OF), f"place these in LAYERS: {sorted(placed - set(LAYER_OF))}"
    upward = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
              if LAYER_OF[unit(b)] > LAYER_OF[unit(a)]]
    assert not upward, "imports that run up a layer: " + "; ".join(sorted(upward))


def test_the_kernel_families_stand_apart():
    """backends/rows and backends/plane never import each other; only the registry imports them, and
    the shared pieces (contract, triton_common, extension…) import neither."""
    edges = graph()
    families = ("twa_kernels.backends.rows", "twa_kernels.backends.plane")

    def family(m):
        return next((f for f in families if m == f or m.startswith(f + ".")), None)

    crossing = [f"{a} -> {b}" for a, targets in edges.items() for b in targets
                if family(b) and family(a) != family(b) and a != "twa_kernels.backends.registry"]
    assert not crossing, "; ".join(sorted(crossing))
    assert {"twa_kernels.backends.rows.triton_kernels", "twa_kernels.backends.plane.triton_kernels"} <= set(edges)

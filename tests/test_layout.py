"""The package's floors (docs/architecture.md): each folder imports only its own floor and the
ones below, no module imports itself back through others, the driver core needs no torch,
every Triton kernel lives in engine/kernels, and nothing but the command line reaches training."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "engine"

# Bottom first: a module may import its own floor and the floors below it.
FLOORS = [
    ("core", ("engine.core",)),  # requests, scheduler, block manager, policy, wire structs: no torch
    ("kernels", ("engine.kernels",)),  # every Triton kernel, one file per op
    ("models", ("engine.models",)),
    ("attention", ("engine.attention",)),  # backends and the paged KV cache
    ("spec", ("engine.spec",)),  # heads, trees, the proposer
    ("sample", ("engine.sample",)),  # sampler, acceptance rules, decision tails
    ("worker", ("engine.worker",)),  # runner, input batch, CUDA graphs, start-up timings
    ("executor", ("engine.executor",)),
    ("engine", ("engine.engine", "engine.async_engine", "engine.output_processor", "engine")),
    ("training", ("engine.training",)),
    ("entrypoints", ("engine.entrypoints",)),
]


def floor_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, module
    return best[0]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """The engine modules ``path`` imports (resolving ``from engine.x import y`` to engine.x.y
    when y is a module). ``top_level_only``: what runs at import time (not inside functions or
    ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    known = modules()
    found = set()

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not (top_level_only and nested):
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:
                    base = child.module or ""
                    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
                found.update(n for n in names if n == "engine" or n.startswith("engine."))
            visit(child, inner)

    visit(tree, False)
    found.discard(module)
    return found


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_its_floor_and_below(module):
    path = modules()[module]
    mine = floor_of(module)
    up = sorted(m for m in imports(path, module) if floor_of(m) > mine)
    assert not up, f"{module} ({FLOORS[mine][0]}) imports a higher floor: {up}"


def test_no_import_cycles():
    graph = {m: imports(p, m, top_level_only=True) for m, p in modules().items()}
    state: dict[str, int] = {}

    def walk(m, stack):
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if n not in state:
                walk(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            walk(m, [m])


def test_the_driver_core_needs_no_torch():
    for m, path in modules().items():
        if floor_of(m) == 0:
            text = path.read_text()
            assert not re.search(r"^\s*(import|from) (torch|numpy|triton)\b", text, re.M), m


def test_every_triton_kernel_lives_in_the_kernels_folder():
    for m, path in modules().items():
        if "@triton.jit" in path.read_text():
            assert m.startswith("engine.kernels."), m


def test_only_the_command_line_reaches_training():
    for m, path in modules().items():
        if not m.startswith(("engine.training", "engine.entrypoints")):
            assert not any(i.startswith("engine.training") for i in imports(path, m)), m

"""The packages' layering, read from the source (every import, at module level or inside a function): the
kernels import only torch (and Triton) and their own package, vendor libraries only where they are called;
backends import the kernels and the engine's plain data types, never the HTTP layer; and no import - even a
function-local one - closes a cycle between modules of the two packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DEPENDENCIES = {"torch", "triton", "glm_kernels"}
VENDOR_LIBRARIES = {"torch_npu", "torch_mlu", "torch_mlu_ops", "ninja"}  # imported on first call only
SERVER_DATA_TYPES = (  # what backends may import from server/: configuration, requests, the step, constraints
    "server.config",
    "server.config_schema",
    "server.engine_api",
    "server.scheduler",
    "server.structured_output",
    "server.structured_output_matcher",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in top))
            found += [(f"{node.module}.{alias.name}", id(node) in top) for alias in node.names]
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_kernels_import_only_torch_and_their_own_package():
    stdlib = set(sys.stdlib_module_names)
    wrong = []
    for path in sources("glm_kernels"):
        for name, at_top in imports(path):
            root = name.split(".")[0]
            allowed = (
                root in stdlib or root in KERNEL_DEPENDENCIES or (root in VENDOR_LIBRARIES and not at_top)
            )
            if not allowed:
                wrong.append(f"{module_name(path)} imports {name}")
    assert not wrong, wrong


def test_backends_import_only_the_engines_plain_data_types_from_server():
    wrong = []
    for path in sources("backends"):
        for name, _ in imports(path):
            if name.split(".")[0] == "server" and not name.startswith(SERVER_DATA_TYPES):
                wrong.append(f"{module_name(path)} imports {name}")
    assert not wrong, wrong


def test_no_import_cycle_between_kernel_and_backend_modules():
    modules = {module_name(p): p for package in ("glm_kernels", "backends") for p in sources(package)}
    graph = {
        name: {target for target, _ in imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }
    cycles = [component for component in strongly_connected(graph) if len(component) > 1]
    assert not cycles, cycles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [sorted(c) for c in strongly_connected(graph) if len(c) > 1] == [["a", "b", "c"]]


def test_importing_the_kernels_pulls_in_no_backend_or_server_module():
    """In a fresh interpreter: the kernels (those that need no Triton) load without the layers above them."""
    names = [module_name(p) for p in sources("glm_kernels") if "triton" not in p.name]
    code = (
        f"import importlib, sys\nfor name in {names!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'backends', 'server', 'transformers'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"

"""Layers point one way: the engine knows nothing of Triton or the wire, the client nothing of the server;
inside the engine, imports run down its layers; and no module imports itself through others.

    gemma_client -> gemma_protocol <- serving -> backend     (the Triton model uses all but gemma_client)

Checked on the source (every import statement, also those inside functions), so a lazy import
cannot hide a wrong-way dependency.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRITON_SERVER_MODULES = {"triton_python_backend_utils", "tritonclient"}
FORBIDDEN = {
    "backend": {"gemma_client", "gemma_protocol", "serving"} | TRITON_SERVER_MODULES,
    "serving": {"gemma_client", "tritonclient"},
    "client/gemma_protocol": {"gemma_client", "backend", "serving", "numpy", "torch"} | TRITON_SERVER_MODULES,
    "client/gemma_client": {"backend", "serving", "torch", "triton_python_backend_utils"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_from_the_layers_above_it(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        wrong = imported_roots(path) & FORBIDDEN[package]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


# --- the module graph ---------------------------------------------------------------------------

# Where each top-level package's modules live (a module's name is its path below the root given).
PACKAGE_ROOTS = {"backend": ROOT, "serving": ROOT, "gateway": ROOT, "benchmarks": ROOT,
                 "gemma_client": ROOT / "client", "gemma_protocol": ROOT / "client"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, root in PACKAGE_ROOTS.items():
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The repository's modules `name` imports (every import statement, also those inside functions):
    `from pkg import sub` names the submodule where one exists, else the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_module_imports_itself_through_others():
    files = module_files()
    graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
    assert import_circles(graph) == []


def test_the_request_and_config_types_import_without_torch():
    """serving/, the gateway and the Triton model import backend.params at the top of their modules;
    it must not drag torch (seconds to import, and absent from the client image) along."""
    code = "import sys, backend.params; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Inside backend/, top to bottom (docs/architecture.md): a module imports its own layer or those below.
BACKEND_LAYERS = (
    ("cli", "draft_checkpoint"),  # entry points
    ("loader",),  # resolve and check a checkpoint, start an engine
    ("default_model", "self_check", "gguf_checkpoint"),  # the packaged model, checked (runs the engine)
    ("engine",),  # the request front
    ("engine_process",),  # the core in a process of its own: the fronts' side
    ("engine_fronts",),  # the engine process's side: one core, one or more fronts
    ("engine_core",),  # scheduler + runner + the engine thread
    ("runner", "graphs", "scheduler", "kv_cache", "sampling", "grammar", "step_times", "outputs", "tokenizer",
     "te.runner", "speculative", "draft_model"),
    ("model", "weights", "te.model", "te.layers"),  # the models and their weights
    ("attention", "batch", "rope"),  # the attention backends and the step layout
    ("kernels",),  # Triton-language kernels: nothing of the engine
    ("memory", "heap"),  # what memory is free (the host's, its cgroup's, a GPU's); the collector kept off the startup heap
    ("params", "errors", "config", "te"),  # plain data; `te` only finds TransformerEngine
)


def backend_layer(module: str) -> int:
    name = module.removeprefix("backend.")
    for depth, layer in enumerate(BACKEND_LAYERS):
        if any(name == entry or name.startswith(entry + ".") and entry != "te" for entry in layer):
            return depth
    raise AssertionError(f"{module} is in no layer of BACKEND_LAYERS: place it there")


def test_backend_modules_import_only_their_layer_or_those_below():
    files = module_files()
    backend = {name: path for name, path in files.items() if name.startswith("backend.")}
    upward = [f"{name} -> {target}" for name, path in sorted(backend.items())
              for target in sorted(imported_modules(name, path, set(files)))
              if target in backend and backend_layer(target) < backend_layer(name)]
    assert upward == []

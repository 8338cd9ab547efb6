"""Layers point one way: the engine knows nothing of Triton or the wire, the client nothing of the server.

    gemma_client -> gemma_protocol <- serving -> backend     (the Triton model uses all but gemma_client)

Checked on the source (every import statement, also those inside functions), so a lazy import
cannot hide a wrong-way dependency.
"""
from __future__ import annotations

import ast
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

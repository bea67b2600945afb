"""The pure core (style.md) imports only the standard library, pydantic and itself."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

CORE = ("models", "topics", "registry", "events", "clock", "index", "texts")
PACKAGE = Path(__file__).resolve().parents[2] / "fleetmq" / "core"
ALLOWED = {"pydantic", "pydantic_core", "fleetmq"}


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_only_the_standard_library_and_pydantic(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    foreign = roots - ALLOWED - set(sys.stdlib_module_names)
    assert not foreign, f"fleetmq/core/{module}.py imports {sorted(foreign)}"
    inner = {n.module for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("fleetmq.")}
    assert inner <= {f"fleetmq.core.{m}" for m in CORE}, f"fleetmq/core/{module}.py imports {inner}"

"""Adapters use only what the core publishes for them: no underscored function,
method or class of another tokenmerge module is imported, called or referred to."""
import ast
from pathlib import Path

import pytest

import tokenmerge

PACKAGE = Path(tokenmerge.__file__).parent
ADAPTERS = sorted((PACKAGE / "adapters").glob("*.py"))


def private_names(path: Path) -> set[str]:
    """The underscored (not dunder) functions, methods and classes a module defines."""
    return {node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.name.startswith("_") and not node.name.startswith("__")}


def private_names_elsewhere(path: Path) -> dict[str, Path]:
    """Underscored names defined in tokenmerge modules other than ``path`` and not in ``path``."""
    own = private_names(path)
    found = {}
    for other in sorted(PACKAGE.rglob("*.py")):
        if other != path:
            found.update({name: other for name in private_names(other) - own})
    return found


@pytest.mark.parametrize("path", ADAPTERS, ids=[path.stem for path in ADAPTERS])
def test_an_adapter_uses_no_private_name_of_another_module(path):
    others = private_names_elsewhere(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tokenmerge")):
            assert not [alias.name for alias in node.names if alias.name.startswith("_")], (path, node.lineno)
        if isinstance(node, ast.Attribute) and node.attr in others:
            raise AssertionError(f"{path.name}:{node.lineno} uses {node.attr} of {others[node.attr].name}")


@pytest.mark.parametrize("path", ADAPTERS, ids=[path.stem for path in ADAPTERS])
def test_an_adapter_uses_the_state_and_its_passes_through_public_members_only(path):
    """``state``, ``run`` and ``self._tokenmerge_state`` are a MergeState or a Pass:
    what an adapter reads of them is public (``passes.pass_of``, ``passes.adopt``,
    ``side``, ...)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            receiver = ast.unparse(node.value)
            assert not (receiver in ("state", "run") or receiver.endswith("_tokenmerge_state")), (
                f"{path.name}:{node.lineno} uses {receiver}.{node.attr}")

"""The layout rule (README, DESIGN.md): every top-level code folder `X/` is the package `farscope.X`,
`farscope/` holds only the facade and the version, and the import directions hold: the client never
imports the server, the server never imports the client or the recipes, the shared interventions
import neither side.

These checks read the source (ast) and the packaging metadata, so they see what static tools see.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folders at the root that hold no package code: a code folder is one with an __init__.py.
NOT_CODE = {"tests", "bench", "examples", "deploy", "build", ".venv", ".git", ".ci"}


def _code_folders() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir()
                  if p.is_dir() and (p / "__init__.py").is_file() and p.name != "farscope")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_code_folder_is_the_package_of_its_name() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    folders = _code_folders()
    assert folders, "found no code folders"
    expected = {"farscope": "farscope", **{f"farscope.{name}": name for name in folders}}
    assert setuptools["package-dir"] == expected
    assert sorted(setuptools["packages"]) == sorted(expected)


def test_no_other_root_folder_holds_python_packages() -> None:
    stray = [p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in NOT_CODE
             and p.name not in _code_folders() and p.name != "farscope" and any(p.glob("*.py"))
             and not p.name.startswith(".")]
    assert not stray, f"folders with Python code that are not packages of the layout: {stray}"


def test_the_facade_folder_holds_only_the_facade_and_the_version() -> None:
    assert sorted(p.name for p in (ROOT / "farscope").glob("*.py")) == ["__init__.py", "_version.py"]
    assert not [p for p in (ROOT / "farscope").iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_the_version_is_defined_once() -> None:
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    hits = [str(path.relative_to(ROOT)) for folder in ["farscope", *_code_folders()]
            for path in (ROOT / folder).rglob("*.py") if "_pb2" not in path.name
            and any(isinstance(node, ast.Constant) and node.value == _version()
                    for node in ast.walk(ast.parse(path.read_text())))]
    assert hits == ["farscope/_version.py"], hits


def _version() -> str:
    from farscope._version import __version__

    return __version__


@pytest.mark.parametrize("folder", _code_folders())
def test_every_module_resolves_to_its_file(folder: str) -> None:
    """`farscope.X.m` is `X/m.py`: the installed package (the strict editable link tree, or a checkout's
    root) maps every file, including modules added since the install (the Makefile re-links them)."""
    for path in sorted((ROOT / folder).glob("*.py")):
        name = f"farscope.{folder}" if path.stem == "__init__" else f"farscope.{folder}.{path.stem}"
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, f"{name} does not resolve"
        assert os.path.realpath(spec.origin) == str(path.resolve()), (name, spec.origin)


def _imports(folder: str) -> dict[str, set[str]]:
    """Absolute module names each file of `folder` imports (relative imports resolved), at any depth."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = f"farscope.{folder}".rsplit(".", node.level - 1)[0]
                    base = f"{parent}.{base}" if base else parent
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def _offending(folder: str, forbidden: tuple[str, ...], *, facade: bool = False) -> list[str]:
    """Imports of `folder` from `forbidden` packages, and of the facade `farscope` (the client's public
    names) unless `facade` allows it."""
    return sorted(f"{file}: {name}" for file, names in _imports(folder).items() for name in names
                  if (name == "farscope" and not facade) or any(name == f or name.startswith(f + ".")
                                                                for f in forbidden))


def test_the_server_imports_neither_the_client_nor_the_recipes() -> None:
    assert _offending("server", ("farscope.client", "farscope.recipes")) == []


def test_the_client_does_not_import_the_server_or_the_recipes() -> None:
    assert _offending("client", ("farscope.server", "farscope.recipes")) == []


def test_the_shared_code_imports_neither_side() -> None:
    for folder in ("interventions", "proto"):
        assert _offending(folder, ("farscope.server", "farscope.client", "farscope.recipes")) == []


def test_the_recipes_use_only_the_public_client() -> None:
    assert _offending("recipes", ("farscope.server",), facade=True) == []

"""The package imports under its mapped layout and keeps the front-end independent of the back-end."""

from __future__ import annotations

import ast
import pathlib

import vhost_conformance

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_version_is_set() -> None:
    assert vhost_conformance.__version__.count(".") == 2


def test_frontend_never_imports_backend() -> None:
    offenders = []
    for path in sorted((ROOT / "frontend").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.level and (node.module or "").startswith("backend"):
                    names.append("vhost_conformance.backend")
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("vhost_conformance.backend")]
    assert offenders == []


def test_backend_imports_only_the_codec_from_frontend() -> None:
    allowed = {"vhost_conformance.frontend.protocol"}
    offenders = []
    for path in sorted((ROOT / "backend").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "vhost_conformance.frontend"
            ):
                if node.module not in allowed:
                    offenders.append(f"{path.name}: {node.module}")
            elif isinstance(node, ast.Import):
                offenders += [
                    f"{path.name}: {a.name}"
                    for a in node.names
                    if a.name.startswith("vhost_conformance.frontend") and a.name not in allowed
                ]
    assert offenders == []

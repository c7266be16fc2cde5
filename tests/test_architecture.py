"""The two import rules of docs/ARCHITECTURE.md, read from the source with ast:
the front-end never imports the back-end; a case module never imports another case module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = "vhost_conformance." + path.parent.name
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_rules_see_imports() -> None:
    """The parser finds the imports it must (so an empty result is not a vacuous pass)."""
    assert "vhost_conformance.suites.drivers.hostile" in _imports(ROOT / "suites/test_malformed.py")
    assert "vhost_conformance.frontend.protocol" in _imports(ROOT / "frontend/device.py")


def test_frontend_never_imports_backend() -> None:
    bad = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p)
                                         if m.startswith("vhost_conformance.backend"))
        for p in sorted((ROOT / "frontend").rglob("*.py"))
    }
    assert not {k: v for k, v in bad.items() if v}


def test_case_modules_never_import_case_modules() -> None:
    cases = {p.stem for p in (ROOT / "suites").glob("test_*.py")}
    bad: dict[str, list[str]] = {}
    for path in sorted((ROOT / "suites").glob("test_*.py")):
        hits = sorted(
            m for m in _imports(path)
            if m.startswith("vhost_conformance.suites.")
            and any(part in cases for part in m.split(".")[2:])
        )
        if hits:
            bad[path.name] = hits
    assert not bad, f"shared helpers belong in suites/drivers: {bad}"

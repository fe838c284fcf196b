"""The module map in README ("Development") holds: no import circle, dependencies point down, the CLI
uses only the public API, tiers never reach the facade. Read from the code's own imports (``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "ctxcache"

#: The layers of README's module map, top (CLI) to bottom. A module may import its own layer or lower.
LAYERS: dict[str, int] = {
    "ctxcache.cli": 7,
    "ctxcache.farm": 7,
    "ctxcache.__main__": 7,
    "ctxcache": 6,
    "ctxcache._doctor": 6,
    "ctxcache._detach": 1,
    "ctxcache._transfer": 6,
    "ctxcache._remove": 6,
    "ctxcache._cache": 5,
    "ctxcache._manage": 4,
    "ctxcache._explain": 4,
    "ctxcache._prune": 4,
    "ctxcache._fill": 3,
    "ctxcache._plan": 2,
    "ctxcache._trace": 0,
    "ctxcache._log": 0,
    "ctxcache._record": 0,
    "ctxcache._loader": 3,
    "ctxcache._servable": 2,
    "ctxcache._seams": 2,
    "ctxcache.tiers": 2,
    "ctxcache._key": 2,
    "ctxcache._inputs": 2,
    "ctxcache._side": 2,
    "ctxcache._compile": 2,
    "ctxcache._store": 1,
    "ctxcache._storebase": 1,
    "ctxcache._removal": 1,
    "ctxcache._housekeeping": 1,
    "ctxcache._tuf_publish": 1,
    "ctxcache._tuf": 1,
    "ctxcache._markers": 1,
    "ctxcache._negative": 1,
    "ctxcache._events": 1,
    "ctxcache._stats": 1,
    "ctxcache._probe": 1,
    "ctxcache._spawn": 0,
    "ctxcache._arch": 0,
    "ctxcache._quiet": 0,
    "ctxcache._childio": 0,
    "ctxcache._background": 2,
    "ctxcache._worker": 6,
    "ctxcache._manifest": 1,
    "ctxcache._hashing": 1,
    "ctxcache.providers": 1,
    "ctxcache.models": 1,
    "ctxcache._onnxproto": 0,
    "ctxcache._sessopts": 0,
    "ctxcache._fs": 0,
    "ctxcache._deadline": 0,
    "ctxcache._locking": 0,
    "ctxcache._fingerprint": 0,
    "ctxcache._types": 0,
    "ctxcache._config": 0,
    "ctxcache._trust": 0,
    "ctxcache._version": 0,
    "ctxcache.errors": 0,
}
PUBLIC = {"ctxcache", "ctxcache.errors", "ctxcache.models", "ctxcache.farm"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def _imports(mods: dict[str, Path], *, type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the ctxcache modules it imports (anywhere in the file; TYPE_CHECKING blocks only with
    ``type_only``)."""
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        guarded = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for n in ast.walk(block)}
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or ((id(node) in guarded) != type_only):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            edges.setdefault(name, set()).update(t for t in targets if t in mods and t != name)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    mods = _modules()
    assert _cycles(_imports(mods)) == []


def test_every_module_has_a_layer_and_imports_point_down() -> None:
    mods = _modules()
    assert all(any(m == k or m.startswith(k + ".") for k in LAYERS) for m in mods), "a module missing from the map"
    upward = [(m, t) for m, ts in _imports(mods).items() for t in ts if _layer(t) > _layer(m)]
    assert upward == []


def test_the_cli_uses_only_the_public_api() -> None:
    mods = _modules()
    for m, targets in _imports(mods).items():
        if m.startswith("ctxcache.cli"):
            private = {t for t in targets if not t.startswith("ctxcache.cli") and t not in PUBLIC}
            assert not private, (m, private)


def test_tiers_never_reach_the_facade_or_the_loader() -> None:
    mods = _modules()
    above = {"ctxcache._cache", "ctxcache._loader", "ctxcache._manage", "ctxcache._transfer", "ctxcache._doctor", "ctxcache"}
    for kind in ("runtime", "type"):
        edges = _imports(mods, type_only=kind == "type")
        for m, targets in edges.items():
            if m.startswith("ctxcache.tiers"):
                assert not (targets & above), (m, kind, targets & above)
                own = {t for t in targets if t.startswith("ctxcache.tiers")}
                if m not in ("ctxcache.tiers", "ctxcache.tiers._base"):
                    # _signing and _records are _base's own parts (it re-exports them) and import no tier
                    assert own <= {"ctxcache.tiers._base"}, (m, own)


def test_init_only_reexports_with_a_sorted_all() -> None:
    import ctxcache

    names = list(ctxcache.__all__)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(ctxcache, name) is not None, name
    tree = ast.parse((PKG / "__init__.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defined == ["__getattr__"], defined  # the lazy re-export hook, nothing else


def test_public_result_types_are_frozen() -> None:
    import dataclasses

    import ctxcache
    from ctxcache._record import Record

    # The hit path's own value objects are Records (no code generated at import: see _record.py).
    for name in ("LoadResult", "Timings", "Reason", "Config", "Bypass", "Serve", "Fallback", "Miss", "Fingerprint",
                 "GeneratedKey"):
        cls = getattr(ctxcache, name)
        assert issubclass(cls, Record) and "__dict__" not in dir(cls.__mro__[-2]), name
    reason = ctxcache.Reason("x", "y")
    try:
        reason.code = "z"  # type: ignore[misc]
        raise AssertionError("Reason is not frozen")
    except AttributeError:
        pass
    assert reason == ctxcache.Reason("x", "y") and hash(reason) == hash(ctxcache.Reason("x", "y"))
    assert reason.replace(code="z") == ctxcache.Reason("z", "y")
    for name in ("EntryInfo", "VerifyResult", "PrunePlan", "PruneReport", "PruneItem",
                 "Explanation", "Nearest", "Difference", "TierAnswer", "WarmResult", "Stats", "ExportResult",
                 "PackageExport", "ImportResult", "PushResult", "ProviderCheck", "Diagnosis"):
        cls = getattr(ctxcache, name)
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name  # type: ignore[attr-defined]


def test_the_version_lives_in_one_place() -> None:
    import ctxcache

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "ctxcache._version.__version__" in pyproject
    assert "__version__ =" not in (PKG / "__init__.py").read_text()
    hits = [p for p in PKG.rglob("*.py") if "__version__ = " in p.read_text()]
    assert [p.name for p in hits] == ["_version.py"]
    assert ctxcache.__version__ == (PKG / "_version.py").read_text().split('"')[-2]

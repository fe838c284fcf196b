"""ONNX Runtime model packages (``onnxruntime.ModelPackage``, ORT >= 1.32) as an export format and a tier.

A model package is ORT's own directory format for shipping several compiled variants of a model, one
per execution provider / device / compatibility string; ORT picks a variant at run time. ctxcache
writes one component per model and one variant per cache entry::

    manifest.json                      {"schema_version": "1.0", "components": {"conv": "conv"}, ...}
    conv/component.json                {"variants": {"qnn_cf3db923ec99": {...}}}
    conv/qnn_cf3db923ec99/             ctx.onnx, ctx_qnn.bin, ctxcache.json (the entry's manifest)

Each variant carries ``ep``, ``device``, the EP's ``compatibility_string`` (from the context model's
``ep_compatibility_info.*`` metadata), ``executor_info.ort.model_file`` and, under
``additional_metadata.ctxcache``, the same record a bundle has (key parts, SHA-256 of each file) and an
optional HMAC over the record's canonical JSON. So the package works for a plain-ORT app (without
ctxcache) and as a verified, read-only ctxcache tier.

Measured with onnxruntime 1.32.0 + onnxruntime-qnn 2.7.0 on x86 (see README, "Tiers"): ORT's variant
selection (``ModelPackageContext.select_component``) crashes the process (SIGSEGV) inside the QNN
plugin's compatibility validation whenever a variant has a ``compatibility_string``, and a variant
without ``device`` always crashed it. ctxcache itself never calls ORT's selection: as a tier it only
parses the package (``ModelPackage.open``, confined to the package root) and copies the variant whose
recorded key matches, verified, into the local cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import _fingerprint
from ._bundle import _open_regular
from ._hashing import file_digest
from ._store import MANIFEST, Entry, Store
from ._tiers import (
    TierError,
    check_signature,
    entries_matching,
    find_record,
    install,
    make_record,
    portable_manifest,
    resolve_signing_key,
    sha256_file,
    sign,
)
from .errors import BundleError

if TYPE_CHECKING:
    from ._cache import ContextCache

log = logging.getLogger("ctxcache")

PACKAGE_MANIFEST = "manifest.json"
# The entry's own manifest, renamed inside a package: ORT's package probe looks for manifest.json.
ENTRY_MANIFEST = "ctxcache.json"
_NAME_RE = re.compile(r"[^A-Za-z0-9_\-]+")


def _record_bytes(record: Any) -> bytes:
    # ORT re-serialises additional_metadata; the signature covers the canonical form, not the text.
    return _fingerprint.canonical_json(record).encode()


def _component_name(entry: Entry) -> str:
    raw = entry.manifest.get("model")
    model: dict[str, Any] = raw if isinstance(raw, dict) else {}
    stem = Path(str(model.get("name") or "model")).stem
    return _NAME_RE.sub("_", stem).strip("_") or "model"


def _device_type(entry: Entry) -> str | None:
    devices = entry.parts.get("devices")
    types = {str(d.get("type", "")).lower() for d in devices if isinstance(d, dict)} if isinstance(devices, list) else set()
    types &= {"cpu", "gpu", "npu"}
    return types.pop() if len(types) == 1 else None


@dataclass
class PackageExport:
    path: Path
    variants: dict[str, str] = field(default_factory=dict)  # key -> "component/variant"
    skipped: dict[str, str] = field(default_factory=dict)


def export_model_package(
    cache: ContextCache,
    dest: str | os.PathLike[str],
    *,
    models: Sequence[str | os.PathLike[str]] | None = None,
    provider: str | None = None,
    options: dict[str, Any] | None = None,
    keys: Sequence[str] | None = None,
    signing_key: str | bytes | None = None,
    package_name: str | None = None,
    compatibility: bool = True,
) -> PackageExport:
    """Write the selected entries as an ORT model package folder (appears by one rename).

    ``compatibility=False`` leaves out the variants' ``compatibility_string`` (ORT 1.32's selection
    crashes in the QNN plugin's validation of it on x86; on a device, keep it so ORT can rank variants).
    """
    out = Path(os.path.abspath(os.fspath(dest)))
    if out.exists():
        raise BundleError(f"{out} already exists; choose another path.", path=str(out), code="exists")
    selected = entries_matching(cache, models=models, provider=provider, options=options, keys=keys)
    if not selected:
        raise BundleError(f"no entry of {cache.root} matches the selection.", path=str(out), code="nothing_selected")
    key = resolve_signing_key(signing_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(mode=0o755)
    result = PackageExport(out)
    components: dict[str, dict[str, Any]] = {}
    try:
        for entry in selected:
            problem = cache.store.verify(entry, full=True)
            if problem is not None:
                result.skipped[entry.key] = f"{problem[0]}: {problem[1]}"
                continue
            comp = _component_name(entry)
            ep = str(entry.parts.get("ep", ""))
            vname = f"{ep.replace('ExecutionProvider', '').lower() or 'ep'}_{entry.key[:12]}"
            vdir = tmp / comp / vname
            vdir.mkdir(parents=True)
            files: dict[str, dict[str, Any]] = {}
            for art in entry.artifacts:
                dst = vdir / art["name"]
                shutil.copyfile(entry.path / art["name"], dst)
                if file_digest(dst) != art["xxh3"]:
                    raise BundleError(f"{entry.path / art['name']} changed while exporting; retry.", path=str(out), code="copy_failed")
                files[art["name"]] = {"size": dst.stat().st_size, "sha256": sha256_file(dst)}
            (vdir / ENTRY_MANIFEST).write_bytes(portable_manifest(entry))
            files[MANIFEST] = {"size": (vdir / ENTRY_MANIFEST).stat().st_size, "sha256": sha256_file(vdir / ENTRY_MANIFEST)}
            record = make_record(entry, dict(sorted(files.items())))
            meta: dict[str, Any] = {"record": record}
            if key is not None:
                meta["signature"] = sign(_record_bytes(record), key).decode()
            raw_opts = entry.parts.get("ep_options")
            ep_opts: dict[str, Any] = raw_opts if isinstance(raw_opts, dict) else {}
            variant: dict[str, Any] = {
                "ep": ep,
                "executor_info": {"ort": {
                    "model_file": "ctx.onnx",
                    # Only the binary-affecting options; machine paths (QNN's backend_path) stay out.
                    "provider_options": {k: v for k, v in ep_opts.items() if k != "backend_type"},
                }},
                "additional_metadata": {"ctxcache": meta},
            }
            device = _device_type(entry)
            if device is not None:
                variant["device"] = device
            compat = entry.manifest.get("compat")
            if compatibility and isinstance(compat, dict) and isinstance(compat.get(ep), str):
                variant["compatibility_string"] = compat[ep]
            components.setdefault(comp, {"component_name": comp, "variants": {}})["variants"][vname] = variant
            result.variants[entry.key] = f"{comp}/{vname}"
        if not components:
            raise BundleError(f"every selected entry failed verification: {result.skipped}", path=str(out), code="nothing_selected")
        for comp, body in components.items():
            (tmp / comp / "component.json").write_text(json.dumps(body, indent=1, sort_keys=True))
        from . import __version__

        manifest = {
            "schema_version": "1.0",
            "package_name": package_name or next(iter(components)),
            "components": {c: c for c in sorted(components)},
            "additional_metadata": {"producer": f"ctxcache {__version__}"},
        }
        (tmp / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def is_model_package(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if not (p / PACKAGE_MANIFEST).is_file() or (p / "index.json").exists():
        return False
    try:
        return "schema_version" in json.loads((p / PACKAGE_MANIFEST).read_bytes())
    except (OSError, ValueError):
        return False


class ModelPackageTier:
    """A read-only tier over an ORT model package written by :func:`export_model_package`.

    The package is parsed by ORT's own parser (portable layout: no absolute paths, no '..', no links
    followed); a variant is used only when its ``additional_metadata.ctxcache`` record names the key,
    and its files are verified against that record (and its signature, when a key is configured).
    """

    kind = "package"

    def __init__(self, location: str | os.PathLike[str], *, signing_key: str | bytes | None = None,
                 match: str = "exact") -> None:
        if match not in ("exact", "portable"):
            raise ValueError(f"match must be 'exact' or 'portable', not {match!r}")
        self.location = Path(os.path.abspath(os.fspath(location)))
        self._signing_key = signing_key
        self.match = match  # as for Bundle

    def __repr__(self) -> str:
        return f"ModelPackageTier({str(self.location)!r})"

    def describe(self) -> str:
        return f"model package {self.location}"

    def variants(self) -> Iterator[tuple[str, Path, dict[str, Any]]]:
        """``(variant name, variant folder, ctxcache metadata)`` for each variant ctxcache can use."""
        import onnxruntime as ort

        if not hasattr(ort, "ModelPackage"):
            raise TierError("tier_unreachable", f"onnxruntime {ort.__version__} has no ModelPackage (needs >= 1.32)")
        if not (self.location / PACKAGE_MANIFEST).is_file():
            raise TierError("tier_unreachable", f"{self.location} is not a model package")
        try:
            pkg = ort.ModelPackage.open(str(self.location), allow_external_paths=False, follow_symlinks=False)
            info = pkg.get_info()
        except Exception as e:  # ORT raises its own types for a bad manifest
            raise TierError("tier_record", f"{self.location}: ORT refused the package ({type(e).__name__}: {e})") from None
        root = os.path.realpath(self.location)
        for comp in info.get("components", []):
            for var in comp.get("variants", []):
                try:
                    meta = json.loads(var.get("additional_metadata_json") or "null")
                except ValueError:
                    continue
                if not isinstance(meta, dict) or not isinstance(meta.get("ctxcache"), dict):
                    continue
                vdir = Path(var["variant_directory"])
                if os.path.commonpath([root, os.path.realpath(vdir)]) != root:
                    raise TierError("tier_unsafe", f"{self.location}: variant {var['name']} lies outside the package")
                yield var["name"], vdir, meta["ctxcache"]

    def lookup(self, key: str, parts: Sequence[tuple[str, Any]] = ()) -> str | None:
        """``"exact"`` / ``"portable"`` when a variant holds an entry for this key, else ``None``."""
        best = None
        for _name, _vdir, meta in self.variants():
            record = meta.get("record")
            if isinstance(record, dict) and find_record({str(record.get("key")): record}, key, parts, "portable"):
                if record.get("key") == key:
                    return "exact"
                best = "portable"
        return best

    def fetch(self, store: Store, key: str, parts: Sequence[tuple[str, Any]] = ()) -> Entry | None:
        for _name, vdir, meta in self.variants():
            record = meta.get("record")
            if not isinstance(record, dict) or find_record({str(record.get("key")): record}, key, parts, self.match) is None:
                continue
            sig = meta.get("signature")
            check_signature(_record_bytes(record), sig.encode() if isinstance(sig, str) else None,
                            resolve_signing_key(self._signing_key), f"{self.describe()} variant {_name}")

            @contextmanager
            def opener(name: str, vdir: Path = vdir) -> Iterator[IO[bytes]]:
                with _open_regular(vdir / (ENTRY_MANIFEST if name == MANIFEST else name)) as f:
                    yield f

            return install(store, key, record, opener, {"tier": self.kind, "location": str(self.location)}, parts)
        return None

"""ONNX Runtime model packages (``onnxruntime.ModelPackage``, ORT >= 1.32) as an export format and a tier.

A model package is ORT's own directory format for shipping several compiled variants of a model, one
per execution provider / device / compatibility string; ORT picks a variant at run time. ctxcache
writes one component per model and one variant per cache entry::

    manifest.json                      {"schema_version": "1.0", "components": {"conv": "conv"}, ...}
    conv/component.json                {"variants": {"qnn_cf3db923ec99": {...}}}
    conv/qnn_cf3db923ec99/             ctx.onnx, ctx_qnn.bin, ctxcache.json (the entry's manifest)

Each variant carries ``ep``, ``device``, the EP's ``compatibility_string`` (from the context model's
``ep_compatibility_info.*`` metadata), ``executor_info.ort.model_file`` and, under
``additional_metadata.ctxcache``, the same record a bundle has (key parts, SHA-256 of each file), an
optional HMAC (``signature``) and optional Ed25519 signatures (``ed25519``: one line per key) over the
record's canonical JSON. The signatures cover what ctxcache acts on (the record, hence every file of the
variant and its manifest); ORT's own ``manifest.json`` / ``component.json`` fields are not covered, and
plain ORT checks no ctxcache signature. So the package works for a plain-ORT app (without
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
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import _fingerprint, _fs
from .._manifest import MANIFEST, Entry
from .._trust import SigningKey, Trust, ed25519_keys, hmac_secret
from ..errors import TierError
from ._base import (
    LocalTier,
    Match,
    Offer,
    Parts,
    check_signature,
    export_files,
    find_record,
    make_record,
    open_plain,
    read_signer_or_refuse,
    resolve_signing_keys,
    sign,
    sign_ed25519,
)

PACKAGE_MANIFEST = "manifest.json"
# The entry's own manifest, renamed inside a package: ORT's package probe looks for manifest.json.
ENTRY_MANIFEST = "ctxcache.json"
_NAME_RE = re.compile(r"[^A-Za-z0-9_\-]+")
#: What an Ed25519 signature over a variant's record is for (never valid over anything else).
CONTEXT = "package-record"


def _record_bytes(record: Any) -> bytes:
    # ORT re-serialises additional_metadata; the signature covers the canonical form, not the text.
    return _fingerprint.canonical_json(record).encode()


def _component_name(entry: Entry) -> str:
    stem = Path(entry.model_name if entry.model_name != "?" else "model").stem
    return _NAME_RE.sub("_", stem).strip("_") or "model"


def _device_type(entry: Entry) -> str | None:
    devices = entry.parts.get("devices")
    types = {str(d.get("type", "")).lower() for d in devices if isinstance(d, dict)} if isinstance(devices, list) else set()
    types &= {"cpu", "gpu", "npu"}
    return types.pop() if len(types) == 1 else None


@dataclass(frozen=True)
class PackageExport:
    """What :func:`ctxcache.export_model_package` wrote: key -> ``component/variant``, and what was left out."""

    path: Path
    variants: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    signed: bool = False
    #: the Ed25519 key ids that signed each record (``hmac-sha256`` for an HMAC)
    signed_by: tuple[str, ...] = ()


def write_package(entries: Sequence[Entry], dest: Path, *, signing_keys: Sequence[SigningKey], version: str,
                  skipped: dict[str, str], package_name: str | None, compatibility: bool) -> PackageExport:
    """Write verified ``entries`` as an ORT model package folder at ``dest`` (appears by one rename).

    ``compatibility=False`` leaves out the variants' ``compatibility_string`` (ORT 1.32's selection
    crashes in the QNN plugin's validation of it on x86; on a device, keep it so ORT can rank variants).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    tmp.mkdir(mode=0o755)
    variants: dict[str, str] = {}
    skipped = dict(skipped)
    components: dict[str, dict[str, Any]] = {}
    secret = hmac_secret(signing_keys)
    try:
        for entry in entries:
            comp = _component_name(entry)
            ep = str(entry.parts.get("ep", ""))
            vname = f"{ep.replace('ExecutionProvider', '').lower() or 'ep'}_{entry.key[:12]}"
            try:
                files = export_files(entry, tmp / comp / vname, manifest_name=ENTRY_MANIFEST)
            except OSError as e:
                _fs.remove_tree(tmp / comp / vname)
                skipped[entry.key] = f"copy_failed: {e}"
                continue
            record = make_record(entry, files)
            meta: dict[str, Any] = {"record": record}
            if secret is not None:
                meta["signature"] = sign(_record_bytes(record), secret).decode()
            if ed25519_keys(signing_keys):
                meta["ed25519"] = sign_ed25519(_record_bytes(record), signing_keys, CONTEXT).decode().splitlines()
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
            compat = entry.compat.get(ep)
            if compatibility and compat is not None:
                variant["compatibility_string"] = compat
            components.setdefault(comp, {"component_name": comp, "variants": {}})["variants"][vname] = variant
            variants[entry.key] = f"{comp}/{vname}"
        if not components:
            return PackageExport(dest, {}, skipped, False)
        for comp, body in components.items():
            (tmp / comp / "component.json").write_text(json.dumps(body, indent=1, sort_keys=True))
        manifest = {
            "schema_version": "1.0",
            "package_name": package_name or next(iter(components)),
            "components": {c: c for c in sorted(components)},
            "additional_metadata": {"producer": f"ctxcache {version}"},
        }
        (tmp / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, dest)
    finally:
        _fs.remove_tree(tmp)
    return PackageExport(dest, variants, skipped, bool(signing_keys), tuple(k.key_id or k.scheme for k in signing_keys))


def is_model_package(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if not (p / PACKAGE_MANIFEST).is_file() or (p / "index.json").exists():
        return False
    try:
        with open_plain(p / PACKAGE_MANIFEST) as f:
            return "schema_version" in json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError, TierError, TypeError):
        return False


#: More entries than any package ctxcache writes; a bigger tree is refused rather than walked for long.
_MAX_TREE = 100_000


def plain_tree(root: Path) -> None:
    """Refuse (``tier_unsafe``) a package holding anything but real folders and regular files.

    ONNX Runtime's package parser opens ``manifest.json``, each ``component.json`` and what they name
    before any signature of ours is checked, and it opens them blocking: a FIFO there would hang the
    load for good, a device or a link would be read wherever it leads. So every name under the package
    is ``lstat``-ed first (never followed, never opened).
    """
    import stat as st_

    seen = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            mode = os.lstat(folder).st_mode
            if not st_.S_ISDIR(mode):
                raise TierError(f"{folder} is not a real folder (a link?)", code="tier_unsafe")
            with os.scandir(folder) as it:
                children = [(e.name, os.lstat(e.path).st_mode) for e in it]
        except OSError as e:
            raise TierError(f"cannot read {folder}: {e.strerror or e}", code="tier_unreachable") from None
        for name, mode in children:
            seen += 1
            if seen > _MAX_TREE:
                raise TierError(f"{root} holds more than {_MAX_TREE} files; not a package ctxcache wrote",
                                code="tier_unsafe")
            if st_.S_ISDIR(mode):
                stack.append(folder / name)
            elif not st_.S_ISREG(mode):
                raise TierError(f"{folder / name} is not a regular file (a link, a FIFO or a device); the package "
                                "is not used", code="tier_unsafe")


class ModelPackageTier(LocalTier):
    """A read-only tier over an ORT model package written by :func:`ctxcache.export_model_package`.

    The package is parsed by ORT's own parser (portable layout: no absolute paths, no '..', no links
    followed); a variant is used only when its ``additional_metadata.ctxcache`` record names the key,
    and its files are verified against that record, its HMAC (when a secret is configured) and its
    signer (see :class:`~ctxcache.Bundle` for ``require_signature`` and ``trusted_dirs``).
    """

    kind = "package"

    def describe(self) -> str:
        return f"model package {self.location}"

    def variants(self) -> Iterator[tuple[str, Path, dict[str, Any]]]:
        """``(variant name, variant folder, ctxcache metadata)`` for each variant ctxcache can use."""
        import onnxruntime as ort

        if not hasattr(ort, "ModelPackage"):
            raise TierError(f"onnxruntime {ort.__version__} has no ModelPackage (needs >= 1.32)", code="tier_unreachable")
        if not (self.location / PACKAGE_MANIFEST).is_file():
            raise TierError(f"{self.location} is not a model package", code="tier_unreachable")
        plain_tree(self.location)  # before ORT's own parser opens anything in it
        try:
            pkg = ort.ModelPackage.open(str(self.location), allow_external_paths=False, follow_symlinks=False)
            info = pkg.get_info()
        except Exception as e:  # noqa: BLE001 - ORT raises its own types for a bad manifest
            raise TierError(f"{self.location}: ORT refused the package ({type(e).__name__}: {e})", code="tier_record") from None
        root = os.path.realpath(self.location)
        for comp in info.get("components", []):
            for var in comp.get("variants", []):
                try:
                    meta = json.loads(var.get("additional_metadata_json") or "null")
                except (ValueError, RecursionError):
                    continue
                if not isinstance(meta, dict) or not isinstance(meta.get("ctxcache"), dict):
                    continue
                vdir = Path(var["variant_directory"])
                if os.path.commonpath([root, os.path.realpath(vdir)]) != root:
                    raise TierError(f"{self.location}: variant {var['name']} lies outside the package", code="tier_unsafe")
                yield var["name"], vdir, meta["ctxcache"]

    def keys(self) -> list[str]:
        return sorted({str(m.get("record", {}).get("key")) for _n, _d, m in self.variants()
                       if isinstance(m.get("record"), dict)})

    def lookup(self, key: str, parts: Parts = ()) -> Match | None:
        best: Match | None = None
        for _name, _vdir, meta in self.variants():
            record = meta.get("record")
            if isinstance(record, dict) and find_record({str(record.get("key")): record}, key, parts, "portable"):
                if record.get("key") == key:
                    return "exact"
                best = "portable"
        return best

    @contextmanager
    def offer(self, key: str, parts: Parts = (), *, trust: Trust | None = None) -> Iterator[Offer | None]:
        keys = resolve_signing_keys(self._signing_key)
        for name, vdir, meta in self.variants():
            record = meta.get("record")
            if not isinstance(record, dict) or find_record({str(record.get("key")): record}, key, parts, self.match) is None:
                continue
            what = f"{self.describe()} variant {name}"
            data = _record_bytes(record)
            sig = meta.get("signature")
            secret = hmac_secret(keys)
            check_signature(data, sig.encode() if isinstance(sig, str) else None, secret, what)
            lines = meta.get("ed25519")
            blob = "\n".join(x for x in lines if isinstance(x, str)).encode() if isinstance(lines, list) else None
            signer = read_signer_or_refuse(data, blob, CONTEXT, trust if trust is not None else Trust(), what,
                                           hmac_checked=secret is not None, own=ed25519_keys(keys))

            @contextmanager
            def opener(fname: str, vdir: Path = vdir) -> Iterator[IO[bytes]]:
                with open_plain(vdir / (ENTRY_MANIFEST if fname == MANIFEST else fname)) as f:
                    yield f

            yield Offer(record, opener, {"tier": self.kind, "location": str(self.location)}, signer)
            return
        yield None

"""``doctor``: what this machine is and what the cache can do here, as data (the CLI renders it)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from . import _explain, _fs, providers
from ._cache import ContextCache
from ._config import ENV_DIR

_FLAVOURS = (
    "onnxruntime", "onnxruntime-gpu", "onnxruntime-qnn", "onnxruntime-openvino", "onnxruntime-directml",
    "onnxruntime-training", "ort-nightly", "onnx", "ctxcache",
)


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`ctxcache.diagnose` found: plain data (JSON-ready) and the problems, one line each."""

    data: dict[str, Any] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _packages() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in _FLAVOURS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def diagnose(cache: ContextCache | None = None, providers_list: Sequence[tuple[str, Mapping[str, Any]]] = (),
             *, source: str | None = None) -> Diagnosis:
    """Python, ONNX Runtime flavours, onnxruntime-qnn and its SDK, EP devices, the cache folder (where
    from, writable, free space), the key parts a load with each of ``providers_list`` would use here,
    the trust policy (trusted and revoked key ids, the app's own folders), and the cache's tiers in
    lookup order with whether each needs a signature (a bundle: who signed its index, trusted or not).
    ``source`` says where the cache folder came from."""
    cache = cache if cache is not None else ContextCache()
    problems: list[str] = []
    pkgs = _packages()
    flavours = [p for p in pkgs if (p.startswith("onnxruntime") and p != "onnxruntime-qnn") or p == "ort-nightly"]
    if len(flavours) > 1:
        problems.append(f"several ONNX Runtime flavours installed ({', '.join(flavours)}); they overwrite each "
                        "other's files: keep one (README, 'Installing with another ONNX Runtime flavour')")
    data: dict[str, Any] = {
        "python": sys.version.split()[0],
        "packages": pkgs,
        "onnxruntime": {"version": ort.__version__, "path": os.path.dirname(ort.__file__),
                        "available_providers": ort.get_available_providers()},
    }
    try:
        import onnxruntime_qnn

        info = getattr(onnxruntime_qnn, "build_and_package_info", None)
        data["onnxruntime_qnn"] = {"version": getattr(onnxruntime_qnn, "__version__", "?"),
                                   "qnn_sdk": getattr(info, "qnn_version", "?"),
                                   "library": onnxruntime_qnn.get_library_path()}
    except ImportError:
        data["onnxruntime_qnn"] = None
    # Registering QNN's plugin first makes its devices visible to get_ep_devices().
    qnn_why = providers.get("QNNExecutionProvider").unavailable_reason()
    try:
        data["ep_devices"] = [
            {"ep": d.ep_name, "vendor": d.ep_vendor, "type": str(d.device.type).rsplit(".", 1)[-1],
             "device_vendor": d.device.vendor, "metadata": dict(d.ep_metadata)}
            for d in ort.get_ep_devices()
        ]
    except Exception as e:  # noqa: BLE001 - an older ORT without the plugin-EP API; doctor reports, never fails
        data["ep_devices"] = f"unavailable: {e}"
    data["qnn"] = "available" if qnn_why is None else qnn_why
    from . import _arch

    arch = _arch.describe()
    data["architecture"] = arch
    if arch["emulated"]:
        problems.append(f"this Python runs emulated ({arch['python']} on an {str(arch['native']).upper()} machine): contexts "
                        f"it compiles are not usable by a native {str(arch['native']).upper()} Python (QNN records HTP arch 0); "
                        "install the native Python")

    root = cache.root
    existing = root
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    writable = _fs.can_write(existing)
    try:
        free: int | None = shutil.disk_usage(existing).free
    except OSError:
        free = None
    infos = cache.entries(include_broken=True)
    verdicts = cache.verdicts()
    counts: dict[str, int] = {}
    for v in verdicts.values():
        counts[v.split(":")[0]] = counts.get(v.split(":")[0], 0) + 1
    data["verdicts"] = {"entries": counts, "detail": verdicts}
    if counts.get("unsupported"):
        problems.append(f"{counts['unsupported']} entries are UNSUPPORTED on this device (a driver or SDK update?): "
                        "the next loads rebuild them; `ctxcache prune` removes them now")
    data["cache"] = {"dir": str(root), "source": source or (f"${ENV_DIR}" if os.environ.get(ENV_DIR) else "app-data default"),
                     "exists": root.exists(), "writable": writable, "free_bytes": free, "entries": len(infos),
                     "size": sum(i.size for i in infos)}
    if not writable and infos:
        # Read-only (a mount, a system image): its intact entries still serve hits; nothing can be added or changed.
        problems.append(f"the cache folder {root} is read-only here: loads of its {len(infos)} entr"
                        f"{'y' if len(infos) == 1 else 'ies'} hit, but a miss cannot compile into it (it loads the "
                        "original model: outcome bypass, cache_unwritable) and nothing can change it (no stats "
                        "recorded; prune, clear, verify --fix, warm and import cannot work); if that is not intended, "
                        "pass --cache-dir or set CTXCACHE_DIR to a writable folder")
    elif not writable:
        problems.append(f"the cache folder {root} is not writable and holds no entries: every load would bypass the "
                        "cache; pass --cache-dir or set CTXCACHE_DIR to a writable folder")
    if free is not None and free < 512 << 20:
        problems.append(f"only {free >> 20} MiB free at {existing}: compiled contexts of big models may not fit")
    keys = []
    for name, options in providers_list:
        env = cache.environment(name, options)
        keys.append({"provider": name, "parts": env if isinstance(env, dict) else None,
                     "unavailable": env if isinstance(env, str) else None})
    data["key_parts"] = keys
    trust = cache.trust
    data["trust"] = trust.as_dict()
    if trust.problem:
        problems.append(f"trust: {trust.problem}")
    problems += [f"trust: not trusted, working without it: {r}" for r in trust.refused if r not in (trust.problem or "")]
    try:
        data["tiers"] = [t.as_dict() for t in _explain.tier_report(cache.tiers, None, trust)]
    except Exception as e:  # noqa: BLE001 - a tier that cannot even be opened is a problem to report
        data["tiers"] = []
        problems.append(f"tiers: {e}")
    import importlib

    for t in data["tiers"]:  # a remote tier whose client library is missing is refused at every miss
        url = str(t.get("tier", "")).split(" ", 1)[-1]
        need = "boto3" if url.startswith("s3://") else "fsspec" if t.get("kind") == "remote" else None
        if need:
            try:
                importlib.import_module(need)
            except ImportError:
                problems.append(f"tier {url} needs {need}, which is not installed: pip install 'ctxcache[remote]'")
    data["problems"] = problems
    return Diagnosis(data, tuple(problems))

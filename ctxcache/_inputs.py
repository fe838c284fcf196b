"""What the application hands a load, checked and normalised: the model, the providers, the session options.

Bad input raises a :class:`~ctxcache.errors.CtxCacheError` here, before anything in the cache changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import onnxruntime as ort

from . import providers
from ._hashing import ModelDigest, bytes_digest, model_digest
from ._onnxproto import WireError, read_facts, read_facts_from_bytes
from ._types import ModelArg, Reason
from .errors import InvalidModelError, ModelNotFoundError, ProviderOptionError
from .providers import ExecutionProvider

ProvidersArg = Sequence[str | tuple[str, Mapping[str, Any]]] | None
Chain = list[tuple[ExecutionProvider, dict[str, str]]]


class Model(NamedTuple):
    """The model a load is for: a file (absolute path) or bytes."""

    path: Path | None
    data: bytes | None

    @property
    def source(self) -> str | bytes:
        return self.data if self.data is not None else str(self.path)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<bytes>"

    def digest(self, memo_dir: Path | None) -> ModelDigest:
        """The content digest of the model and its external data (``memo_dir``: the stat memo)."""
        if self.data is not None:
            try:
                read_facts_from_bytes(self.data)
            except WireError as e:
                raise InvalidModelError(f"<bytes> is not a valid ONNX model ({e}).", path="<bytes>", detail=str(e)) from None
            return ModelDigest(bytes_digest(self.data), (), len(self.data), False)
        assert self.path is not None
        return model_digest(self.path, memo_dir)

    def explain_failure(self, error: Exception) -> None:
        """Raise :class:`InvalidModelError` when ``error`` (ORT refusing the original model) is the model's fault."""
        try:
            if self.data is not None:
                read_facts_from_bytes(self.data)
            else:
                assert self.path is not None
                read_facts(self.path)
        except (WireError, OSError, ValueError) as bad:
            where = str(self.path) if self.path else "<bytes>"
            raise InvalidModelError(
                f"{where} is not a valid ONNX model ({bad}). Re-export it, or check that the download is complete.",
                path=where,
                detail=str(bad),
            ) from error


def resolve_model(model: ModelArg) -> Model:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return Model(None, bytes(model))
    if isinstance(model, (str, os.PathLike)):
        path = Path(os.path.abspath(os.fspath(model)))
        if not path.exists():
            raise ModelNotFoundError(f"model file not found: {path}. Check the path, or pass the model as bytes.",
                                     path=str(path))
        if not path.is_file():
            raise InvalidModelError(f"{path} is not a file. Pass the path of an .onnx model file.", path=str(path),
                                    detail="not a file")
        return Model(path, None)
    raise TypeError(f"model must be a path or bytes, not {type(model).__name__}")


def resolve_providers(providers_arg: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None) -> Chain:
    """Turn ORT's ``providers=`` / ``provider_options=`` forms into provider modules + normalised options."""
    if providers_arg is None:
        return []
    if isinstance(providers_arg, (str, bytes)):
        raise ProviderOptionError(f"providers must be a list, e.g. [{providers_arg!r}], not a string.",
                                  provider=str(providers_arg), option="providers")
    items: list[Any] = list(providers_arg)
    if provider_options is not None:
        opts_list = list(provider_options)
        if len(opts_list) != len(items):
            raise ProviderOptionError(
                f"provider_options has {len(opts_list)} item(s) for {len(items)} provider(s); give one dict per provider.",
                provider="", option="provider_options")
        if any(isinstance(p, tuple) for p in items):
            raise ProviderOptionError("pass options either as (name, options) tuples or in provider_options, not both.",
                                      provider="", option="provider_options")
        items = list(zip(items, opts_list, strict=False))
    chain: Chain = []
    for item in items:
        opts: Mapping[str, Any]
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping):
            name, opts = item[0], item[1]
        else:
            raise ProviderOptionError(f"cannot read provider entry {item!r}; use 'Name' or ('Name', {{options}}).",
                                      provider=str(item), option="")
        ep = providers.get(name)
        chain.append((ep, ep.normalize_options(opts)))
    return chain


def context_target(chain: Chain) -> Reason | None:
    """Why ``chain`` gets no cached context (outcome ``bypass``), or ``None`` when ``chain[0]`` does.

    ORT gives nodes to providers in list order: a non-compiling provider first (CPU) takes them all, so
    only a compiling, available provider at the head of the list is worth a context. One rule for
    loads, keys, ``explain`` and ``warm``.
    """
    if not chain or not chain[0][0].compiles:
        text = "no execution provider given" if not chain else f"{chain[0][0].name} comes first and compiles no context"
        return Reason("nothing_to_compile", text)
    unavailable = chain[0][0].unavailable_reason()
    if unavailable is not None:
        return Reason("provider_unavailable", unavailable)
    return None


# Session-config entries copied onto the sessions ctxcache creates. ORT has no way to list the entries
# of a SessionOptions, so the useful documented ones are copied by name; ep.context_* are left out on
# purpose (they would make ORT dump its own contexts beside ours).
_CONFIG_KEYS = (
    "session.disable_cpu_ep_fallback",
    "session.intra_op.allow_spinning",
    "session.inter_op.allow_spinning",
    "session.use_env_allocators",
    "session.disable_prepacking",
    "session.set_denormal_as_zero",
    "session.use_device_allocator_for_initializers",
    "session.intra_op_thread_affinities",
    "session.disable_quant_qdq",
    "session.enable_quant_qdq_cleanup",
    "session.qdq_matmulnbits_accuracy_level",
    "session.disable_aot_function_inlining",
    "session.dynamic_block_base",
)
_SO_ATTRS = (
    "enable_cpu_mem_arena",
    "enable_mem_pattern",
    "enable_mem_reuse",
    "enable_profiling",
    "execution_mode",
    "execution_order",
    "graph_optimization_level",
    "inter_op_num_threads",
    "intra_op_num_threads",
    "log_severity_level",
    "log_verbosity_level",
    "logid",
    "profile_file_prefix",
    "use_deterministic_compute",
    "use_per_session_threads",
)


def clone_session_options(src: ort.SessionOptions | None) -> ort.SessionOptions:
    """A fresh SessionOptions with the user's settings.

    A plugin EP is added to a SessionOptions with ``add_provider_for_devices``, which ORT refuses to
    do twice on one object; copying keeps the caller's object untouched and reusable.
    """
    dst = ort.SessionOptions()
    if src is None:
        return dst
    for attr in _SO_ATTRS:
        if hasattr(src, attr):
            try:
                setattr(dst, attr, getattr(src, attr))
            except Exception:  # noqa: BLE001 - an attribute this ORT build refuses: keep ORT's default
                pass
    for key in _CONFIG_KEYS:
        try:
            dst.add_session_config_entry(key, src.get_session_config_entry(key))
        except Exception:  # noqa: BLE001 - ORT raises when the entry is not set
            pass
    return dst


def chosen_by_policy(chain: Chain, so: ort.SessionOptions | None) -> bool:
    """The app let ORT choose (a selection policy, or providers added to its SessionOptions itself)."""
    return not chain and so is not None and bool(getattr(so, "has_providers", lambda: False)())


def session(source: str | bytes, chain: Chain, so: ort.SessionOptions | None, *, target: bool) -> ort.InferenceSession:
    """A session on ``source``: with ``target``, ``chain[0]`` set up by its provider module (plugin EPs
    need ``add_provider_for_devices``) and the rest after it; else the classic ``providers=`` list."""
    if target:
        ep, options = chain[0]
        rest = [(e.name, o) for e, o in chain[1:]]
        return ep.session(source, clone_session_options(so), options, rest)
    kw: dict[str, Any] = {"providers": [ep.name for ep, _ in chain], "provider_options": [o for _, o in chain]} if chain else {}
    return ort.InferenceSession(source, sess_options=clone_session_options(so), **kw)


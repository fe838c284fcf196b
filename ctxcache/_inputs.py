"""What the application hands a load, checked and normalised: the model, the providers, the session options.

Bad input raises a :class:`~ctxcache.errors.CtxCacheError` here, before anything in the cache changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import onnxruntime as ort

from . import _sessopts, providers
from ._hashing import ModelDigest, bytes_digest, model_digest
from ._manifest import shown
from ._onnxproto import WireError, read_facts, read_facts_from_bytes
from ._types import ModelArg, Reason
from .errors import InvalidModelError, ModelNotFoundError, ProviderOptionError, UnknownArgumentError
from .providers import ExecutionProvider

ProvidersArg = Sequence[str | tuple[str, Mapping[str, Any]]] | None
Chain = list[tuple[ExecutionProvider, dict[str, str]]]


#: What ONNX Runtime's format flag looks like: a FlatBuffer whose file identifier (bytes 4-8) is ORTM.
_ORT_FORMAT_ID = b"ORTM"


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

    @property
    def shown(self) -> str:
        """:attr:`name` for one line of a log (a tab or newline in a file name escaped)."""
        return shown(self.name)

    @property
    def ort_format(self) -> bool:
        """An ORT-format model (a FlatBuffer, ``.ort``), which no provider compiles into an EP context."""
        if self.path is not None:
            return self.path.suffix.lower() == ".ort"
        return self.data is not None and self.data[4:8] == _ORT_FORMAT_ID

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
        if self.ort_format:
            return  # not ONNX: ORT's own error is the one to see
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
    if isinstance(model, bytes):
        return Model(None, model)
    if isinstance(model, (str, os.PathLike)):
        path = Path(os.path.abspath(os.fspath(model)))
        if not path.exists():
            raise ModelNotFoundError(f"model file not found: {path}. Check the path, or pass the model as bytes.",
                                     path=str(path))
        if not path.is_file():
            raise InvalidModelError(f"{path} is not a file. Pass the path of an .onnx model file.", path=str(path),
                                    detail="not a file")
        return Model(path, None)
    # Anything else (a bytearray, a memoryview): ONNX Runtime's own answer, not a second opinion.
    ort.InferenceSession(model)  # raises its TypeError("Unable to load from type ...")
    if isinstance(model, (bytearray, memoryview)):  # pragma: no cover - an ONNX Runtime that takes them
        return Model(None, bytes(model))
    raise TypeError(f"model must be a path or bytes, not {type(model).__name__}")  # pragma: no cover


#: ``onnxruntime.InferenceSession``'s own keyword arguments (1.20-1.32), forwarded to every session
#: ctxcache creates. ONNX Runtime ignores any other name silently; ctxcache refuses it (a typo).
ORT_KWARGS = frozenset({"disabled_optimizers", "enable_fallback", "read_config_from_model"})


def check_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` when every name is one of :data:`ORT_KWARGS`, else :class:`UnknownArgumentError`."""
    for name in kwargs:
        if name not in ORT_KWARGS:
            import difflib

            accepted = sorted(ORT_KWARGS)
            close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise UnknownArgumentError(
                f"InferenceSession() got an unexpected keyword argument {name!r}{hint} Besides sess_options, "
                f"providers, provider_options and cache, it takes onnxruntime's own: {', '.join(accepted)} "
                "(onnxruntime would have ignored the name silently).",
                argument=name, accepted=accepted)
    return dict(kwargs)


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


#: Config entries that ask ONNX Runtime for work a cached context would undo (dump its own EP context,
#: share contexts across sessions); ``optimization.*`` entries change the graph a context is compiled from.
_ASKS_ORT = ("ep.context_enable", "ep.share_ep_contexts", "ep.stop_share_ep_contexts")
_CHANGES_GRAPH = "optimization."
#: The ``optimization.*`` entries ONNX Runtime documents (onnxruntime_session_options_config_keys.h):
#: what can be read back by name from options configured before ``import ctxcache``.
_GRAPH_KEYS = ("optimization.enable_gelu_approximation", "optimization.minimal_build_optimizations",
               "optimization.enable_cast_chain_elimination", "optimization.disable_specified_optimizers")
_LOAD_FORMAT = "session.load_model_format"
#: What ctxcache itself sets on a context session: ORT then fails the session with
#: ORT_MODEL_REQUIRES_COMPILATION (onnxruntime PR 24416) instead of quietly compiling what the context
#: does not cover. Nodes left to the CPU provider are not compilation (measured, ORT 1.32 + QNN 2.7).
DISABLE_COMPILE = "session.disable_model_compile"

#: Session-config entries that only steer how a session runs (threads, spinning, allocators, denormals,
#: prepacking, the CPU fallback check at session creation, diagnostics, whether ORT may compile at
#: session creation): neither keyed nor given to the compile. Every other entry an app sets may change
#: what a compile produces (QDQ handling, partitioning, function inlining, validation...), so it is part
#: of the key and the compile gets it too: a context compiled under one setting is never served under
#: another.
_RUN_TIME_CONFIG = frozenset({
    "session.intra_op.allow_spinning",
    "session.inter_op.allow_spinning",
    "session.force_spinning_stop",
    "session.dynamic_block_base",
    "session.intra_op_thread_affinities",
    "session.use_env_allocators",
    "session.use_device_allocator_for_initializers",
    "session.disable_prepacking",
    "session.set_denormal_as_zero",
    "session.disable_cpu_ep_fallback",
    "session.record_ep_graph_assignment_info",
    "session.load_model_format",
    DISABLE_COMPILE,
    "session.fail_on_suboptimal_compiled_model",
})
#: The documented entries that change what a compile produces: keyed and given to the compile.
_COMPILE_KEYS = (
    "session.disable_quant_qdq",
    "session.enable_quant_qdq_cleanup",
    "session.qdq_matmulnbits_accuracy_level",
    "session.disable_aot_function_inlining",
)
#: What is read by name from options configured before ``import ctxcache`` (ORT cannot list entries;
#: an object made afterwards has every entry noted): the entries that block a context, those that change
#: it, and the run-time ones a context session must still get.
_KNOWN_KEYS = (*_ASKS_ORT, _LOAD_FORMAT, *_GRAPH_KEYS, *_COMPILE_KEYS,
               *sorted(_RUN_TIME_CONFIG - {_LOAD_FORMAT}))
_NOT_COPIED = ("ep.context", "ep.share_ep_contexts", "ep.stop_share_ep_contexts", _sessopts.RESERVED)


def session_entries(so: ort.SessionOptions) -> dict[str, str]:
    """The config entries set on ``so`` (see ``_sessopts.config_entries``: all of them after ``import
    ctxcache``, the :data:`_KNOWN_KEYS` read once for an object made before it)."""
    return _sessopts.config_entries(so, _KNOWN_KEYS)


def cache_blocker(model: Model, so: ort.SessionOptions | None, kwargs: Mapping[str, Any]) -> Reason | None:
    """Why a load with a compiling provider must not use a cached context (outcome ``bypass``, with
    nothing written), or ``None``: an ORT-format model, or session settings that a cached context would
    ignore or make meaningless. Cheap (no I/O): it runs at every load, hits included."""
    if model.ort_format:
        return Reason("ort_format", f"{model.name} is an ORT-format model: no provider compiles it into an EP "
                                    "context (onnxruntime runs it as it is)")
    if kwargs:
        if kwargs.get("disabled_optimizers"):
            return Reason("session_settings", "disabled_optimizers changes the graph a context would be compiled from")
        from_model = kwargs.get("read_config_from_model")
    else:
        from_model = None
    if from_model is None:
        from_model = os.environ.get("ORT_LOAD_CONFIG_FROM_MODEL") == "1"
    if from_model is not True and from_model is not False:
        from_model = int(from_model) == 1  # ORT's own reading of it
    if from_model:
        return Reason("session_settings", "read_config_from_model: the session options come from the model's "
                                          "metadata, which a context model does not carry")
    if so is None:
        return None
    if so.optimized_model_filepath:
        return Reason("session_settings", f"optimized_model_filepath is set: onnxruntime writes the optimized model "
                                          f"to {so.optimized_model_filepath}, which a cached context cannot give")
    notes = _sessopts.notes(so)
    # Free-dimension overrides are noted with their values: keyed, and replayed on the compile and the
    # context session (see compile_config), so they do not block.
    calls = sorted(notes.calls - set(_sessopts.FREE_DIM_CALLS)) if notes is not None else []
    if calls:
        return Reason("session_settings", f"the session options have {', '.join(calls)}: settings "
                                          "that a cached context cannot carry (onnxruntime cannot read them back)")
    config = session_entries(so)
    if config.get(_LOAD_FORMAT, "").upper() == "ORT":
        return Reason("ort_format", f"{_LOAD_FORMAT}=ORT: an ORT-format model is not compiled into an EP context")
    for key in _ASKS_ORT:
        if config.get(key) == "1":
            return Reason("session_settings", f"{key}=1 asks onnxruntime itself for EP contexts")
    for key, value in config.items():
        if key.startswith(_CHANGES_GRAPH) and value:
            return Reason("session_settings", f"{key} changes the graph a context would be compiled from")
    return None


def compile_config(so: ort.SessionOptions | None) -> dict[str, str]:
    """What of ``so`` may change a compiled context, as one ``dict[str, str]``: a key part, the compile's
    own settings and the background worker's (``_sessopts.apply_config`` sets it on options). The
    config entries that are not run-time ones (:data:`_RUN_TIME_CONFIG`), and the free-dimension
    overrides under ``_sessopts.FREE_DIMS``. Entries of options made before ``import ctxcache`` are read
    by name (:func:`session_entries`)."""
    if so is None:
        return {}
    out = {k: v for k, v in sorted(session_entries(so).items())
           if k not in _RUN_TIME_CONFIG and not k.startswith(_NOT_COPIED) and not k.startswith(_CHANGES_GRAPH)}
    dims = _sessopts.free_dims(so)
    if dims:
        out[_sessopts.FREE_DIMS] = _sessopts.encode_free_dims(dims)
    return out


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


def clone_session_options(src: ort.SessionOptions | None, entries: Mapping[str, str] | None = None) -> ort.SessionOptions:
    """A fresh SessionOptions with the user's settings, for the sessions on a cached context.

    A plugin EP is added to a SessionOptions with ``add_provider_for_devices``, which ORT refuses to
    do twice on one object; copying keeps the caller's object untouched and reusable. Free-dimension
    overrides are replayed; what else cannot be copied (initializers...) never gets here:
    :func:`cache_blocker` makes such a load a bypass on the caller's own object. ep.context_* entries
    are left out on purpose: they would make ORT dump its own contexts beside ours. ``entries``: config
    entries of ctxcache's own, set over the user's (each key once: ORT warns on stderr when one is set
    again).
    """
    dst = ort.SessionOptions()
    if src is None:
        for key, value in (entries or {}).items():
            dst.add_session_config_entry(key, value)
        return dst
    for attr in _SO_ATTRS:
        if hasattr(src, attr):
            try:
                setattr(dst, attr, getattr(src, attr))
            except Exception:  # noqa: BLE001 - an attribute this ORT build refuses: keep ORT's default
                pass
    mine = dict(entries or {})
    for key, value in {**session_entries(src), **mine}.items():
        if not key.startswith(_NOT_COPIED) or key in mine:
            dst.add_session_config_entry(key, value)
    dims = _sessopts.free_dims(src)
    if dims:
        _sessopts.apply_config(dst, {_sessopts.FREE_DIMS: _sessopts.encode_free_dims(dims)})
    return dst


def chosen_by_policy(chain: Chain, so: ort.SessionOptions | None) -> bool:
    """The app let ORT choose (a selection policy, or providers added to its SessionOptions itself)."""
    return not chain and so is not None and bool(getattr(so, "has_providers", lambda: False)())


class Raw(NamedTuple):
    """The caller's own arguments, for sessions that must be exactly onnxruntime's."""

    model: Any
    providers: Any
    provider_options: Any


def plain_session(raw: Raw, so: ort.SessionOptions | None, kwargs: Mapping[str, Any]) -> ort.InferenceSession:
    """``onnxruntime.InferenceSession`` with the caller's own arguments and SessionOptions object: what
    a load that uses no context runs (ORT's warnings for names built for other platforms included)."""
    return ort.InferenceSession(raw.model, sess_options=so, providers=raw.providers,
                                provider_options=raw.provider_options, **kwargs)


def session(source: str | bytes, chain: Chain, so: ort.SessionOptions | None, *, target: bool,
            kwargs: Mapping[str, Any] | None = None, whole: bool = False, context: bool = False) -> ort.InferenceSession:
    """A session on ``source``: with ``target``, ``chain[0]`` set up by its provider module (plugin EPs
    need ``add_provider_for_devices``) and the rest after it, on a copy of the options (``whole``: on the
    caller's own object, for a bypass whose settings cannot be copied); else the classic ``providers=``
    list on the caller's options.

    ``context``: ``source`` is a cached EP context (a hit, or a fresh context checked before it is
    published). The copy then gets :data:`DISABLE_COMPILE`, so that a context a provider would quietly
    ignore and compile again fails the session (see :func:`context_load_reason`) instead of passing for
    a slow hit. The caller's own object is never changed."""
    kw = dict(kwargs or {})
    if target:
        ep, options = chain[0]
        rest = [(e.name, o) for e, o in chain[1:]]
        if context:
            opts = clone_session_options(so, {DISABLE_COMPILE: "1"})
        else:
            opts = (so if so is not None else ort.SessionOptions()) if whole else clone_session_options(so)
        return ep.session(source, opts, options, rest, kw)
    if chain:
        kw.update(providers=[ep.name for ep, _ in chain], provider_options=[o for _, o in chain])
    return ort.InferenceSession(source, sess_options=so, **kw)


def context_load_reason(ep: ExecutionProvider, error: Exception) -> tuple[Reason, bool]:
    """What a context session that raised ``error`` says, as the loader reports it, and whether the
    failure is transient (the device busy: retry, keep the entry). The provider classes the message
    (``load_error_kind``); ``recompiles`` is ORT_MODEL_REQUIRES_COMPILATION under :data:`DISABLE_COMPILE`:
    the provider would have compiled the model again, so the context is not what it takes here."""
    text = f"{type(error).__name__}: {error}".strip()[:2000]
    kind = ep.load_error_kind(text)
    if kind == "transient":
        return Reason("device_busy", text), True
    if kind == "recompiles":
        return Reason("context_recompiles", f"{ep.name} would compile the model again instead of loading the cached "
                                            f"context (a context it does not take, or one that covers none of its "
                                            f"nodes): {text}"), False
    note = "" if kind == "artifact" else " (not a failure the provider knows; treated as the context's)"
    return Reason("load_failed", text + note), False

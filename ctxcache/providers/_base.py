"""The one interface every execution provider module implements.

The rest of ctxcache talks to providers only through :class:`ExecutionProvider`; nothing outside
``ctxcache/providers/`` names a provider (platformdirs picks its platform module the same way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import onnxruntime as ort

from ..errors import ProviderOptionError

LoadErrorKind = Literal["transient", "artifact", "recompiles", "unknown"]

#: The key part (inside ``ep_options``) that says a provider's own cache is kept beside the entry.
SIDE_CACHE_PART = "ctxcache.side_cache"

#: ONNX Runtime's answers (``OrtCompiledModelCompatibility``), and ``unknown`` where none could be had.
Verdict = Literal["optimal", "prefer_recompilation", "unsupported", "not_applicable", "unknown"]
_VERDICTS: dict[str, Verdict] = {
    "EP_SUPPORTED_OPTIMAL": "optimal",
    "EP_SUPPORTED_PREFER_RECOMPILATION": "prefer_recompilation",
    "EP_UNSUPPORTED": "unsupported",
    "EP_NOT_APPLICABLE": "not_applicable",
}


def ort_verdict(devices: Sequence[Any], info: str) -> tuple[Verdict, str]:
    """Ask ONNX Runtime about ``info`` for ``devices``; fail soft (``unknown``) where it cannot answer."""
    if not devices:
        return "unknown", "no EP device to ask"
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        answer = C.get_model_compatibility_for_ep_devices(list(devices), info)
    except Exception as e:  # noqa: BLE001 - ORT raises where the EP cannot judge (QNN without an NPU)
        return "unknown", f"ONNX Runtime could not tell: {type(e).__name__}: {str(e)[:200]}"
    name = str(answer).rsplit(".", 1)[-1]
    return _VERDICTS.get(name, "unknown"), f"ONNX Runtime reports {name}"


def option_str(provider: str, key: str, value: Any) -> str:
    """ORT takes provider options as strings; accept the Python types users naturally write."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    raise ProviderOptionError(
        f"{provider} option {key!r} has a value of type {type(value).__name__}; "
        "pass a string, number or bool.",
        provider=provider,
        option=key,
    )


class ExecutionProvider:
    """Base class: a provider that ctxcache knows nothing special about.

    Defaults are the conservative ones: every option is assumed to change the compiled binary, the
    provider is driven through ORT's classic ``providers=`` list, and only the onnxruntime version is
    keyed. Subclasses narrow these where they know better.
    """

    name: ClassVar[str] = ""
    #: Whether this provider can produce an EP-context model worth caching.
    compiles: ClassVar[bool] = True
    #: Option names the provider accepts; ``None`` accepts anything (names are then not checked).
    known_options: ClassVar[frozenset[str] | None] = None
    #: Options that only matter at run time; excluded from the key so changing them does not recompile.
    runtime_options: ClassVar[frozenset[str]] = frozenset()
    #: Integer options and their allowed ranges (inclusive): ``True``, ``"60a"``, ``-3`` or ``10**12`` for
    #: one of them is refused before anything is written, not misread by the provider.
    int_options: ClassVar[dict[str, tuple[int, int]]] = {}
    #: Options that are 0 / 1 (a bool, 0, 1, "0" or "1").
    flag_options: ClassVar[frozenset[str]] = frozenset()
    #: Options that take one of a fixed set of words (as ORT spells them).
    choice_options: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name  # type: ignore[misc]

    # -- availability -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """``None`` when the provider can run here, else a one-line reason (outcome ``bypass``)."""
        if self.name in ort.get_available_providers():
            return None
        return f"{self.name} is not available in this onnxruntime build ({ort.get_available_providers()})"

    # -- options ------------------------------------------------------------------------------
    def normalize_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in options.items():
            if not isinstance(key, str):
                raise ProviderOptionError(
                    f"{self.name} option names must be strings, got {key!r}.", provider=self.name, option=str(key)
                )
            if self.known_options is not None and key not in self.known_options:
                import difflib  # only for the error message

                close = difflib.get_close_matches(key, sorted(self.known_options), n=1, cutoff=0.8)
                if close:
                    raise ProviderOptionError(
                        f"unknown {self.name} option {key!r}; did you mean {close[0]!r}? "
                        "ONNX Runtime would silently ignore it.",
                        provider=self.name,
                        option=key,
                    )
            out[key] = self._typed(key, value)
        self.validate_options(out)
        return dict(sorted(out.items()))

    def _typed(self, key: str, value: Any) -> str:
        """The option's value as ORT takes it (a string), checked against :attr:`int_options`,
        :attr:`flag_options` and :attr:`choice_options` first: the one rule for every provider's typed
        options."""
        if key in self.int_options:
            low, high = self.int_options[key]
            text = value.strip() if isinstance(value, str) else value
            ok = (isinstance(text, int) and not isinstance(text, bool)) or (
                isinstance(text, str) and text.lstrip("-").isdigit() and len(text) < 20)
            if not ok:
                raise ProviderOptionError(f"{self.name} option {key!r} must be a whole number from {low} to {high}, "
                                          f"got {value!r}.", provider=self.name, option=key)
            number = int(text)
            if not low <= number <= high:
                raise ProviderOptionError(f"{self.name} option {key!r} must be from {low} to {high}, got {number}.",
                                          provider=self.name, option=key)
            return str(number)
        if key in self.flag_options:
            # True == 1 and False == 0 as dict keys: bools and 0/1 ints map alike; 2 or "yes" map to nothing.
            flag = {1: "1", 0: "0", "1": "1", "0": "0"}.get(
                value.strip() if isinstance(value, str) else value) if isinstance(value, (bool, int, str)) else None
            if flag is None:
                raise ProviderOptionError(f"{self.name} option {key!r} must be 0 or 1 (or a bool), got {value!r}.",
                                          provider=self.name, option=key)
            return flag
        text = option_str(self.name, key, value)
        allowed = self.choice_options.get(key)
        if allowed is not None and text not in allowed:
            raise ProviderOptionError(f"{self.name} option {key!r} must be one of {', '.join(allowed)}, got {value!r}.",
                                      provider=self.name, option=key)
        return text

    def validate_options(self, options: dict[str, str]) -> None:
        """Raise :class:`ProviderOptionError` for values the provider would reject or misread."""

    def binary_options(self, options: dict[str, str]) -> dict[str, str]:
        out = {k: v for k, v in options.items() if k not in self.runtime_options}
        side = self.side_cache_layout(options)
        if side:
            # Where the provider's own cache lives is never keyed (ctxcache points it into the key's folder,
            # so two apps with other paths share one entry); that one is kept, and which, is.
            out[SIDE_CACHE_PART] = ",".join(sorted(side.values()))
        return out

    # -- the provider's own caches ------------------------------------------------------------
    def side_cache_layout(self, options: Mapping[str, str]) -> dict[str, str]:
        """The provider's own caches ``options`` turn on, as ``{path option: subfolder}`` (OpenVINO's
        ``cache_dir``, TensorRT's engine and timing caches); ``{}`` for none. ctxcache points each path
        option at that subfolder of the key's side folder (``Store.side_dir``), so no two models or option
        sets share one, and the folder is counted, pruned and quarantined with the key's entry."""
        return {}

    def side_cache_options(self, options: Mapping[str, str], folder: Path) -> dict[str, str]:
        """``options`` with each cache path of :meth:`side_cache_layout` pointed into ``folder`` (the
        key's side folder): the user's own path is dropped. The key is unchanged by this rewrite."""
        out = dict(options)
        for option, sub in self.side_cache_layout(options).items():
            out[option] = str(folder / sub)
        return out

    def without_side_cache(self, options: Mapping[str, str]) -> dict[str, str]:
        """``options`` with the provider's own caches turned off: what a session gets when ctxcache cannot
        give them a folder of their own (the provider then rebuilds at every launch, never shares)."""
        return {k: v for k, v in options.items() if k not in self.side_cache_layout(options)}

    # -- key parts ----------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        return {}

    def library_files(self, options: dict[str, str]) -> list[Path]:
        """Native libraries whose content is part of the key (a side-loaded SDK update invalidates)."""
        return []

    def device_identity(self, options: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The devices the context is built for. ``options`` matter where they pick a device (``device_id``)."""
        return []

    # -- compiling ----------------------------------------------------------------------------
    def compile_context(self, so: ort.SessionOptions, source: str | bytes, out: Path, options: dict[str, str],
                        level: ort.GraphOptimizationLevel, embed: bool) -> bool:
        """Write the EP-context model ``out`` (and its binaries beside it) another way than ``ModelCompiler``.

        Returns ``False`` (the default) to let ctxcache use ONNX Runtime's compile API with
        :meth:`configure`. Providers that ``SessionOptions.add_provider`` does not take (built-in ones
        such as TensorRT) produce the context with a session instead and return ``True``. Raise with
        "Unable to compile any nodes" in the message when the provider took no node.
        """
        return False

    # -- plugin EPs ---------------------------------------------------------------------------
    #: The package module of a plugin EP (``onnxruntime_qnn``...), set by subclasses that find one.
    #: A plugin's library must be registered with ONNX Runtime, and the provider is added per device.
    _plugin: Any = None
    _registered: bool = False
    _devices: list[Any] | None = None

    def _ensure_registered(self) -> None:
        if self._registered or self._plugin is None:
            return
        # The app may have registered the library itself (under any registration name): then the
        # devices are already there and a second registration would fail.
        if not any(d.ep_name == self.name for d in ort.get_ep_devices()):
            try:
                ort.register_execution_provider_library(self.name, self._plugin.get_library_path())
            except Exception as e:  # ORT raises its own Fail, which derives from Exception only
                if "already registered" not in str(e):
                    raise
        self._registered = True

    def devices(self) -> list[Any]:
        """The ORT EP devices of a plugin provider (registering its library first); ``[]`` otherwise.

        Listed once per process once there are some: a registered library's devices do not change while
        the process runs, and listing them again cost every hit ~0.1-0.3 ms (two lists per load)."""
        if self._plugin is None:
            return []
        if self._devices:
            return self._devices
        self._ensure_registered()
        self._devices = [d for d in ort.get_ep_devices() if d.ep_name == self.name]
        return self._devices

    def _plugin_unavailable(self, package: str, no_device: str) -> str | None:
        """The availability rule of a plugin EP: ``None`` when its library registers and lists a device."""
        try:
            if self.devices():
                return None
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail: report it, never raise
            return f"{package} is installed but its library failed to register: {e}"
        return f"{package} is installed but {no_device}"

    # -- sessions -----------------------------------------------------------------------------
    def configure(self, so: ort.SessionOptions, options: dict[str, str]) -> None:
        """Add this provider to ``so`` for compiling (``ModelCompiler`` reads providers from ``so``)."""
        if self._plugin is not None:
            so.add_provider_for_devices(self.devices(), options)
        else:
            so.add_provider(self.name, options)

    def session(self, model: str | bytes, so: ort.SessionOptions, options: dict[str, str],
                rest: list[tuple[str, dict[str, str]]], kwargs: Mapping[str, Any] | None = None) -> ort.InferenceSession:
        """A session on ``model`` with this provider first and ``rest`` after it, as the user listed them;
        ``kwargs``: onnxruntime's own keyword arguments (``disabled_optimizers``...), passed through."""
        kw = dict(kwargs or {})
        if self._plugin is not None:
            # A plugin EP lives in the session options (the classic providers= list would silently
            # run on CPU); ORT appends CPU itself, so a trailing CPUExecutionProvider needs nothing.
            # Options that already have it (the caller's own object, set up at an earlier bypass) keep it.
            if not so.has_providers():
                self.configure(so, options)
            return ort.InferenceSession(model, sess_options=so, **kw)
        names = [self.name] + [n for n, _ in rest]
        opts = [options] + [o for _, o in rest]
        return ort.InferenceSession(model, sess_options=so, providers=names, provider_options=opts, **kw)

    #: How a failed context load reads, per provider: (kind, substring) checked in order. ``transient``:
    #: the device was busy or short of memory, the entry is fine (retried, then the original model is
    #: served and the entry kept); ``artifact``: the context itself is wrong here (invalidated and rebuilt);
    #: ``recompiles``: the provider would compile the model again rather than load the context (ORT's
    #: ORT_MODEL_REQUIRES_COMPILATION under session.disable_model_compile=1, set on every context session),
    #: a fault of the context too. Anything else is ``unknown`` and treated as an artifact fault (the
    #: conservative answer), and counted.
    load_errors: ClassVar[tuple[tuple[LoadErrorKind, str], ...]] = (
        ("recompiles", "MODEL_REQUIRES_COMPILATION"),
        ("transient", "out of memory"),
        ("transient", "ENGINE_ERROR"),
        ("artifact", "InvalidProtobuf"),
        ("artifact", "INVALID_PROTOBUF"),
        ("artifact", "InvalidGraph"),
        ("artifact", "INVALID_GRAPH"),
        ("artifact", "not compatible with any execution provider"),
    )

    def load_error_kind(self, message: str) -> LoadErrorKind:
        """What a context load that raised ``message`` says about the entry (see :attr:`load_errors`)."""
        for kind, text in self.load_errors:
            if text.lower() in message.lower():
                return kind
        return "unknown"

    def compatibility(self, info: str) -> tuple[Verdict, str]:
        """ONNX Runtime's verdict on a context with this compatibility string for this provider's devices,
        asked without creating a session (``GetModelCompatibilityForEpDevices``), and a one-line detail.

        ``"unknown"`` when nobody can tell here: no devices to ask about, or the EP raises (QNN on x86
        wants an NPU device). Subclasses that must not be asked in some state override this.
        """
        return ort_verdict(self.devices(), info)

"""Drives ONNX Runtime's compile API: original model in, EP-context model + binaries out."""

from __future__ import annotations

import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnxruntime as ort

from . import _fs, _sessopts
from ._manifest import CONTEXT, MANIFEST
from ._store import context_problem
from .providers import ExecutionProvider


class NothingCompiled(Exception):
    """The provider took no node of the model: caching would only save a CPU graph (outcome bypass)."""


class CompileFailed(Exception):
    """The provider failed to compile a model it claimed; the message says why."""


def compile_into(
    staging: Path,
    source: str | bytes,
    provider: ExecutionProvider,
    options: dict[str, str],
    level: ort.GraphOptimizationLevel,
    embed: bool,
    log_severity: int,
    config: Mapping[str, str] | None = None,
) -> float:
    """Compile ``source`` for ``provider`` into ``staging/ctx.onnx`` (+ binaries); returns seconds.
    ``config``: what of the app's session options may change the result (``_inputs.compile_config``:
    config entries and free-dimension overrides; they are in the key too)."""
    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    _sessopts.apply_config(so, config or {})
    start = time.perf_counter()
    try:
        # Providers that SessionOptions.add_provider does not take write the context their own way.
        if not provider.compile_context(so, source, staging / CONTEXT, options, level, embed):
            provider.configure(so, options)
            start = time.perf_counter()
            # ORT_ENABLE_ALL matters: ModelCompiler defaults to DISABLE_ALL, which leaves constant subgraphs
            # unfolded: measured 83 s instead of 0.26 s for light_squeezenet, and an unloadable context.
            compiler = ort.ModelCompiler(
                so,
                source,
                embed_compiled_data_into_model=embed,
                graph_optimization_level=level,
                flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED,
            )
            compiler.compile_to_file(str(staging / CONTEXT))
    except Exception as e:  # ORT's exceptions derive from Exception only
        text = str(e)
        hint = open_dimensions_hint(source, provider.name, config or {})
        if "Unable to compile any nodes" in text:
            raise NothingCompiled(f"{provider.name} compiled no node of this model" + (f": {hint}" if hint else "")) from e
        raise CompileFailed(f"{type(e).__name__}: {text}" + (f" ({hint})" if hint else "")) from e
    seconds = time.perf_counter() - start
    check_output(staging)
    return seconds


def check_output(folder: Path) -> None:
    """The compiled (or fetched) model must be a context model whose binaries stay inside its folder."""
    files = {name for name, st in _fs.iter_children(folder) if stat.S_ISREG(st.st_mode)} - {MANIFEST}
    if CONTEXT not in files:
        raise CompileFailed(f"the compiler wrote no {CONTEXT}")
    problem = context_problem(folder, files)
    if problem is not None:
        raise CompileFailed(problem.message)


def open_dimensions(source: str | bytes, overrides: Sequence[_sessopts.FreeDim]) -> list[tuple[str, int, str, str]]:
    """The graph inputs' dimensions that neither a size nor an override fixes, as (input name, index,
    symbolic name or "", denotation or ""). Read with onnx without external data, on the failure path only."""
    import onnx

    try:
        model = (onnx.load_model_from_string(source) if isinstance(source, bytes)
                 else onnx.load_model(source, load_external_data=False))
    except Exception:  # noqa: BLE001 - a model onnx cannot read: no hint, ORT's error stands
        return []
    by_name = {ident for kind, ident, _ in overrides if kind == "name"}
    by_denotation = {ident.upper() for kind, ident, _ in overrides if kind == "denotation"}
    initializers = {t.name for t in model.graph.initializer}
    out = []
    for inp in model.graph.input:
        if inp.name in initializers or not inp.type.HasField("tensor_type") or not inp.type.tensor_type.HasField("shape"):
            continue
        for i, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if dim.dim_param in by_name or (dim.denotation and dim.denotation.upper() in by_denotation):
                continue
            out.append((inp.name, i, dim.dim_param, dim.denotation))
    return out


def open_dimensions_hint(source: str | bytes, provider: str, config: Mapping[str, str]) -> str:
    """Why a compile may have failed when the model's inputs have open dimensions, naming each and the
    fix; ``""`` when every input dimension is fixed."""
    try:
        overrides = _sessopts.decode_free_dims(config[_sessopts.FREE_DIMS]) if _sessopts.FREE_DIMS in config else []
    except ValueError:
        overrides = []
    dims = open_dimensions(source, overrides)
    if not dims:
        return ""
    named = [f"input {name!r} dim {i} {sym!r}" if sym else f"input {name!r} dim {i} (unnamed{', ' + den if den else ''})"
             for name, i, sym, den in dims[:8]]
    more = f" and {len(dims) - 8} more" if len(dims) > 8 else ""
    symbol = next((sym for _, _, sym, _ in dims if sym), None)
    denotation = next((den for _, _, sym, den in dims if not sym and den), None)
    if symbol is not None:
        fix = (f"fix them with SessionOptions.add_free_dimension_override_by_name({symbol!r}, 1) (set after "
               f"`import ctxcache`), or `ctxcache warm --free-dim {symbol}=1`")
    elif denotation is not None:
        fix = (f"fix them with SessionOptions.add_free_dimension_override_by_denotation({denotation!r}, 1), or "
               f"`ctxcache warm --free-dim-denotation {denotation}=1`")
    else:
        fix = "re-export the model with fixed input sizes (its open dimensions have no name to override)"
    return (f"the model's inputs have open dimensions ({'; '.join(named)}{more}), which {provider} cannot compile; "
            f"{fix}")

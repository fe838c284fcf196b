"""Drives ONNX Runtime's compile API: original model in, EP-context model + binaries out."""

from __future__ import annotations

import time
from pathlib import Path

import onnxruntime as ort

from ._onnxproto import WireError, read_facts
from ._store import CONTEXT, safe_name
from .providers import ExecutionProvider


class NothingCompiled(Exception):
    """The provider took no node of the model: caching would only save a CPU graph (outcome bypass)."""


class CompileFailed(Exception):
    """The provider failed to compile a model it claimed; ``reason`` says why."""


def compile_into(
    staging: Path,
    source: str | bytes,
    provider: ExecutionProvider,
    options: dict[str, str],
    level: ort.GraphOptimizationLevel,
    embed: bool,
    log_severity: int,
) -> float:
    """Compile ``source`` for ``provider`` into ``staging/ctx.onnx`` (+ binaries); returns seconds."""
    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    start = time.perf_counter()
    try:
        # Providers that SessionOptions.add_provider does not take write the context their own way.
        if not provider.compile_context(so, source, staging / CONTEXT, options, level, embed):
            provider.configure(so, options)
            start = time.perf_counter()
            # ORT_ENABLE_ALL matters: ModelCompiler defaults to DISABLE_ALL, which leaves constant subgraphs
            # unfolded; measured 83 s instead of 0.26 s and an unloadable context (FIELD-NOTES).
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
        if "Unable to compile any nodes" in text:
            raise NothingCompiled(text) from e
        raise CompileFailed(f"{type(e).__name__}: {text}") from e
    seconds = time.perf_counter() - start
    _check_output(staging)
    return seconds


def _check_output(staging: Path) -> None:
    """The compiled model must be a context model whose binaries stay inside its entry.

    A context model's ``ep_cache_context`` is a path that ORT opens relative to the model; one that
    is absolute or climbs out with '..' would make a cached entry read files elsewhere.
    """
    ctx = staging / CONTEXT
    if not ctx.is_file():
        raise CompileFailed(f"the compiler wrote no {CONTEXT}")
    try:
        facts = read_facts(ctx, ep_context=True)
    except (WireError, OSError) as e:
        raise CompileFailed(f"the compiled model is unreadable: {e}") from e
    if not facts.ep_context_nodes:
        raise CompileFailed("the compiled model has no EPContext node")
    for node in facts.ep_context_nodes:
        if node.embed_mode == 0:
            name = node.cache_context.decode("utf-8", errors="replace")
            if not safe_name(name) or not (staging / name).is_file():
                raise CompileFailed(f"EPContext node points to {name!r}, which is not a file inside the entry")

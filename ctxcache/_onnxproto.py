"""A minimal, streaming reader of the ONNX protobuf wire format.

Why not ``onnx.load``: importing onnx costs ~100 ms and loading a multi-GB ModelProto costs its size in
memory. ctxcache only needs three facts from a model file: that it *is* a ModelProto, which external-data
files its tensors reference, and (for a context model) which files its EPContext nodes reference.
Walking the wire format over an ``mmap`` answers those without copying tensor payloads, so memory stays
flat whatever the model's size.

Field numbers come from onnx/onnx.proto3 (stable since IR version 3).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

# Wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# Which length-delimited fields of which message hold messages worth descending into.
_MODEL_GRAPH, _MODEL_METADATA, _MODEL_FUNCTIONS, _MODEL_IR_VERSION = 7, 14, 25, 1
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 4, 5, 7
_ATTR_NAME, _ATTR_I, _ATTR_S, _ATTR_T, _ATTR_G = 1, 3, 4, 5, 6
_ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_FUNCTION_NODE = 7
_ENTRY_KEY, _ENTRY_VALUE = 1, 2

_MAX_DEPTH = 64  # nested subgraphs deeper than this are malformed or hostile


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


class EPContextNode:
    """What ctxcache needs to know about one EPContext node of a compiled model."""

    __slots__ = ("cache_context", "embed_mode", "main_context", "partition_name", "source")

    def __init__(self) -> None:
        self.source = ""
        self.embed_mode = 1
        #: 0 for the further partitions of a context whose binary the main node holds (QNN writes one
        #: .bin for a model it compiles in several parts; the other nodes name no file)
        self.main_context = 1
        self.cache_context = b""  # a file name when embed_mode == 0, else the binary itself (not kept)
        self.partition_name = ""


class ModelFacts:
    """The few facts ctxcache reads from a model file (plain classes: they are on every hit's import)."""

    __slots__ = ("ep_context_nodes", "external_locations", "has_graph", "ir_version", "metadata")

    def __init__(self) -> None:
        self.ir_version = 0
        self.has_graph = False
        self.external_locations: set[str] = set()
        self.metadata: dict[str, str] = {}
        self.ep_context_nodes: list[EPContextNode] = []


def _varint(buf: memoryview | bytes | mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def _fields(buf: memoryview | bytes | mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field_number, wire_type, a, b)``: for varints a is the value; for LEN, [a, b) is the span."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, 0
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise WireError("length-delimited field runs past its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:
            # Groups (3, 4) and 6, 7 never appear in ONNX files; treat them as corruption.
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("field runs past its message")


def _string(buf: memoryview | bytes | mmap.mmap, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


class _Walker:
    def __init__(self, buf: memoryview | bytes | mmap.mmap, want_ep_context: bool) -> None:
        self.buf = buf
        self.facts = ModelFacts()
        self.want_ep_context = want_ep_context

    def model(self, a: int, b: int) -> None:
        for num, wire, x, y in _fields(self.buf, a, b):
            if num == _MODEL_IR_VERSION and wire == _VARINT:
                self.facts.ir_version = x
            elif wire != _LEN:
                continue
            elif num == _MODEL_GRAPH:
                self.facts.has_graph = True
                self.graph(x, y, 1)
            elif num == _MODEL_METADATA:
                key, value = self.entry(x, y)
                self.facts.metadata[key] = value
            elif num == _MODEL_FUNCTIONS:
                for fnum, fwire, fx, fy in _fields(self.buf, x, y):
                    if fnum == _FUNCTION_NODE and fwire == _LEN:
                        self.node(fx, fy, 2)

    def graph(self, a: int, b: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise WireError("subgraphs nested too deeply")
        for num, wire, x, y in _fields(self.buf, a, b):
            if wire != _LEN:
                continue
            if num == _GRAPH_NODE:
                self.node(x, y, depth)
            elif num == _GRAPH_INITIALIZER:
                self.tensor(x, y)
            elif num == _GRAPH_SPARSE_INITIALIZER:
                self.sparse(x, y)

    def node(self, a: int, b: int, depth: int) -> None:
        op_type = ""
        attrs: list[tuple[int, int]] = []
        for num, wire, x, y in _fields(self.buf, a, b):
            if wire != _LEN:
                continue
            if num == _NODE_OP_TYPE:
                op_type = _string(self.buf, x, y)
            elif num == _NODE_ATTRIBUTE:
                attrs.append((x, y))
        ep = EPContextNode() if (self.want_ep_context and op_type == "EPContext") else None
        for x, y in attrs:
            self.attribute(x, y, depth, ep)
        if ep is not None:
            self.facts.ep_context_nodes.append(ep)

    def attribute(self, a: int, b: int, depth: int, ep: EPContextNode | None) -> None:
        name = ""
        int_value: int | None = None
        str_span: tuple[int, int] | None = None
        for num, wire, x, y in _fields(self.buf, a, b):
            if num == _ATTR_NAME and wire == _LEN:
                name = _string(self.buf, x, y)
            elif num == _ATTR_I and wire == _VARINT:
                int_value = x
            elif wire != _LEN:
                continue
            elif num == _ATTR_S:
                str_span = (x, y)
            elif num in (_ATTR_T, _ATTR_TENSORS):
                self.tensor(x, y)
            elif num in (_ATTR_G, _ATTR_GRAPHS):
                self.graph(x, y, depth + 1)
            elif num in (_ATTR_SPARSE, _ATTR_SPARSES):
                self.sparse(x, y)
        if ep is None:
            return
        if name == "embed_mode" and int_value is not None:
            ep.embed_mode = int_value
        elif name == "main_context" and int_value is not None:
            ep.main_context = int_value
        elif name == "source" and str_span:
            ep.source = _string(self.buf, *str_span)
        elif name == "partition_name" and str_span:
            ep.partition_name = _string(self.buf, *str_span)
        elif name == "ep_cache_context" and str_span:
            # Keep only short values (file names); an embedded binary is not copied into memory.
            span = str_span[1] - str_span[0]
            ep.cache_context = bytes(self.buf[str_span[0] : str_span[1]]) if span <= 4096 else b""

    def sparse(self, a: int, b: int) -> None:
        for num, wire, x, y in _fields(self.buf, a, b):
            if wire == _LEN and num in (_SPARSE_VALUES, _SPARSE_INDICES):
                self.tensor(x, y)

    def tensor(self, a: int, b: int) -> None:
        location = None
        for num, wire, x, y in _fields(self.buf, a, b):
            if num == _TENSOR_EXTERNAL_DATA and wire == _LEN:
                key, value = self.entry(x, y)
                if key == "location":
                    location = value
        if location is not None:
            self.facts.external_locations.add(location)

    def entry(self, a: int, b: int) -> tuple[str, str]:
        key = value = ""
        for num, wire, x, y in _fields(self.buf, a, b):
            if wire != _LEN:
                continue
            if num == _ENTRY_KEY:
                key = _string(self.buf, x, y)
            elif num == _ENTRY_VALUE:
                value = _string(self.buf, x, y)
        return key, value


def read_facts_from_bytes(data: bytes | memoryview, *, ep_context: bool = False) -> ModelFacts:
    """Parse a serialized ModelProto. Raises :class:`WireError` when it is not one."""
    walker = _Walker(data, ep_context)
    walker.model(0, len(data))
    _require_model(walker.facts)
    return walker.facts


def read_facts(
    path: str | os.PathLike[str], *, ep_context: bool = False, opener: Callable[[Path], int] | None = None
) -> ModelFacts:
    """Parse the model file at ``path`` via mmap (payloads are skipped, never copied).

    ``opener`` returns a read descriptor (the cache passes its guarded ``open_regular``: no link, no FIFO);
    by default the file is opened non-blocking and must be a regular file, so a FIFO given as a model
    raises instead of hanging.
    """
    fd = opener(Path(path)) if opener is not None else open_model_file(Path(path))
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise WireError("empty file")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            walker = _Walker(mm, ep_context)
            walker.model(0, size)
    finally:
        os.close(fd)
    _require_model(walker.facts)
    return walker.facts


def open_model_file(path: Path) -> int:
    """A read descriptor on a user's model file: links are followed (a model may be one), but the
    target must be a regular file; ``O_NONBLOCK`` keeps a FIFO from blocking the open."""
    import errno
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def _require_model(facts: ModelFacts) -> None:
    if facts.ir_version <= 0 or not facts.has_graph:
        raise WireError("no ir_version or graph: not an ONNX ModelProto")


def resolve_external(model_path: Path, location: str) -> Path:
    """Resolve an external-data location the way ONNX Runtime does, refusing escapes from the model dir."""
    loc = Path(location)
    if loc.is_absolute() or ".." in loc.parts:
        raise WireError(f"external data location {location!r} must be relative to the model's folder")
    return model_path.parent / loc

"""Where each initializer's bytes lie in an ONNX file, and the same file with some initializers replaced,
read and written without the ``onnx`` package (run-time installs have only numpy).

A ModelProto is protobuf: its graph is field 7, the graph's initializers are its field 5, each a TensorProto
with dims (1), data_type (2), name (8), raw_data (9) and, for weights kept outside the graph file,
external_data (13: location, offset, length). Walking that wire format gives every tensor's file and
offset; unrelated fields (nodes, value infos) are skipped by their length, never decoded.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from ..errors import ModelFolderError

DTYPES = {1: "float32", 10: "float16", 11: "float64", 6: "int32", 7: "int64"}    # TensorProto.DataType
CODES = {v: k for k, v in DTYPES.items()}
GRAPH, INITIALIZER = 7, 5


@dataclass(frozen=True)
class Initializer:
    name: str
    dtype: str | None           # numpy dtype name; None for element types weights never have
    shape: tuple[int, ...]
    file: str                   # the file holding the bytes: the graph file, or its external data file
    offset: int                 # of the bytes in ``file``
    nbytes: int
    span: tuple[int, int]       # the whole initializer field (key to end) in the graph file


@dataclass(frozen=True)
class GraphFile:
    path: Path
    graph: tuple[int, int]          # the ModelProto.graph field (key to end)
    body: int                       # where the graph's own fields start
    initializers: dict[str, Initializer]

    @property
    def external(self) -> bool:
        return any(t.file != self.path.name for t in self.initializers.values())


def read_index(path: Path) -> GraphFile:
    """Every initializer of the ONNX file ``path``: name, element type, shape and where its bytes are."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graph = next(((key, value) for field, key, value, _ in _fields(buf, 0, len(buf)) if field == GRAPH), None)
        if graph is None or not isinstance(graph[1], tuple):
            raise ModelFolderError(f"{path}: no graph in this ONNX file; re-export the model")
        key, (body, end) = graph
        tensors = [_tensor(buf, span, (start, stop), path.name)
                   for field, start, span, stop in _fields(buf, body, end) if field == INITIALIZER]
    return GraphFile(path, (key, end), body, {t.name: t for t in tensors})


def patched(index: GraphFile, values: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of ``index.path`` with the initializers named in ``values`` replaced by those arrays (any
    shape; stored in the graph file itself). Other initializers and every node are copied unchanged."""
    spans = sorted((index.initializers[name].span, _tensor_field(name, value)) for name, value in values.items())
    data = Path(index.path).read_bytes()
    key, end = index.graph
    parts, pos = [], index.body
    for (start, stop), replacement in spans:
        parts += [data[pos:start], replacement]
        pos = stop
    parts.append(data[pos:end])
    body = b"".join(parts)
    return b"".join([data[:key], _key(GRAPH, 2), _varint(len(body)), body, data[end:]])


def _tensor(buf, span: tuple[int, int], field_span: tuple[int, int], graph_file: str) -> Initializer:
    dims, code, name, raw, external = [], None, "", None, {}
    for field, _, value, _ in _fields(buf, *span):
        if field == 1:
            dims.extend(_packed(buf, value) if isinstance(value, tuple) else [value])
        elif field == 2:
            code = value
        elif field == 8:
            name = bytes(buf[value[0]:value[1]]).decode()
        elif field == 9:
            raw = value
        elif field == 13:
            entry = dict(_fields_as_text(buf, value))
            external[entry.get(1, "")] = entry.get(2, "")
    dtype = DTYPES.get(code)
    count = int(np.prod(dims, dtype=np.int64))
    nbytes = count * np.dtype(dtype).itemsize if dtype else 0
    if external:
        return Initializer(name, dtype, tuple(dims), external["location"], int(external.get("offset", 0)),
                           int(external.get("length", nbytes)), field_span)
    start, stop = raw if raw else (0, 0)        # values kept in typed fields instead: not located
    return Initializer(name, dtype if raw else None, tuple(dims), graph_file, start, stop - start, field_span)


def _fields(buf, pos: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int] | None, int]]:
    """(field number, offset of its key, value, end) for each field in ``buf[pos:end]``: an int for varints,
    the (start, stop) of the payload for length-delimited fields, None for fixed-width ones."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ModelFolderError(f"unreadable ONNX file (protobuf wire type {wire} at byte {start}); "
                                   "re-export the model")
        yield key >> 3, start, value, pos


def _fields_as_text(buf, span: tuple[int, int]) -> Iterator[tuple[int, str]]:
    for field, _, value, _ in _fields(buf, *span):
        if isinstance(value, tuple):
            yield field, bytes(buf[value[0]:value[1]]).decode()


def _packed(buf, span: tuple[int, int]) -> list[int]:
    values, pos = [], span[0]
    while pos < span[1]:
        v, pos = _read_varint(buf, pos)
        values.append(v)
    return values


def _read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _tensor_field(name: str, value: np.ndarray) -> bytes:
    """An initializer field (graph field 5) holding ``value`` as raw little-endian data."""
    value = np.ascontiguousarray(value, dtype=np.dtype(value.dtype).newbyteorder("<"))
    label, raw = name.encode(), value.tobytes()
    body = b"".join(_key(1, 0) + _varint(d) for d in value.shape)
    body += _key(2, 0) + _varint(CODES[value.dtype.name]) + _key(8, 2) + _varint(len(label)) + label
    body += _key(9, 2) + _varint(len(raw)) + raw
    return _key(INITIALIZER, 2) + _varint(len(body)) + body

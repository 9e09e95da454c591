"""Writing safetensors files one tensor at a time, so that a model never sits in memory whole.

Tensors arrive lazily (read lazily by ``mx.load``, renamed, cast or quantized as graph nodes);
each is evaluated, written and released before the next, so peak memory is about one tensor
(plus its float32 temporaries while quantizing), whatever the model size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from moshi_mlx.weights import reading_weights

_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.uint32: "U32", mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64",
    mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", mx.float64: "F64",
}  # fmt: skip


def write_safetensors(
    path: str | Path,
    tensors: dict[str, mx.array],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    check: Callable[[str, mx.array], None] | None = None,
) -> int:
    """Write ``tensors`` (lazy is fine) to ``path`` in safetensors format, evaluating and
    releasing them one by one; the dict is emptied as they are written. ``check(name, array)``
    sees each evaluated tensor before it is written (and may raise); ``on_tensor(name,
    nbytes)`` is called after each. Returns the number of data bytes."""
    names = sorted(tensors)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        a = tensors[name]
        header[name] = {
            "dtype": _DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            a = mx.contiguous(tensors.pop(name))
            with reading_weights():
                mx.eval(a)
            if check is not None:
                check(name, a)
            f.write(memoryview(a))
            if on_tensor is not None:
                on_tensor(name, a.nbytes)
            del a
    return offset


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Split tensor names, in order, into groups of at most ``max_bytes`` each (a bigger tensor
    gets a group of its own), as mlx-lm's ``make_shards`` does but with a size in bytes."""
    shards: list[list[str]] = []
    total = 0
    for name, size in sizes.items():
        if not shards or total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    return shards


def shard_names(count: int) -> list[str]:
    """mlx-lm's file names: ``model.safetensors``, or ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]

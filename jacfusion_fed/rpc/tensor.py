"""Codec of ``jacfusion.v1.Tensor``: numpy array <-> message (little-endian, row-major)."""

from __future__ import annotations

from typing import Any

import numpy as np

from jacfusion_fed.rpc.jacfusion.v1 import common_pb2

__all__ = ["MAX_TENSOR_BYTES", "TensorDecodeError", "decode_tensor", "encode_tensor"]

#: Largest tensor payload accepted (64 MiB, the transport's message limit).
MAX_TENSOR_BYTES = 64 * 1024 * 1024

_BY_ENUM: dict[int, np.dtype[Any]] = {
    common_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    common_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    common_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    common_pb2.DATA_TYPE_UINT8: np.dtype("u1"),
}
_BY_NAME = {dt.name: enum for enum, dt in _BY_ENUM.items()}


class TensorDecodeError(ValueError):
    """A Tensor message is malformed (the message says how)."""


def encode_tensor(x: np.ndarray) -> common_pb2.Tensor:
    """``x`` as a Tensor message; ``ValueError`` for an unsupported dtype."""
    arr = np.asarray(x)
    enum = _BY_NAME.get(arr.dtype.name)
    if enum is None:
        raise ValueError(f"unsupported tensor dtype {arr.dtype}; use one of {sorted(_BY_NAME)}")
    data = np.ascontiguousarray(arr, dtype=_BY_ENUM[enum]).tobytes()
    return common_pb2.Tensor(
        shape=list(arr.shape), dtype=common_pb2.DataType.ValueType(enum), data=data
    )


def decode_tensor(message: common_pb2.Tensor) -> np.ndarray:
    """The array of a Tensor message (native byte order); :class:`TensorDecodeError` if bad."""
    dtype = _BY_ENUM.get(message.dtype)
    if dtype is None:
        raise TensorDecodeError(f"tensor dtype {message.dtype} is not set or not supported")
    shape = tuple(int(d) for d in message.shape)
    if not shape:
        raise TensorDecodeError("tensor has no shape")
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize > MAX_TENSOR_BYTES:
        raise TensorDecodeError(f"tensor of shape {shape} exceeds {MAX_TENSOR_BYTES} bytes")
    if len(message.data) != count * dtype.itemsize:
        raise TensorDecodeError(
            f"tensor data has {len(message.data)} bytes, shape {shape} of {dtype.name} "
            f"needs {count * dtype.itemsize}"
        )
    out: np.ndarray = np.frombuffer(message.data, dtype=dtype).reshape(shape)
    return out.astype(dtype.newbyteorder("="))

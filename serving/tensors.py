"""A response's values -> arrays of each output's type, and the cache that lets responses share tensors.

A tensor costs the responder thread 2-5 us of the GIL to build, and its send a shared-memory
allocation; Triton's Python stub saves a tensor to shared memory once (reference-counted) and copies
it into each response that holds it. So each value that recurs (every count, a finish_reason, a
common token's text and id) gets its tensor once. Plain numpy here: the Triton model passes the
function that wraps an array in a pb_utils.Tensor, so these rules are tested without a server.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

import numpy as np
from gemma_protocol import OUTPUTS

NUMPY_TYPES = {"TYPE_STRING": np.object_, "TYPE_FP32": np.float32, "TYPE_UINT32": np.uint32, "TYPE_INT32": np.int32}
OUTPUT_TYPES = {spec.name: NUMPY_TYPES[spec.triton_type] for spec in OUTPUTS}
TENSOR_CACHE_SIZE = 4096  # tensors kept per output; a full cache starts again empty
CACHED_TEXT_CHARS = 16  # longer texts rarely recur

Tensor = TypeVar("Tensor")


def output_array(name: str, values: list) -> np.ndarray:
    """The values of output `name` as its tensor's array (texts as UTF-8 bytes)."""
    if OUTPUT_TYPES[name] is np.object_:
        return np.array([v.encode("utf-8") for v in values], dtype=np.object_)
    return np.array(values, dtype=OUTPUT_TYPES[name])


def recurs(values: list) -> bool:
    """Whether a value is worth a cached tensor: one element that is a count, an id or a short text
    (a float sum or a list of logprobs is new each time)."""
    if len(values) != 1:
        return False
    value = values[0]
    return not (value is None or isinstance(value, (list, float))
                or (isinstance(value, str) and len(value) > CACHED_TEXT_CHARS))


class TensorCache(Generic[Tensor]):
    """Each response's tensors, by `make_tensor(name, array)`; values that recur come from a cache
    per output. Not thread-safe: one thread (the Triton model's responder) uses it."""

    def __init__(self, make_tensor: Callable[[str, np.ndarray], Tensor]):
        self._make_tensor = make_tensor
        self._cached: dict[str, dict] = {name: {} for name in OUTPUT_TYPES}

    def __call__(self, name: str, values: list) -> Tensor:
        if not recurs(values):
            return self._make_tensor(name, output_array(name, values))
        cache = self._cached[name]
        tensor = cache.get(values[0])
        if tensor is None:
            if len(cache) >= TENSOR_CACHE_SIZE:
                cache.clear()
            tensor = cache[values[0]] = self._make_tensor(name, output_array(name, values))
        return tensor

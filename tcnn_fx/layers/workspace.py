"""Recycled memory for the attention layer's large tensors on the CPU: its maps and gathered taps.

Why: a layer's attention maps are ``batch x heads x queries x keys`` floats
(75 MB for a CIFAR ResNet-20 hybrid's first converted layer at batch 128).
PyTorch's CPU allocator hands every tensor to ``malloc``; glibc serves
blocks that large from ``mmap`` (above 32 MB always) or from a heap top it
trims back to the system once enough is freed, so every call faulted its
maps in anew, page by page (about 1.5 us per 4 KiB page on the project's
machine): a ResNet-20 hybrid took 115,000 minor page faults per inference
call at batch 128 (0.45 GB, a third of its time) and 37,000-69,000 per
training step.  The allocator settings that keep freed memory
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) removed them; this
module removes them in the default process, for these tensors only.

How: ``empty`` returns a view of a block kept here (the smallest free one
of the dtype holding at least the request and at most ``FIT`` times it).
A block is free again as soon as nothing but this module references its
storage: when the caller drops the tensor, or autograd releases it after the
backward (a graph kept with ``retain_graph`` keeps its blocks busy), so a
block is never handed out while any tensor still reads it.  Free blocks
beyond ``RETAIN_BYTES`` or ``RETAIN_BLOCKS`` are released, least recently
used first, so the memory held for shapes no longer used stays bounded;
``release`` frees every free block now.  Only plain CPU tensors outside
graph capture use it (``usable``); a request above ``RETAIN_BYTES`` is
allocated afresh.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from tcnn_fx.layers.backends import capturing

#: Bytes and number of free blocks kept for reuse; beyond either the least recently used free blocks are
#: released (many input sizes, as in detection, would otherwise leave many small blocks to scan).
RETAIN_BYTES = 1 << 30
RETAIN_BLOCKS = 32
#: A free block serves a request of at least ``1 / FIT`` of its size (layers of a model share blocks; a small
#: request does not hold a large block).
FIT = 2

_lock = threading.Lock()


class _Block(NamedTuple):
    """A kept block, with what a request is matched on as plain Python values (no tensor call per block scanned)."""

    tensor: Tensor
    storage: torch.UntypedStorage
    idle: int  # the storage's use count when nothing but this module references it
    numel: int
    dtype: torch.dtype


#: id -> its entry, least recently used first.
_blocks: OrderedDict[int, _Block] = OrderedDict()


def plain_cpu(tensors: tuple[Tensor, ...]) -> bool:
    """Whether ``tensors`` are ordinary CPU tensors (no ``torch.func`` wrapper, fake or other subclass)."""
    return all(
        type(t) in (Tensor, torch.nn.Parameter)
        and t.device.type == "cpu"
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in tensors
    )


def usable(*tensors: Tensor) -> bool:
    """Whether a tensor computed from ``tensors`` may live in recycled memory: plain CPU tensors, no capture."""
    return not capturing() and plain_cpu(tensors)


def empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype, in a recycled block where usable."""
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    if nbytes > RETAIN_BYTES or not usable(like):
        return like.new_empty(shape)
    with _lock:
        dtype = like.dtype
        fits = [
            (entry.numel, key)
            for key, entry in _blocks.items()
            if numel <= entry.numel <= FIT * numel and entry.dtype == dtype and _free(entry)
        ]
        if fits:  # the smallest free block that fits
            key = min(fits)[1]
            _blocks.move_to_end(key)
            return _blocks[key].tensor[:numel].view(shape)
        with torch.inference_mode(False):  # a block made in inference mode could not be written outside it
            block = torch.empty(numel, dtype=like.dtype)
        # The Python storage object is held too (it owns a reference of its own once made), so the use count
        # of a free block is fixed: measured here, before any view exists.
        storage = block.untyped_storage()
        _blocks[id(block)] = _Block(block, storage, _use_count(storage), numel, like.dtype)
        tensor = block.view(shape)  # busy from here on
        _trim(RETAIN_BYTES, RETAIN_BLOCKS)
        return tensor


def release() -> None:
    """Free every block no tensor uses now."""
    with _lock:
        _trim(0, 0)


def held_bytes() -> int:
    """Bytes of the blocks held, busy or free."""
    with _lock:
        return sum(entry.tensor.nbytes for entry in _blocks.values())


def _use_count(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


def _free(entry: _Block) -> bool:
    """Whether nothing but this module references the entry's block (no view, no autograd record of one)."""
    return _use_count(entry.storage) == entry.idle


def _trim(limit_bytes: int, limit_blocks: int) -> None:
    """Release free blocks, least recently used first, until the free ones are at most ``limit_blocks`` holding
    at most ``limit_bytes``."""
    free = [key for key, entry in _blocks.items() if _free(entry)]
    held = sum(_blocks[key].tensor.nbytes for key in free)
    count = len(free)
    for key in free:
        if held <= limit_bytes and count <= limit_blocks:
            break
        held -= _blocks.pop(key).tensor.nbytes
        count -= 1

"""Where ``ConvAttention2d`` computes its attention, chosen once per call by ``choose``.

The layer keeps its parameters and the reference math; this module holds
the ways of running the attention core and the one rule that picks among
them:

* ``KERNEL``: the compiled attention-and-gather kernel (``native``) for
  float32 CPU inference where it is enabled and could be built;
* ``ONEDNN``: composed operators with the gather as oneDNN grouped
  convolutions, for float32 CPU inference with at least 128 channels;
* ``TRAINING``: ``attention_backward.AttendGather`` under autograd in float32
  or float64 without autocast (the composed forward, a leaner backward);
* ``COMPOSED``: PyTorch operators and ``torch.bmm`` for everything else:
  graphs being captured (tracing, export, compilation must see plain
  operators and must not fix the batch size), half precision, autocast, GPU
  inference.

Every backend computes the same function (tested against each other and
against the convolution at initialisation).  The measurements behind the
choices are in docs/conv_attention.md ("Efficiency").
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from tcnn_fx.layers import native

#: Images per call in CPU inference with ``KERNEL`` or ``ONEDNN`` (larger batches run in chunks of this many).
INFERENCE_IMAGES = 8
#: The compiled kernel's softmax is base 2: queries are scaled by log2(e) to compensate.
LOG2_E = math.log2(math.e)
#: The fewest channels at which the oneDNN gather is chosen.
ONEDNN_CHANNELS = 128


class Backend(enum.Enum):
    KERNEL = "kernel"
    ONEDNN = "onednn"
    TRAINING = "training"
    COMPOSED = "composed"

    @property
    def chunks(self) -> bool:
        """Whether the backend runs a large batch a few images at a time (``INFERENCE_IMAGES``)."""
        return self in (Backend.KERNEL, Backend.ONEDNN)


def capturing() -> bool:
    """Whether the forward pass is being traced, exported or compiled rather than run."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or is_in_torch_dispatch_mode()


def choose(x: Tensor) -> Backend:
    """The backend for a forward pass on ``x`` (``(B, C, H, W)``) in the current autograd and capture state."""
    if capturing():
        return Backend.COMPOSED
    if torch.is_grad_enabled():
        trainable = x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)
        return Backend.TRAINING if trainable else Backend.COMPOSED
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[0] == 0:
        return Backend.COMPOSED
    if native.attend_gather() is not None:
        return Backend.KERNEL
    if x.shape[1] >= ONEDNN_CHANNELS and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        return Backend.ONEDNN
    return Backend.COMPOSED


def gather_bmm(values: Tensor, maps: Tensor) -> Tensor:
    """Every head's attention applied to every input channel: ``(B, C, heads, queries)``.

    ``values`` is ``(B, C, rows, columns)``, ``maps`` ``(B, heads, queries, keys)``.
    """
    batch, channels = values.shape[:2]
    heads, queries, keys = maps.shape[1:]
    gathered = torch.bmm(values.reshape(batch, channels, keys), maps.reshape(batch, heads * queries, keys).mT)
    return gathered.reshape(batch, channels, heads, queries)


def gather_onednn(values: Tensor, maps: Tensor) -> Tensor:
    """``gather_bmm``'s product as a oneDNN grouped 1x1 convolution: ``(1, C, B * heads, queries)``.

    One group per image: pixels are the C channels, input channels the keys
    (channels-last, so the values need no copy beyond images-inner order),
    output channels the heads' queries, weights the maps themselves.  The
    images end up along the rows.
    """
    batch, channels = values.shape[:2]
    heads, queries, keys = maps.shape[1:]
    # (Strides of the size-1 dimensions as permute leaves them: oneDNN takes other, equally valid
    # channels-last strides for a different layout and runs much slower.)
    pixels = values.reshape(batch, channels, keys).transpose(0, 1).reshape(1, channels, 1, batch * keys)
    gathered = F.conv2d(pixels.permute(0, 3, 1, 2), maps.reshape(batch * heads * queries, keys, 1, 1), groups=batch)
    return gathered.permute(0, 2, 3, 1).reshape(1, channels, batch * heads, queries)

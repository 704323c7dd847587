"""The DCNv4 functional API: argument checks and the fake (meta) kernels.

The kernels live in ``csrc/dcnv4`` and are registered with the dispatcher as ``torch.ops.mmdcnv4.
dcnv4_forward`` / ``dcnv4_backward`` (CPU and CUDA), together with the autograd kernel of ``dcnv4_forward``
(``csrc/dcnv4/dcnv4_autograd.cpp``, in C++ for its low per-call host overhead), so the op is differentiable
also when called directly through ``torch.ops``. This file adds the fake kernels ``torch.compile`` needs;
the math is in ``shared/spec/dcnv4-op.md`` and in ``reference.py``.

Autocast policy: the op has no autocast kernel of its own. It runs in the dtype of its inputs and
accumulates in fp32 (fp64 for fp64). Inside an autocast region, if ``value`` and ``offset_mask`` differ
in dtype, both are promoted to the wider of the two (as torch's "promote" ops do); outside autocast a
mismatch is a TypeError.

Host time: a call with CUDA tensors and plain int / (h, w) / float / bool arguments goes straight to the op,
whose C++ checks guard it (``csrc/dcnv4/dcnv4_host.h``); the Python checks below run only when that call
fails, and then raise the precise error. Their host time, paid by every DCNv4 layer of a backbone, was not
measured on its own (the same kind of checks cost about 15 us a call in ``ms_deform_attn.py``).
"""
import math
import numbers

import torch

from .. import _ext
from .reference import dcnv4_output_size, dcnv4_reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ['dcnv4', 'dcnv4_output_size']


def _pair(value, name, minimum):
    """Returns ``(h, w)`` from an int or a pair of ints, each at least ``minimum``."""
    # Plain ints and tuples of them first: the usual case, without the slower numbers.Integral (ABC) checks.
    if type(value) is int:
        pair = (value, value)
    elif type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        pair = value
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f'{name} must be an int or a pair of ints (h, w), got {value!r}')
    if min(pair) < minimum:
        raise ValueError(f'{name} must be >= {minimum}, got {value!r}')
    return pair


def _check_tensor(tensor, name):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(tensor).__name__}')
    if tensor.dim() != 4:
        raise ValueError(f'{name} must be a 4-D channels-last tensor, got shape {tuple(tensor.shape)}')
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f'{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}')


def _matching_dtypes(value, offset_mask):
    if value.dtype == offset_mask.dtype:
        return value, offset_mask
    if torch.is_autocast_enabled(value.device.type):
        dtype = torch.promote_types(value.dtype, offset_mask.dtype)
        return value.to(dtype), offset_mask.to(dtype)
    raise TypeError(f'value ({value.dtype}) and offset_mask ({offset_mask.dtype}) must have the same dtype '
                    '(outside autocast the op does not cast for you)')


def dcnv4(value, offset_mask, kernel_size=3, stride=1, padding=1, dilation=1, group=1, offset_scale=1.0,
          remove_center=False):
    """Deformable convolution v4 over a channels-last map (no softmax, no bias, no projections).

    Args:
        value: ``(N, H, W, C)`` with ``C = group * D``.
        offset_mask: ``(N, Ho, Wo, P)``, ``P >= 3 * group * K`` where ``K = kh * kw - remove_center``:
            per group ``[x_0, y_0, ..., x_{K-1}, y_{K-1}, m_0, ..., m_{K-1}]``, groups concatenated,
            anything after ``3 * group * K`` ignored (and given zero gradient).
        kernel_size, stride, padding, dilation: int or ``(h, w)`` pair.
        group: number of groups G.
        offset_scale: scales the sampling grid and the offsets about the window centre.
        remove_center: skip the centre point of the kernel.

    Returns:
        ``(N, Ho, Wo, C)`` in the dtype of ``value``.
    """
    if (type(group) is int and type(offset_scale) is float and math.isfinite(offset_scale)
            and type(remove_center) is bool and not torch.compiler.is_compiling()):
        try:
            if value.is_cuda:
                kh, kw = _pair(kernel_size, 'kernel_size', 1)
                sh, sw = _pair(stride, 'stride', 1)
                ph, pw = _pair(padding, 'padding', 0)
                dh, dw = _pair(dilation, 'dilation', 1)
                return torch.ops.mmdcnv4.dcnv4_forward(value, offset_mask, kh, kw, sh, sw, ph, pw, dh, dw, group,
                                                       offset_scale, remove_center)
        except Exception:  # noqa: BLE001  (the checks below raise the precise error)
            pass
    _check_tensor(value, 'value')
    _check_tensor(offset_mask, 'offset_mask')
    device = value.device
    if device != offset_mask.device:
        raise ValueError(f'value and offset_mask must be on the same device, got {device} and '
                         f'{offset_mask.device}')
    value, offset_mask = _matching_dtypes(value, offset_mask)
    kh, kw = _pair(kernel_size, 'kernel_size', 1)
    sh, sw = _pair(stride, 'stride', 1)
    ph, pw = _pair(padding, 'padding', 0)
    dh, dw = _pair(dilation, 'dilation', 1)
    # `type(...) is` first: each numbers ABC check costs about 0.3 us per call.
    if (type(group) is not int and (not isinstance(group, numbers.Integral) or isinstance(group, bool))
            or group < 1):
        raise ValueError(f'group must be a positive int, got {group!r}')
    group = int(group)
    if (type(offset_scale) is not float and not isinstance(offset_scale, numbers.Real)
            or not math.isfinite(offset_scale)):
        raise ValueError(f'offset_scale must be a finite number, got {offset_scale!r}')
    if not isinstance(remove_center, bool):
        raise TypeError(f'remove_center must be a bool, got {remove_center!r}')
    n, h, w, c = value.shape
    if c % group:
        raise ValueError(f'the channels of value ({c}) must be divisible by group ({group})')
    k = kh * kw - int(remove_center)
    if k < 1:
        raise ValueError('remove_center=True needs a kernel with more than one point')
    ho = dcnv4_output_size(h, kh, sh, ph, dh)
    wo = dcnv4_output_size(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(f'the output size ({ho}, {wo}) is below 1 for an input of ({h}, {w}) with '
                         f'kernel_size {(kh, kw)}, stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}')
    needed = 3 * group * k
    if tuple(offset_mask.shape[:3]) != (n, ho, wo) or offset_mask.shape[3] < needed:
        raise ValueError(f'offset_mask must have shape (N, Ho, Wo, P) = ({n}, {ho}, {wo}, >= {needed}) '
                         f'(3 * group * K with K = {k}), got {tuple(offset_mask.shape)}')

    args = (kh, kw, sh, sw, ph, pw, dh, dw, group, float(offset_scale), remove_center)
    if not torch.compiler.is_compiling() and not _ext.require_kernel('dcnv4_forward', device.type):
        return dcnv4_reference(value, offset_mask, (kh, kw), (sh, sw), (ph, pw), (dh, dw), group,
                               float(offset_scale), remove_center)
    return torch.ops.mmdcnv4.dcnv4_forward(value, offset_mask, *args)


def _register():
    """Fake (meta) kernels for the dispatcher ops defined in ``csrc/dcnv4/dcnv4.cpp``, for torch.compile.

    The autograd kernel of ``dcnv4_forward`` is C++ (``csrc/dcnv4/dcnv4_autograd.cpp``): far less host
    time per call than a Python autograd formula.
    """

    @torch.library.register_fake('mmdcnv4::dcnv4_forward')
    def _forward_fake(value, offset_mask, kh, kw, sh, sw, ph, pw, dh, dw, group, offset_scale, remove_center):
        n, h, w, c = value.shape
        ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
        wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        return value.new_empty((n, ho, wo, c))

    @torch.library.register_fake('mmdcnv4::dcnv4_backward')
    def _backward_fake(value, offset_mask, grad_output, kh, kw, sh, sw, ph, pw, dh, dw, group, offset_scale,
                       remove_center, deterministic):
        return value.new_empty(value.shape), offset_mask.new_empty(offset_mask.shape)


if _ext.load_error() is None:
    _register()

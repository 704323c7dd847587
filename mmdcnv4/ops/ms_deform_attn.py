"""Multi-scale deformable attention (Deformable-DETR's MSDA): argument checks and fake kernels.

Two layouts of the same operator (``shared/spec/dcnv4-op.md`` section 2, ``docs/ms_deform_attn.md``):

- :func:`ms_deform_attn`: mmcv's layout, ``sampling_locations (N, Len_q, heads, L, P, 2)`` and
  ``attention_weights (N, Len_q, heads, L, P)`` used as given (mmcv applies the softmax outside);
- :func:`flash_deform_attn`: the packed "flash" layout ``sampling_loc_attn (N, Len_q, heads, 3*L*P)``:
  per head the ``2*L*P`` normalised locations (x, y; level-major, then point), then the ``L*P`` raw
  logits, whose softmax (fp32, max-subtracted) the op computes itself.

The kernels live in ``csrc/ms_deform_attn`` and are registered as ``torch.ops.mmdcnv4.
{ms,flash}_deform_attn_{forward,backward}`` (CPU and CUDA), together with the autograd kernels of the forward
ops (``csrc/ms_deform_attn/ms_deform_attn_autograd.cpp``, in C++ for their low per-call host overhead). This
file adds the fake kernels ``torch.compile`` needs.

Autocast policy (as for :func:`mmdcnv4.ops.dcnv4`): the ops have no autocast kernel of their own. They run
in the dtype of their inputs and accumulate in fp32 (fp64 for fp64). Inside an autocast region, if the
floating inputs differ in dtype, all are promoted to the widest of them; outside autocast a mismatch is a
TypeError.

Level tables: ``spatial_shapes`` (L, 2) int64 rows (H_l, W_l) and ``level_start_index`` (L,) int64, the
exclusive prefix sums of ``H_l * W_l``. Their contents are checked (``sum H_l*W_l == Len_in``, prefix sums)
whenever that costs no device synchronisation, i.e. when they are CPU tensors; pass
``check_levels=True`` to check CUDA tables too (one small device-to-host copy, which waits for the GPU),
or ``check_levels=False`` to skip. Inconsistent tables never make the kernels read out of bounds: on CUDA a
level that does not fit in ``value`` contributes nothing, on CPU it is an error.

Host time: a CUDA call whose tables are already on the device (the usual case inside a model) goes straight
to the op, whose C++ checks guard it; the Python checks below run only when that call fails (and then
raise the precise error) or has something to convert. They cost about 15 us of host time a call on the
GPU machine, where small calls (DINO's decoder) are bound by host time (``docs/ms_deform_attn.md``).
"""
import numbers

import torch

from .. import _ext
from .reference import flash_deform_attn_reference, ms_deform_attn_reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ['flash_deform_attn', 'ms_deform_attn']


def _check_float(tensor, name, dims, layout):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(tensor).__name__}')
    if tensor.dim() != dims:
        raise ValueError(f'{name} must be {layout}, got shape {tuple(tensor.shape)}')
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f'{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}')


def _check_index(tensor, name, shape_text, dims):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(tensor).__name__}')
    dtype = tensor.dtype
    if dtype != torch.int64 and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        raise TypeError(f'{name} must be an integer (int64) tensor, got {dtype}')
    if tensor.dim() != dims:
        raise ValueError(f'{name} must be {shape_text}, got shape {tuple(tensor.shape)}')


def _level_tables(value, spatial_shapes, level_start_index, check_levels):
    """Checks the level tables and returns them as int64 tensors on the device of ``value``."""
    _check_index(spatial_shapes, 'spatial_shapes', '(L, 2) rows (H_l, W_l)', 2)
    _check_index(level_start_index, 'level_start_index', '(L,)', 1)
    levels = spatial_shapes.shape[0]
    if levels < 1 or spatial_shapes.shape[1] != 2:
        raise ValueError(f'spatial_shapes must be (L, 2) with L >= 1, got shape {tuple(spatial_shapes.shape)}')
    if level_start_index.shape[0] != levels:
        raise ValueError(f'level_start_index must have one entry per level ({levels}), got shape '
                         f'{tuple(level_start_index.shape)}')
    # Each .device builds a new torch.device: read them once.
    device, shapes_device, starts_device = value.device, spatial_shapes.device, level_start_index.device
    for name, table_device in (('spatial_shapes', shapes_device), ('level_start_index', starts_device)):
        if table_device != device and table_device.type != 'cpu':
            raise ValueError(f'{name} must be on the device of value ({device}) or on the CPU, got '
                             f'{table_device}')
    on_cpu = shapes_device.type == 'cpu' and starts_device.type == 'cpu'
    if check_levels is None:
        check_levels = on_cpu
    if check_levels and not torch.compiler.is_compiling():
        shapes = spatial_shapes.tolist()
        starts = level_start_index.tolist()
        if any(h < 1 or w < 1 for h, w in shapes):
            raise ValueError(f'spatial_shapes must hold positive (H, W) rows, got {shapes}')
        expected, total = [], 0
        for h, w in shapes:
            expected.append(total)
            total += h * w
        if total != value.shape[1]:
            raise ValueError(f'the levels of spatial_shapes {shapes} hold {total} positions (sum of H*W), but '
                             f'value has Len_in = {value.shape[1]}')
        if starts != expected:
            raise ValueError(f'level_start_index must be the exclusive prefix sums of H*W, {expected}, got '
                             f'{starts}')
    if spatial_shapes.dtype != torch.int64 or shapes_device != device:
        spatial_shapes = spatial_shapes.to(device=device, dtype=torch.int64)
    if level_start_index.dtype != torch.int64 or starts_device != device:
        level_start_index = level_start_index.to(device=device, dtype=torch.int64)
    return spatial_shapes, level_start_index


def _matching_dtypes(names, tensors):
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return tensors
    if torch.is_autocast_enabled(tensors[0].device.type):
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        return [t.to(dtype) for t in tensors]
    found = ', '.join(f'{n} ({t.dtype})' for n, t in zip(names, tensors))
    raise TypeError(f'{found} must have the same dtype (outside autocast the op does not cast for you)')


def _check_same_device(value, others):
    for name, tensor in others:
        if tensor.device != value.device:
            raise ValueError(f'{name} must be on the device of value ({value.device}), got {tensor.device}')


def _check_batch_heads(value, name, tensor):
    n, _, heads, _ = value.shape
    if tensor.shape[0] != n or tensor.shape[2] != heads:
        raise ValueError(f'{name} must have the batch ({n}) and heads ({heads}) of value in dimensions 0 and '
                         f'2, got shape {tuple(tensor.shape)}')


def _unchecked_cuda_call(op, value, spatial_shapes, level_start_index, *rest):
    """The host-time fast path (module docstring): ``op(...)`` for CUDA ``value`` and level tables, guarded
    only by the op's C++ checks. None when it does not apply or the op refuses the input; the caller's Python
    checks then convert the input or raise the precise error."""
    try:
        if value.is_cuda and spatial_shapes.is_cuda and level_start_index.is_cuda:
            return op(value, spatial_shapes, level_start_index, *rest)
    except Exception:  # noqa: BLE001
        pass
    return None


def flash_deform_attn(value, spatial_shapes, level_start_index, sampling_loc_attn, num_points, *,
                      check_levels=None):
    """Multi-scale deformable attention with the softmax fused, packed layout.

    Args:
        value: ``(N, Len_in, heads, D)``, ``Len_in = sum_l H_l * W_l``.
        spatial_shapes: ``(L, 2)`` int64 rows ``(H_l, W_l)``.
        level_start_index: ``(L,)`` int64, exclusive prefix sums of ``H_l * W_l``.
        sampling_loc_attn: ``(N, Len_q, heads, 3 * L * P)``: the ``2*L*P`` normalised locations
            ``(x, y)`` (level-major, then point; ``(0, 0)`` is the top-left corner of a level, ``(1, 1)``
            the bottom-right), then the ``L*P`` attention logits, softmax-ed over all ``L*P`` in the op.
        num_points: P, sampling points per level and head.
        check_levels: check the level tables' contents (None: only when they are CPU tensors).

    Returns:
        ``(N, Len_q, heads * D)`` in the dtype of ``value``.
    """
    if check_levels is None and type(num_points) is int and not torch.compiler.is_compiling():
        out = _unchecked_cuda_call(torch.ops.mmdcnv4.flash_deform_attn_forward, value, spatial_shapes,
                                   level_start_index, sampling_loc_attn, num_points)
        if out is not None:
            return out
    _check_float(value, 'value', 4, '(N, Len_in, heads, D)')
    _check_float(sampling_loc_attn, 'sampling_loc_attn', 4, '(N, Len_q, heads, 3 * L * P)')
    # `type(...) is int` first: the numbers.Integral (ABC) check is slow for a per-call check.
    if type(num_points) is not int and (not isinstance(num_points, numbers.Integral) or isinstance(num_points, bool)):
        raise TypeError(f'num_points must be an int, got {num_points!r}')
    if num_points < 1:
        raise ValueError(f'num_points must be >= 1, got {num_points}')
    num_points = int(num_points)
    _check_same_device(value, [('sampling_loc_attn', sampling_loc_attn)])
    spatial_shapes, level_start_index = _level_tables(value, spatial_shapes, level_start_index, check_levels)
    value, sampling_loc_attn = _matching_dtypes(('value', 'sampling_loc_attn'), [value, sampling_loc_attn])
    _check_batch_heads(value, 'sampling_loc_attn', sampling_loc_attn)
    levels = spatial_shapes.shape[0]
    if sampling_loc_attn.shape[3] != 3 * levels * num_points:
        raise ValueError(f'the last dimension of sampling_loc_attn must be 3 * L * P = 3 * {levels} * '
                         f'{num_points} = {3 * levels * num_points}, got {sampling_loc_attn.shape[3]}')

    if not torch.compiler.is_compiling() and not _ext.require_kernel('flash_deform_attn_forward',
                                                                     value.device.type):
        return flash_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_loc_attn,
                                           num_points)
    return torch.ops.mmdcnv4.flash_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                       sampling_loc_attn, num_points)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *,
                   check_levels=None):
    """Multi-scale deformable attention with mmcv's layout (the attention weights used as given).

    Same function as mmcv's ``MultiScaleDeformableAttnFunction``.

    Args:
        value: ``(N, Len_in, heads, D)``.
        spatial_shapes, level_start_index: as for :func:`flash_deform_attn`.
        sampling_locations: ``(N, Len_q, heads, L, P, 2)`` normalised ``(x, y)``.
        attention_weights: ``(N, Len_q, heads, L, P)``.
        check_levels: check the level tables' contents (None: only when they are CPU tensors).

    Returns:
        ``(N, Len_q, heads * D)`` in the dtype of ``value``.
    """
    if check_levels is None and not torch.compiler.is_compiling():
        out = _unchecked_cuda_call(torch.ops.mmdcnv4.ms_deform_attn_forward, value, spatial_shapes,
                                   level_start_index, sampling_locations, attention_weights)
        if out is not None:
            return out
    _check_float(value, 'value', 4, '(N, Len_in, heads, D)')
    _check_float(sampling_locations, 'sampling_locations', 6, '(N, Len_q, heads, L, P, 2)')
    _check_float(attention_weights, 'attention_weights', 5, '(N, Len_q, heads, L, P)')
    _check_same_device(value, [('sampling_locations', sampling_locations),
                               ('attention_weights', attention_weights)])
    spatial_shapes, level_start_index = _level_tables(value, spatial_shapes, level_start_index, check_levels)
    value, sampling_locations, attention_weights = _matching_dtypes(
        ('value', 'sampling_locations', 'attention_weights'), [value, sampling_locations, attention_weights])
    _check_batch_heads(value, 'sampling_locations', sampling_locations)
    levels = spatial_shapes.shape[0]
    if sampling_locations.shape[3] != levels or sampling_locations.shape[5] != 2 or sampling_locations.shape[4] < 1:
        raise ValueError(f'sampling_locations must be (N, Len_q, heads, L, P, 2) with L = {levels} levels (the '
                         f'rows of spatial_shapes) and P >= 1, got shape {tuple(sampling_locations.shape)}')
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(f'attention_weights must be (N, Len_q, heads, L, P) = '
                         f'{tuple(sampling_locations.shape[:5])}, got {tuple(attention_weights.shape)}')

    if not torch.compiler.is_compiling() and not _ext.require_kernel('ms_deform_attn_forward', value.device.type):
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)
    return torch.ops.mmdcnv4.ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                                    attention_weights)


def _register():
    """Fake (meta) kernels for the ops defined in ``csrc/ms_deform_attn/ms_deform_attn.cpp``, for torch.compile.

    The autograd kernels of the two forward ops are C++ (``csrc/ms_deform_attn/ms_deform_attn_autograd.cpp``):
    far less host time per call than a Python autograd formula.
    """

    @torch.library.register_fake('mmdcnv4::flash_deform_attn_forward')
    def _flash_forward_fake(value, spatial_shapes, level_start_index, sampling_loc_attn, num_points):
        n, _, heads, d = value.shape
        return value.new_empty((n, sampling_loc_attn.shape[1], heads * d))

    @torch.library.register_fake('mmdcnv4::flash_deform_attn_backward')
    def _flash_backward_fake(value, spatial_shapes, level_start_index, sampling_loc_attn, grad_output, num_points,
                             deterministic):
        return value.new_empty(value.shape), sampling_loc_attn.new_empty(sampling_loc_attn.shape)

    @torch.library.register_fake('mmdcnv4::ms_deform_attn_forward')
    def _ms_forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        n, _, heads, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], heads * d))

    @torch.library.register_fake('mmdcnv4::ms_deform_attn_backward')
    def _ms_backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          grad_output, deterministic):
        return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
                attention_weights.new_empty(attention_weights.shape))


def _ops_defined():
    """Whether the loaded extension defines these ops (a stale build may predate them)."""
    if _ext.load_error() is not None:
        return False
    return all(torch._C._jit_get_schemas_for_operator(f'mmdcnv4::{name}')
               for name in ('flash_deform_attn_forward', 'flash_deform_attn_backward', 'ms_deform_attn_forward',
                            'ms_deform_attn_backward'))


if _ops_defined():
    _register()

"""A drop-in replacement for mmcv's ``MultiScaleDeformableAttention`` running the fused MSDA op.

``FlashMultiScaleDeformableAttention`` has exactly the constructor arguments, parameters (state_dict
keys and shapes), initialisation and forward signature of mmcv 2.1.0's
``mmcv.ops.MultiScaleDeformableAttention``, so mmcv/mmdet checkpoints load into it unchanged and it gives
the same outputs. The differences are inside ``forward``: the sampling locations and the raw attention
logits go to :func:`~mmdcnv4.ops.ms_deform_attn.flash_deform_attn` in one packed tensor, whose kernel
computes the softmax itself (CPU and CUDA, fp16/bf16/fp32/fp64); and the module does not synchronise with
the GPU to check ``spatial_shapes`` (mmcv's ``assert`` does).

It is registered in mmengine's root ``MODELS`` registry (where mmcv registers its attention modules) as
``type='FlashMultiScaleDeformableAttention'``, so configs that build attention by type (mmcv's
``BaseTransformerLayer`` ``attn_cfgs``, mmdet3d/BEVFormer-style encoders) swap it in by type. mmdet 3.x's
Deformable-DETR/DINO/Mask2Former layers construct mmcv's class directly; for those,
:func:`replace_ms_deform_attn` swaps the modules of a built model in place (sharing the parameters) and
``FlashMSDAHook`` does it from a config (``custom_hooks=[dict(type='FlashMSDAHook')]``).
"""
import math
import warnings
from typing import Optional, no_type_check

import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModule, constant_init, xavier_init
from mmengine.registry import HOOKS, MODELS
from mmengine.utils import deprecated_api_warning
from torch import nn

from .ms_deform_attn import flash_deform_attn

__all__ = ['FlashMultiScaleDeformableAttention', 'replace_ms_deform_attn', 'FlashMSDAHook']


@MODELS.register_module()
class FlashMultiScaleDeformableAttention(BaseModule):
    """Deformable-DETR's multi-scale deformable attention, mmcv-compatible, on the fused MSDA op.

    Args (all as in mmcv 2.1.0's ``MultiScaleDeformableAttention``):
        embed_dims (int): embedding dimension. Default: 256.
        num_heads (int): attention heads. Default: 8.
        num_levels (int): feature levels. Default: 4.
        num_points (int): sampling points per level and head. Default: 4.
        im2col_step (int): kept for compatibility; unused (the kernels need no image batching).
        dropout (float): dropout on the output before the residual. Default: 0.1.
        batch_first (bool): query/value are ``(N, L, C)`` instead of ``(L, N, C)``. Default: False.
        norm_cfg (dict): kept for compatibility; unused (as in mmcv).
        init_cfg (dict): initialisation config of ``BaseModule``.
        value_proj_ratio (float): expansion ratio of ``value_proj``. Default: 1.0.
    """

    def __init__(self,
                 embed_dims: int = 256,
                 num_heads: int = 8,
                 num_levels: int = 4,
                 num_points: int = 4,
                 im2col_step: int = 64,
                 dropout: float = 0.1,
                 batch_first: bool = False,
                 norm_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 value_proj_ratio: float = 1.0):
        super().__init__(init_cfg)
        if embed_dims % num_heads != 0:
            raise ValueError(f'embed_dims must be divisible by num_heads, '
                             f'but got {embed_dims} and {num_heads}')
        dim_per_head = embed_dims // num_heads
        self.norm_cfg = norm_cfg
        self.dropout = nn.Dropout(dropout)
        self.batch_first = batch_first
        if dim_per_head % 8 != 0:
            warnings.warn('FlashMultiScaleDeformableAttention: channels per head that are a multiple of 8 '
                          '(fp16/bf16) or 4 (fp32) use the fastest CUDA kernels.')
        self.im2col_step = im2col_step
        self.embed_dims = embed_dims
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        value_proj_size = int(embed_dims * value_proj_ratio)
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """Default initialization for Parameters of Module (identical to mmcv's)."""
        constant_init(self.sampling_offsets, 0.)
        device = next(self.parameters()).device
        thetas = torch.arange(self.num_heads, dtype=torch.float32, device=device) * (2.0 * math.pi / self.num_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(
            self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid_init[:, :, i, :] *= i + 1

        self.sampling_offsets.bias.data = grid_init.view(-1)
        constant_init(self.attention_weights, val=0., bias=0.)
        xavier_init(self.value_proj, distribution='uniform', bias=0.)
        xavier_init(self.output_proj, distribution='uniform', bias=0.)
        self._is_init = True

    @classmethod
    def from_mmcv(cls, module):
        """A module sharing the submodules (so the parameters) and settings of an mmcv one."""
        value_proj_ratio = module.value_proj.out_features / module.embed_dims
        new = cls(module.embed_dims, module.num_heads, module.num_levels, module.num_points, module.im2col_step,
                  module.dropout.p, module.batch_first, module.norm_cfg, None, value_proj_ratio)
        for name in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj', 'dropout'):
            setattr(new, name, getattr(module, name))
        new.init_cfg = getattr(module, 'init_cfg', None)
        new._is_init = getattr(module, '_is_init', True)
        new.train(module.training)
        return new

    @no_type_check
    @deprecated_api_warning({'residual': 'identity'}, cls_name='FlashMultiScaleDeformableAttention')
    def forward(self,
                query: torch.Tensor,
                key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None,
                identity: Optional[torch.Tensor] = None,
                query_pos: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None,
                reference_points: Optional[torch.Tensor] = None,
                spatial_shapes: Optional[torch.Tensor] = None,
                level_start_index: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """Same arguments and result as mmcv's ``MultiScaleDeformableAttention.forward``.

        Args:
            query: ``(num_query, bs, embed_dims)`` (``(bs, num_query, embed_dims)`` if batch_first).
            key: unused.
            value: ``(num_key, bs, embed_dims)``; defaults to ``query``.
            identity: added to the output; defaults to ``query``.
            query_pos: positional encoding added to ``query``.
            key_padding_mask: ``(bs, num_key)``, True where the value is padding (zeroed).
            reference_points: ``(bs, num_query, num_levels, 2)`` normalised points, or
                ``(bs, num_query, num_levels, 4)`` boxes ``(cx, cy, w, h)``.
            spatial_shapes: ``(num_levels, 2)`` rows ``(h, w)``.
            level_start_index: ``(num_levels,)`` start of each level in ``value``.

        Returns:
            ``(num_query, bs, embed_dims)`` (``(bs, num_query, embed_dims)`` if batch_first).
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        bs, num_value, _ = value.shape

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        sampling_offsets = self.sampling_offsets(query).view(bs, num_query, self.num_heads, self.num_levels,
                                                             self.num_points, 2)
        logits = self.attention_weights(query).view(bs, num_query, self.num_heads,
                                                    self.num_levels * self.num_points)
        if reference_points.shape[-1] == 2:
            offset_normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            sampling_locations = reference_points[:, :, None, :, None, :] \
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            sampling_locations = reference_points[:, :, None, :, None, :2] \
                + sampling_offsets / self.num_points \
                * reference_points[:, :, None, :, None, 2:] \
                * 0.5
        else:
            raise ValueError(f'Last dim of reference_points must be'
                             f' 2 or 4, but get {reference_points.shape[-1]} instead.')
        # As mmcv's op, run in the dtype of value (under AMP: fp16 value, so fp16 locations and logits;
        # the op still takes the softmax and accumulates in fp32).
        packed = torch.cat([
            sampling_locations.reshape(bs, num_query, self.num_heads, -1).to(value.dtype),
            logits.to(value.dtype)
        ], dim=-1)
        output = flash_deform_attn(value, spatial_shapes, level_start_index, packed, self.num_points)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity


def _is_mmcv_msda(module):
    cls = type(module)
    return cls.__name__ == 'MultiScaleDeformableAttention' and cls.__module__.startswith('mmcv.')


def replace_ms_deform_attn(model):
    """Swaps, in place, every mmcv ``MultiScaleDeformableAttention`` inside ``model`` for a
    ``FlashMultiScaleDeformableAttention`` that shares its parameters (an optimizer built before keeps
    working). Returns the number of modules swapped. ``model`` itself cannot be swapped in place: use
    ``FlashMultiScaleDeformableAttention.from_mmcv(model)`` for a bare attention module.

    Call it after the model's weights are initialised and loaded: mmdet's ``init_weights`` of
    Deformable-DETR/DINO/Mask2Former re-initialises only modules that are instances of mmcv's class.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_mmcv_msda(child):
                setattr(parent, name, FlashMultiScaleDeformableAttention.from_mmcv(child))
                swapped += 1
    return swapped


@HOOKS.register_module()
class FlashMSDAHook(Hook):
    """Swaps mmcv's ``MultiScaleDeformableAttention`` for the fused op once the model is initialised.

    For mmdet 3.x models that build mmcv's class directly (Deformable-DETR, DINO, Mask2Former, ...):
    ``custom_hooks = [dict(type='FlashMSDAHook')]`` (with ``custom_imports`` of ``mmdcnv4`` if it is not
    imported otherwise). The swap happens before training, validation or testing starts, i.e. after the
    weights are initialised and any checkpoint is loaded; it shares the parameters, so the optimizer, the
    checkpoints and their keys are unchanged.
    """

    priority = 'VERY_HIGH'

    def _swap(self, runner):
        swapped = replace_ms_deform_attn(runner.model)
        if swapped:
            runner.logger.info(f'FlashMSDAHook: {swapped} MultiScaleDeformableAttention modules now run '
                               'the fused MSDA op.')

    def before_train(self, runner) -> None:
        self._swap(runner)

    def before_val(self, runner) -> None:
        self._swap(runner)

    def before_test(self, runner) -> None:
        self._swap(runner)

"""DCNv4 as layers: the upstream-compatible module and an mmcv conv layer.

- ``DCNv4`` keeps upstream's parameter names, shapes and initialisation, so upstream checkpoints load
  into it unchanged (``shared/spec/dcnv4-op.md`` section 1). It works on tokens plus ``shape=(H, W)`` or
  on channels-last maps, and never assumes a square map.
- ``DCNv4Conv2d`` is registered in mmcv's registry as ``type='DCNv4'``: an NCHW layer with a convolution's
  signature, usable wherever ``dict(type='DCNv2')`` is, e.g. mmdet's ResNet ``dcn=dict(type='DCNv4')``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .dcnv4 import _pair, dcnv4, dcnv4_output_size


def _offset_mask_channels(group, points):
    """Upstream pads the offset/mask projection to a multiple of 8 channels."""
    return int(math.ceil(3 * group * points / 8) * 8)


class DCNv4(nn.Module):
    """Upstream's DCNv4 module.

    A freshly initialised DCNv4 outputs exactly zero: the offset/mask projection starts at zero and the
    aggregation weights go through no softmax. Inside a residual block (as in FlashInternImage) that is
    harmless; a DCNv4 used alone, with nothing around it, trains very slowly from that start.

    Args:
        channels: C, the input and output channels.
        kernel_size, stride, pad, dilation: as for a convolution (int or pair). The output must have the
            input's size, since offsets are predicted per input pixel.
        group: G; ``channels`` must be divisible by it.
        offset_scale: scale of the sampling grid and offsets about the window centre.
        dw_kernel_size: if set, a depthwise conv (``offset_mask_dw``) feeds the offset/mask projection.
        center_feature_scale: gate between the DCN output and the projected input.
        remove_center: drop the kernel's centre point.
        output_bias: bias of ``output_proj``.
        without_pointwise: no ``value_proj`` / ``output_proj``.
    """

    def __init__(self, channels=64, kernel_size=3, stride=1, pad=1, dilation=1, group=4, offset_scale=1.0,
                 dw_kernel_size=None, center_feature_scale=False, remove_center=False, output_bias=True,
                 without_pointwise=False, **kwargs):
        super().__init__()
        if channels % group:
            raise ValueError(f'channels ({channels}) must be divisible by group ({group})')
        self.channels = channels
        self.kernel_size = _pair(kernel_size, 'kernel_size', 1)
        self.stride = _pair(stride, 'stride', 1)
        self.pad = _pair(pad, 'pad', 0)
        self.dilation = _pair(dilation, 'dilation', 1)
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.dw_kernel_size = dw_kernel_size
        self.center_feature_scale = center_feature_scale
        self.remove_center = bool(remove_center)
        self.without_pointwise = without_pointwise
        points = self.kernel_size[0] * self.kernel_size[1] - int(self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, stride=1,
                                            padding=(dw_kernel_size - 1) // 2, groups=channels)
        self.offset_mask = nn.Linear(channels, _offset_mask_channels(group, points))
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.zeros_(self.output_proj.bias)

    def forward(self, input, shape=None):
        """``input``: tokens ``(N, L, C)`` with ``shape=(H, W)``, or a map ``(N, H, W, C)``.

        Returns the same form as the input.
        """
        if input.dim() == 3:
            if shape is None:
                raise ValueError('DCNv4 got tokens (N, L, C) without shape=(H, W); pass the map size '
                                 '(it is never guessed from L)')
            h, w = shape
            n, length, c = input.shape
            if h * w != length:
                raise ValueError(f'shape {tuple(shape)} does not match the {length} tokens of the input')
            tokens = True
        elif input.dim() == 4:
            n, h, w, c = input.shape
            if shape is not None and tuple(shape) != (h, w):
                raise ValueError(f'shape {tuple(shape)} does not match the input map ({h}, {w})')
            tokens = False
        else:
            raise ValueError(f'DCNv4 takes (N, L, C) tokens or an (N, H, W, C) map, got shape '
                             f'{tuple(input.shape)}')
        if c != self.channels:
            raise ValueError(f'DCNv4 was built for {self.channels} channels, got {c}')
        out_size = tuple(dcnv4_output_size(size, k, s, p, d) for size, k, s, p, d in zip(
            (h, w), self.kernel_size, self.stride, self.pad, self.dilation))
        if out_size != (h, w):
            raise ValueError(f'DCNv4 predicts offsets per input pixel, so its output must keep the input '
                             f'size ({h}, {w}); kernel_size/stride/pad/dilation give {out_size}. '
                             'Use DCNv4Conv2d (type="DCNv4") for strided layers.')
        x_map = input.reshape(n, h, w, c)
        x = x_map if self.without_pointwise else self.value_proj(x_map)
        if self.dw_kernel_size is not None:
            branch = self.offset_mask_dw(x_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            branch = x_map
        offset_mask = self.offset_mask(branch)
        x_proj = x
        x = dcnv4(x, offset_mask, self.kernel_size, self.stride, self.pad, self.dilation, self.group,
                  self.offset_scale, self.remove_center)
        if self.center_feature_scale:
            scale = torch.sigmoid(F.linear(x, self.center_feature_scale_proj_weight,
                                           self.center_feature_scale_proj_bias))
            scale = scale.repeat_interleave(self.group_channels, dim=-1)
            x = x * (1 - scale) + x_proj * scale
        if not self.without_pointwise:
            x = self.output_proj(x)
        return x.reshape(n, h * w, -1) if tokens else x


class DCNv4Conv2d(nn.Module):
    """DCNv4 with a convolution's interface (NCHW in and out), registered in mmcv as ``type='DCNv4'``.

    ``build_conv_layer(dict(type='DCNv4'), in_channels, out_channels, kernel_size, stride=..., padding=...,
    dilation=..., bias=...)`` builds it wherever ``dict(type='DCNv2')`` works, e.g. mmdet's ResNet with
    ``dcn=dict(type='DCNv4')`` and ``stage_with_dcn``.

    Layout: ``value_proj`` (1x1, in -> in) gives the sampled values; ``offset_mask`` (a k x k convolution
    with the layer's stride, padding and dilation, like the offset branch of mmcv's DCNv2 pack) predicts
    the offsets and aggregation weights at the output resolution; ``output_proj`` (1x1, in -> out) mixes
    the groups. The offset branch starts at zero offsets and equal weights ``1/K``, so a fresh layer is a
    box filter over the k x k window rather than zero (see ``DCNv4`` for why a zero start trains badly).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as for ``nn.Conv2d``
            (``groups`` must be 1).
        group: DCNv4 groups (default: ``deform_groups`` if given, else ``in_channels // 16`` when that
            divides, else 1). ``deform_groups`` is accepted so DCNv2 configs carry over.
        offset_scale: scale of the sampling grid and offsets.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, group=None, deform_groups=None, offset_scale=1.0):
        super().__init__()
        if groups != 1:
            raise ValueError(f'DCNv4Conv2d supports groups=1 only (use group= for DCNv4 groups), got {groups}')
        if group is None:
            group = deform_groups if deform_groups is not None else (
                in_channels // 16 if in_channels % 16 == 0 else 1)
        if in_channels % group:
            raise ValueError(f'in_channels ({in_channels}) must be divisible by group ({group})')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, 'kernel_size', 1)
        self.stride = _pair(stride, 'stride', 1)
        self.padding = _pair(padding, 'padding', 0)
        self.dilation = _pair(dilation, 'dilation', 1)
        self.group = group
        self.offset_scale = offset_scale
        points = self.kernel_size[0] * self.kernel_size[1]
        self.points = points
        self.value_proj = nn.Conv2d(in_channels, in_channels, 1)
        self.offset_mask = nn.Conv2d(in_channels, 3 * group * points, self.kernel_size, self.stride,
                                     self.padding, self.dilation)
        self.output_proj = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.init_weights()

    def init_weights(self):
        nn.init.zeros_(self.offset_mask.weight)
        bias = self.offset_mask.bias.detach().view(self.group, 3 * self.points)
        bias[:, :2 * self.points] = 0
        bias[:, 2 * self.points:] = 1.0 / self.points
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        if self.output_proj.bias is not None:
            nn.init.zeros_(self.output_proj.bias)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'DCNv4Conv2d expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}')
        value = self.value_proj(x).permute(0, 2, 3, 1)
        offset_mask = self.offset_mask(x).permute(0, 2, 3, 1)
        out = dcnv4(value, offset_mask, self.kernel_size, self.stride, self.padding, self.dilation, self.group,
                    self.offset_scale)
        return self.output_proj(out.permute(0, 3, 1, 2))


def _register_in_mmcv():
    """Adds ``type='DCNv4'`` to the registry mmcv's ``build_conv_layer`` reads (mmengine's root MODELS)."""
    try:
        from mmengine.registry import MODELS
    except ImportError:
        return
    MODELS.register_module('DCNv4', module=DCNv4Conv2d, force=True)


_register_in_mmcv()

"""LayerNorm over the channels of an NCHW map, usable as an mmcv norm layer (``type='LN2d'``)."""
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """``nn.LayerNorm`` over dim 1 of an ``(N, C, H, W)`` tensor (each pixel normalised over C).

    Built by mmcv's ``build_norm_layer(dict(type='LN2d'), C)``, e.g. through ``ConvModule``'s
    ``norm_cfg``; the layer is then named ``ln`` and its parameters ``weight``/``bias`` of shape (C,).
    """

    def __init__(self, num_channels, eps=1e-6, elementwise_affine=True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine, **kwargs)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f'LN2d expects an (N, C, H, W) tensor, got shape {tuple(x.shape)}')
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2).contiguous()


if 'LN2d' not in MODELS.module_dict:
    MODELS.register_module('LN2d', module=LayerNorm2d)

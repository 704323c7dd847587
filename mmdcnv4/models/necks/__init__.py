"""Neck building blocks: a channels-first LayerNorm (``norm_cfg=dict(type='LN2d')``) for mmdet's FPN.

The FlashInternImage detection recipes use mmdet's own ``FPN`` with LayerNorm after each lateral and
output conv: ``neck=dict(type='FPN', ..., norm_cfg=dict(type='LN2d'))``. ``LN2d`` is registered in the
root registry, so mmdet, mmseg and mmdet3d configs (any default_scope) can name it.
"""
from .layer_norm import LayerNorm2d

__all__ = ['LayerNorm2d']

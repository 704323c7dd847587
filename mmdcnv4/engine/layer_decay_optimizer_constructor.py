"""Layer-wise learning-rate decay for FlashInternImage detectors and segmentors.

``CustomLayerDecayOptimizerConstructor`` keeps upstream's name, so upstream optimizer configs work
unchanged::

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4),
        constructor='CustomLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(num_layers=30, layer_decay_rate=0.9, depths=[4, 4, 18, 4], offset_lr_scale=0.01))

The rules are upstream's (``shared/spec/flash-internimage.md`` section 4), on the parameter names of the
whole model (``backbone.levels.2.blocks.5.dcn.offset_mask.weight``, ``decode_head.query_feat.weight``...):

- ``total = num_layers + 2``. Layer id 0: ``backbone.patch_embed*``, any name with ``level_embeds``, and
  the Mask2Former embeddings ``decode_head.{mask_embed,cls_embed,level_embed,query_embed,query_feat}``.
  Block ``j`` of level ``s``: ``j + 1 + sum(depths[:s])``. A level's ``downsample``/``norm``:
  ``1 + sum(depths[:s + 1])`` (``1 + sum(depths[:3])`` for the last level). Anything else: ``total - 1``.
- lr = ``base_lr * layer_decay_rate ** (total - id - 1)``, times ``offset_lr_scale`` for names with
  ``sampling_offsets``, ``reference_points`` or ``offset_mask`` (the DCNv4 offset/mask projection, not
  its depthwise conv ``offset_mask_dw``).
- No weight decay for 1-D parameters, ``.bias``, and names with ``norm``, ``relative_position`` or
  ``sampling_offsets``.

One addition: mmdet 3.x names upstream's ``bbox_head.transformer.level_embeds`` (DINO, Deformable DETR)
``level_embed``, at the top of the detector; a parameter of that name also gets layer id 0, so that the
upstream DINO recipes keep their learning rates after the move to mmdet 3.x.

Parameters with ``requires_grad=False`` are left out of the optimizer, as upstream and mmengine do.
"""
import json

from mmengine.dist import get_dist_info
from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor

from ..models.registry import register

__all__ = ['CustomLayerDecayOptimizerConstructor', 'get_layer_id', 'is_no_decay', 'is_offset_param']

# Mask2Former's query/level/class embeddings sit with the stem (segmentation recipes).
_LAYER0_PREFIXES = ('backbone.patch_embed',) + tuple(
    f'decode_head.{name}' for name in ('mask_embed', 'cls_embed', 'level_embed', 'query_embed', 'query_feat'))
_NO_DECAY_WORDS = ('norm', 'relative_position', 'sampling_offsets')
_PARAMWISE_KEYS = {'num_layers', 'layer_decay_rate', 'depths', 'offset_lr_scale'}


def get_layer_id(name, depths, total):
    """Upstream's layer id of parameter ``name`` (0 .. total - 1)."""
    if name.startswith(_LAYER0_PREFIXES) or 'level_embeds' in name or name.split('.')[0] == 'level_embed':
        return 0
    if name.startswith('backbone.levels.'):
        parts = name.split('.')
        level = int(parts[2])
        if parts[3] in ('downsample', 'norm'):
            # The last level has no downsample; its norm shares the id of level 2's downsample.
            return 1 + sum(depths[:min(level, 2) + 1])
        return int(parts[4]) + 1 + sum(depths[:level])
    return total - 1


def is_no_decay(name, param):
    """Whether upstream exempts ``param`` from weight decay."""
    return param.ndim == 1 or name.endswith('.bias') or any(word in name for word in _NO_DECAY_WORDS)


def is_offset_param(name):
    """Offset predictors (DCNv4 offset/mask projection, deformable attention) get ``offset_lr_scale``."""
    return ('sampling_offsets' in name or 'reference_points' in name
            or ('offset_mask' in name and 'offset_mask_dw' not in name))


# The root registry is enough: mmdet's, mmseg's and mmdet3d's registries look names up in their parent.
@register('OPTIM_WRAPPER_CONSTRUCTORS', codebases=())
class CustomLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Upstream FlashInternImage's layer-wise lr decay as an mmengine optim-wrapper constructor.

    ``paramwise_cfg`` keys: ``depths`` (required), ``num_layers`` (default ``sum(depths)``),
    ``layer_decay_rate`` (default 1.0), ``offset_lr_scale`` (default 1.0). Parameters are grouped by
    (layer id, weight decay or not, offset or not); each group carries ``lr``, ``weight_decay``,
    ``lr_scale``, ``group_name`` and ``param_names``.
    """

    def _validate_cfg(self):
        super()._validate_cfg()
        unknown = set(self.paramwise_cfg) - _PARAMWISE_KEYS
        if unknown:
            raise ValueError(f'CustomLayerDecayOptimizerConstructor takes paramwise_cfg keys '
                             f'{sorted(_PARAMWISE_KEYS)}, got unknown {sorted(unknown)}')
        if 'depths' not in self.paramwise_cfg:
            raise ValueError('CustomLayerDecayOptimizerConstructor needs paramwise_cfg.depths (the '
                             'backbone depths, e.g. [4, 4, 18, 4])')

    def add_params(self, params, module, prefix='', is_dcn_module=None):
        cfg = self.paramwise_cfg
        depths = list(cfg['depths'])
        total = cfg.get('num_layers', sum(depths)) + 2
        rate = cfg.get('layer_decay_rate', 1.0)
        offset_lr_scale = cfg.get('offset_lr_scale', 1.0)
        base_wd = self.base_wd or 0.

        groups = {}
        for name, param in module.named_parameters(prefix=prefix):
            if not param.requires_grad:
                continue
            layer_id = get_layer_id(name, depths, total)
            no_decay = is_no_decay(name, param)
            offset = is_offset_param(name)
            group_name = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}{"_offset" if offset else ""}'
            if group_name not in groups:
                scale = rate ** (total - layer_id - 1) * (offset_lr_scale if offset else 1.)
                groups[group_name] = dict(params=[], param_names=[], lr_scale=scale, group_name=group_name,
                                          lr=scale * self.base_lr, weight_decay=0. if no_decay else base_wd)
            groups[group_name]['params'].append(param)
            groups[group_name]['param_names'].append(name)
        self._log_groups(groups, rate, total)
        params.extend(groups.values())

    @staticmethod
    def _log_groups(groups, rate, total):
        if get_dist_info()[0] != 0:
            return
        summary = {name: {key: group[key] for key in ('lr', 'lr_scale', 'weight_decay', 'param_names')}
                   for name, group in groups.items()}
        MMLogger.get_current_instance().info(
            f'CustomLayerDecayOptimizerConstructor: layer_decay_rate {rate}, {total} layer ids; param groups = '
            f'{json.dumps(summary, indent=2)}')

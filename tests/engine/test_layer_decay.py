"""CustomLayerDecayOptimizerConstructor: the lr and weight decay of every parameter, per spec section 4.

The expectations are written out by hand from the spec for T (depths 4, 4, 18, 4: blocks get ids 1..30,
``total`` = 32), independently of the constructor's code.
"""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from torch import nn

import mmdcnv4  # noqa: F401  (registers the constructor)
from mmdcnv4.models import FlashInternImage

BASE_LR, BASE_WD, RATE, OFFSET_SCALE = 2e-4, 0.05, 0.9, 0.01
TOTAL = 32
# Id of block 0 of each level and of each level's downsample/norm (the last level's norm shares level
# 2's id), for T.
FIRST_BLOCK_ID = (1, 5, 9, 27)
LEVEL_TAIL_ID = (5, 9, 27, 27)


class ToyDetector(nn.Module):
    """A backbone plus parameters named as in upstream's detection and segmentation heads."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.neck = nn.ModuleDict(dict(lateral_conv=nn.Conv2d(64, 8, 1), ln=nn.LayerNorm(8)))
        self.bbox_head = nn.Module()
        self.bbox_head.transformer = nn.Module()
        self.bbox_head.transformer.level_embeds = nn.Parameter(torch.zeros(4, 8))
        self.bbox_head.transformer.sampling_offsets = nn.Linear(8, 16)
        self.bbox_head.transformer.reference_points = nn.Linear(8, 2)
        self.bbox_head.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))
        self.bbox_head.fc_cls = nn.Linear(8, 3)
        self.level_embed = nn.Parameter(torch.zeros(4, 8))  # mmdet 3.x's name of level_embeds
        self.decode_head = nn.Module()
        for name in ('mask_embed', 'cls_embed', 'query_embed', 'query_feat', 'level_embed'):
            setattr(self.decode_head, name, nn.Linear(8, 8) if 'embed' in name and name != 'query_embed'
                    else nn.Embedding(5, 8))
        self.decode_head.conv_seg = nn.Conv2d(8, 3, 1)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def expected_layer_id(name):
    parts = name.split('.')
    if name.startswith('backbone.patch_embed') or 'level_embeds' in name or name == 'level_embed':
        return 0
    if parts[0] == 'decode_head' and parts[1] in ('mask_embed', 'cls_embed', 'level_embed', 'query_embed',
                                                  'query_feat'):
        return 0
    if name.startswith('backbone.levels.'):
        level = int(parts[2])
        if parts[3] == 'blocks':
            return FIRST_BLOCK_ID[level] + int(parts[4])
        assert parts[3] in ('downsample', 'norm'), name
        return LEVEL_TAIL_ID[level]
    return TOTAL - 1


def expected_lr_wd(name, param):
    lr = BASE_LR * RATE ** (TOTAL - expected_layer_id(name) - 1)
    if 'sampling_offsets' in name or 'reference_points' in name or (
            'offset_mask' in name and 'offset_mask_dw' not in name):
        lr *= OFFSET_SCALE
    no_decay = (param.ndim == 1 or name.endswith('.bias') or 'norm' in name or 'relative_position' in name
                or 'sampling_offsets' in name)
    return lr, 0. if no_decay else BASE_WD


def build(model, scope='mmdet', depths=(4, 4, 18, 4), num_layers=30):
    cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=BASE_WD),
               constructor='CustomLayerDecayOptimizerConstructor',
               paramwise_cfg=dict(num_layers=num_layers, layer_decay_rate=RATE, depths=list(depths),
                                  offset_lr_scale=OFFSET_SCALE))
    with DefaultScope.overwrite_default_scope(scope):
        return build_optim_wrapper(model, cfg).optimizer


def settings_by_param(optimizer):
    found = {}
    for group in optimizer.param_groups:
        for param in group['params']:
            assert id(param) not in found, 'a parameter is in two groups'
            found[id(param)] = (group['lr'], group['weight_decay'])
    return found


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_every_parameter_of_t_detector(scope):
    model = ToyDetector(FlashInternImage('t', layer_scale=1.0))
    found = settings_by_param(build(model, scope))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(found) == len(trainable) and id(model.frozen) not in found
    ids = set()
    for name, param in trainable:
        lr, wd = found[id(param)]
        expected_lr, expected_wd = expected_lr_wd(name, param)
        assert lr == pytest.approx(expected_lr, rel=1e-12), name
        assert wd == expected_wd, name
        ids.add(expected_layer_id(name))
    assert ids == set(range(TOTAL))  # every layer id is used, stem (0) to heads (31)
    # Spot checks of the rules on concrete names.
    named = dict(model.named_parameters())
    assert found[id(named['backbone.levels.2.blocks.17.dcn.offset_mask.weight'])] == pytest.approx(
        (BASE_LR * RATE ** 5 * OFFSET_SCALE, BASE_WD))
    assert found[id(named['backbone.levels.3.norm.0.weight'])] == pytest.approx((BASE_LR * RATE ** 4, 0.))
    assert found[id(named['backbone.patch_embed.conv1.weight'])] == pytest.approx((BASE_LR * RATE ** 31, BASE_WD))
    assert found[id(named['decode_head.query_feat.weight'])] == pytest.approx((BASE_LR * RATE ** 31, BASE_WD))
    assert found[id(named['bbox_head.fc_cls.weight'])] == pytest.approx((BASE_LR, BASE_WD))


def test_offset_mask_dw_gets_no_offset_scale():
    backbone = FlashInternImage('t', channels=32, depths=(1, 1, 2, 1), groups=(2, 4, 8, 16), dw_kernel_size=3,
                                post_norm=True, layer_scale=1.0)
    model = ToyDetector.__new__(ToyDetector)
    nn.Module.__init__(model)
    model.backbone = backbone
    found = settings_by_param(build(model, depths=(1, 1, 2, 1), num_layers=5))
    dw = backbone.levels[2].blocks[1].dcn.offset_mask_dw
    om = backbone.levels[2].blocks[1].dcn.offset_mask
    # Level 2 block 1: id 1 + 2 + 1 = 4 of total 7.
    assert found[id(dw.weight)] == pytest.approx((BASE_LR * RATE ** 2, BASE_WD))
    assert found[id(dw.bias)] == pytest.approx((BASE_LR * RATE ** 2, 0.))
    assert found[id(om.weight)] == pytest.approx((BASE_LR * RATE ** 2 * OFFSET_SCALE, BASE_WD))


def test_rejects_unknown_paramwise_keys():
    model = ToyDetector.__new__(ToyDetector)
    nn.Module.__init__(model)
    model.backbone = nn.Linear(2, 2)
    cfg = dict(optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=BASE_WD),
               constructor='CustomLayerDecayOptimizerConstructor',
               paramwise_cfg=dict(num_layers=30, layer_decay_rate=RATE, depths=[4, 4, 18, 4], decay_rate=0.9))
    with pytest.raises(ValueError, match='decay_rate'):
        build_optim_wrapper(model, cfg)
    cfg['paramwise_cfg'] = dict(num_layers=30)
    with pytest.raises(ValueError, match='depths'):
        build_optim_wrapper(model, cfg)

"""DCNv4 as layers: the upstream module, and the mmcv conv layer inside mmdet's ResNet."""
import pytest
import torch

from mmdcnv4.ops import DCNv4, DCNv4Conv2d


def test_upstream_module_parameters_and_zero_start():
    module = DCNv4(channels=64, group=4, dw_kernel_size=3, center_feature_scale=True, output_bias=False)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        'offset_mask_dw.weight': (64, 1, 3, 3), 'offset_mask_dw.bias': (64,),
        'offset_mask.weight': (112, 64), 'offset_mask.bias': (112,),  # ceil(27 * 4 / 8) * 8
        'value_proj.weight': (64, 64), 'value_proj.bias': (64,), 'output_proj.weight': (64, 64),
        'center_feature_scale_proj_weight': (4, 64), 'center_feature_scale_proj_bias': (4,)}
    x = torch.randn(2, 5 * 7, 64)
    # A fresh module outputs zero (no offsets, zero weights); without the gate it is exactly zero.
    plain = DCNv4(channels=64, group=4)
    assert torch.equal(plain(x, shape=(5, 7)), torch.zeros(2, 35, 64))


def test_upstream_module_tokens_and_maps_agree_on_non_square_maps():
    module = DCNv4(channels=32, group=2)
    torch.nn.init.normal_(module.offset_mask.weight, std=0.1)
    torch.nn.init.normal_(module.offset_mask.bias, std=0.5)
    x = torch.randn(2, 5, 9, 32)
    out_map = module(x)
    out_tokens = module(x.reshape(2, 45, 32), shape=(5, 9))
    assert out_map.shape == (2, 5, 9, 32)
    torch.testing.assert_close(out_tokens.reshape(2, 5, 9, 32), out_map)
    with pytest.raises(ValueError, match='shape=\\(H, W\\)'):
        module(x.reshape(2, 45, 32))
    with pytest.raises(ValueError, match='does not match'):
        module(x.reshape(2, 45, 32), shape=(9, 9))


def test_conv_layer_through_mmcv_registry():
    from mmcv.cnn import build_conv_layer
    layer = build_conv_layer(dict(type='DCNv4', deform_groups=2), 32, 48, 3, stride=2, padding=1, dilation=1,
                             bias=False)
    assert isinstance(layer, DCNv4Conv2d) and layer.group == 2 and layer.output_proj.bias is None
    x = torch.randn(2, 32, 11, 14, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 48, 6, 7)
    assert y.abs().sum() > 0  # starts as a box filter, not as zero
    y.square().mean().backward()
    assert x.grad.abs().sum() > 0 and layer.offset_mask.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_mask_rcnn_resnet50_with_dcnv4_trains_a_step():
    """mmdet's ResNet with dcn=dict(type='DCNv4') in stages 2-4, as DCNv2 configs do it."""
    import numpy as np
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.hub import get_config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.structures import InstanceData

    init_default_scope('mmdet')
    cfg = get_config('mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    cfg.model.backbone.update(dcn=dict(type='DCNv4', deform_groups=4, fallback_on_stride=False),
                              stage_with_dcn=(False, True, True, True), init_cfg=None)
    model = MODELS.build(cfg.model)
    dcn_layers = [m for m in model.backbone.modules() if isinstance(m, DCNv4Conv2d)]
    assert len(dcn_layers) == 4 + 6 + 3  # every bottleneck of stages 2-4
    h, w = 96, 128
    samples = []
    for _ in range(2):
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                             scale_factor=(1.0, 1.0)))
        masks = np.zeros((2, h, w), dtype=np.uint8)
        masks[0, 10:50, 20:70] = 1
        masks[1, 40:90, 60:120] = 1
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[20., 10., 70., 50.], [60., 40., 120., 90.]]),
                                           labels=torch.tensor([1, 5]), masks=BitmapMasks(masks, h, w))
        samples.append(sample)
    batch = dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for _ in range(2)],
                 data_samples=samples)
    optim_wrapper = build_optim_wrapper(model, dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)))
    before = dcn_layers[0].offset_mask.weight.detach().clone()
    model.train()
    losses = model.train_step(batch, optim_wrapper)
    assert all(torch.isfinite(v) for v in losses.values())
    assert not torch.equal(before, dcn_layers[0].offset_mask.weight.detach())  # the DCNv4 layers learn

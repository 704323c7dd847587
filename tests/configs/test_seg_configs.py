"""The mmseg configs: every recipe builds its model, optimizer and data pipelines; small versions of UperNet
and Mask2Former train one iteration through mmengine's Runner, and the saved checkpoint segments an image
through mmseg's inference API (tools/seg_demo.py).

Full-size models are built on the meta device (structure and parameter counts only); the data comes from
mmdcnv4.datasets.synthetic_ade, written once per session into a temporary folder.
"""
import copy
import glob
import importlib.util
import os.path as osp

import numpy as np
import pytest
import torch

import mmdcnv4  # noqa: F401  (registers FlashInternImage and the layer-decay constructor)
import mmdcnv4.datasets.synthetic_ade as synthetic_ade

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
UPERNET = sorted(glob.glob(osp.join(ROOT, 'configs', 'upernet', '*.py')))
MASK2FORMER = sorted(glob.glob(osp.join(ROOT, 'configs', 'mask2former', '*.py')))
SWAP = sorted(glob.glob(osp.join(ROOT, 'configs', 'swap_backbone', 'upernet*.py')))
DEMO = osp.join(ROOT, 'configs', 'demo', 'upernet_flash-internimage-demo_synthetic-ade.py')
ALL = UPERNET + MASK2FORMER + SWAP + [DEMO]

# Spec section 2 (layer_scale=1.0 gives T 2 x 30 x C_i gamma parameters more than its ImageNet model).
BACKBONE_PARAMS = {'t': 28_666_624, 's': 48_490_176, 'b': 94_897_048, 'l': 218_914_640}
# Spec section 5: arch -> (crop, drop_path, lr, layer decay) of the ADE20K recipes.
UPERNET_RECIPES = {'t': (512, 0.2, 6e-5, 1.0), 's': (512, 0.3, 6e-5, 1.0), 'b': (512, 0.3, 6e-5, 1.0),
                   'l': (640, 0.4, 2e-5, 0.94)}
MASK2FORMER_RECIPES = {'t': (512, 0.2, 1e-4, 0.9), 's': (640, 0.3, 1e-4, 1.0), 'b': (640, 0.4, 1e-4, 1.0),
                       'l': (640, 0.5, 1e-4, 0.94)}
DEPTHS = {'t': [4, 4, 18, 4], 's': [4, 4, 21, 4], 'b': [4, 4, 21, 4], 'l': [5, 5, 22, 5]}


def _name(path):
    return osp.splitext(osp.basename(path))[0]


def _load(path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    if path in SWAP and importlib.util.find_spec('pkg_resources') is None:
        pytest.fail("mmengine 0.10 resolves 'mmseg::' bases through pkg_resources, which setuptools >= 81 "
                    'no longer ships: install setuptools>=77,<81 (torch 2.13 needs >= 77)')
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    return cfg


def _point_at(cfg, root):
    """Every dataloader of ``cfg`` reads ``root``, in the main process."""
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg[key]
        loader.dataset.data_root = root
        loader.num_workers = 0
        loader.persistent_workers = False


@pytest.fixture(scope='module')
def synth_root(tmp_path_factory):
    return synthetic_ade.generate(str(tmp_path_factory.mktemp('synthetic_ade')), num_train=4, num_val=2, size=64)


# --- the generator ----------------------------------------------------------------------------------------


def test_synthetic_ade_layout_and_determinism(synth_root, tmp_path):
    for split, count in (('training', 4), ('validation', 2)):
        images = sorted(glob.glob(osp.join(synth_root, 'images', split, '*.jpg')))
        labels = sorted(glob.glob(osp.join(synth_root, 'annotations', split, '*.png')))
        assert len(images) == len(labels) == count
        assert [_name(p) for p in images] == [_name(p) for p in labels]
    import cv2
    label = cv2.imread(labels[0], cv2.IMREAD_UNCHANGED)
    assert label.dtype == np.uint8 and label.shape == (64, 64)
    assert set(np.unique(label)) <= set(range(len(synthetic_ade.CLASSES) + 1))
    assert synthetic_ade.is_complete(synth_root, 4, 2, 64) and not synthetic_ade.is_complete(synth_root)
    # a pure function of (seed, split, index); index 0 (ignored) and the classes all occur
    image_a, label_a = synthetic_ade.make_sample(0, 'training', 3, 64)
    image_b, label_b = synthetic_ade.make_sample(0, 'training', 3, 64)
    assert np.array_equal(image_a, image_b) and np.array_equal(label_a, label_b)
    assert not np.array_equal(label_a, synthetic_ade.make_sample(1, 'training', 3, 64)[1])
    seen = set()
    for i in range(30):
        seen |= set(np.unique(synthetic_ade.make_sample(0, 'training', i, 64)[1]).tolist())
    assert seen == set(range(len(synthetic_ade.CLASSES) + 1))
    synthetic_ade.main([str(tmp_path), '--num-train', '1', '--num-val', '1', '--size', '32'])
    assert synthetic_ade.is_complete(str(tmp_path), 1, 1, 32)


def test_demo_config_matches_generator():
    cfg = _load(DEMO)
    meta = cfg.train_dataloader.dataset.metainfo
    assert tuple(meta['classes']) == synthetic_ade.CLASSES
    assert [list(c) for c in meta['palette']] == synthetic_ade.PALETTE
    assert cfg.model.decode_head.num_classes == len(synthetic_ade.CLASSES)


# --- every config: model, optimizer, pipelines -----------------------------------------------------------


@pytest.mark.parametrize('path', ALL, ids=_name)
def test_config_builds(path, synth_root):
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import DATASETS, MODELS
    cfg = _load(path)
    assert 'mmdcnv4' in cfg.custom_imports['imports']
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    backbone = model.backbone
    assert type(backbone).__name__ == 'FlashInternImage'
    assert list(cfg.model.decode_head.in_channels) == backbone.num_features
    if 'auxiliary_head' in cfg.model:
        assert cfg.model.auxiliary_head.in_channels == backbone.num_features[2]
    arch = cfg.model.backbone.arch
    if path != DEMO:
        assert sum(p.numel() for p in backbone.parameters()) == BACKBONE_PARAMS[arch]
        assert cfg.model.backbone.init_cfg.type == 'Pretrained'
    # the optimizer groups (layer decay and its decode_head embedding rule for Mask2Former)
    optim_wrapper = build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))
    assert len(optim_wrapper.optimizer.param_groups) > 1 or path in SWAP + [DEMO]
    # the pipelines, on the synthetic ADE20K-format set
    _point_at(cfg, synth_root)
    num_classes = cfg.model.decode_head.num_classes
    for key in ('train_dataloader', 'val_dataloader'):
        dataset = DATASETS.build(cfg[key].dataset)
        sample = dataset[0]
        assert sample['inputs'].shape[0] == 3
        labels = set(sample['data_samples'].gt_sem_seg.data.unique().tolist())
        assert labels <= set(range(num_classes)) | {255}
        if key == 'train_dataloader':  # at most the crop; the data preprocessor pads it to the crop
            crop = cfg.model.data_preprocessor.size
            assert all(s <= c for s, c in zip(sample['inputs'].shape[1:], crop))


@pytest.mark.parametrize('path', UPERNET + MASK2FORMER, ids=_name)
def test_recipe_values(path):
    """Crop, drop path, lr, layer decay and the schedule as spec section 5; the layer-decay lr scales."""
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS
    cfg = _load(path)
    arch = cfg.model.backbone.arch
    is_m2f = path in MASK2FORMER
    crop, drop_path, lr, decay = (MASK2FORMER_RECIPES if is_m2f else UPERNET_RECIPES)[arch]
    assert f'{crop}x{crop}' in path and tuple(cfg.crop_size) == (crop, crop)
    assert tuple(cfg.model.data_preprocessor.size) == (crop, crop)
    assert cfg.model.backbone.drop_path_rate == drop_path and cfg.model.backbone.layer_scale == 1.0
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW' and optim.optimizer.lr == lr and optim.optimizer.weight_decay == 0.05
    assert optim.constructor == 'CustomLayerDecayOptimizerConstructor'
    assert optim.paramwise_cfg.layer_decay_rate == decay and optim.paramwise_cfg.depths == DEPTHS[arch]
    assert optim.paramwise_cfg.num_layers == sum(DEPTHS[arch])
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_cfg.max_iters == 160000
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end, poly.type, poly.begin, poly.power) == ('LinearLR', 1500, 'PolyLR', 1500, 1.0)
    assert cfg.train_dataloader.dataset.data_root == 'data/ade/ADEChallengeData2016'
    if is_m2f:
        head = cfg.model.decode_head
        assert head.num_queries == (100 if arch == 't' else 200)
        assert head.transformer_decoder.num_layers == 9
        encoder = head.pixel_decoder.encoder
        attn = encoder.layer_cfg.self_attn_cfg
        assert (encoder.num_layers, attn.num_heads, attn.num_levels, attn.num_points) == (6, 8, 3, 4)
        assert optim.clip_grad.max_norm == 0.1
    else:
        assert cfg.model.decode_head.channels == 512
        assert cfg.model.auxiliary_head.in_index == 2 and cfg.model.auxiliary_head.loss_decode.loss_weight == 0.4
    if decay != 1.0:
        # the query/level/class embeddings of Mask2Former share the stem's (smallest) lr scale
        with torch.device('meta'):
            model = MODELS.build(cfg.model)
        groups = build_optim_wrapper(model, copy.deepcopy(optim)).optimizer.param_groups
        scale = {name: g['lr_scale'] for g in groups for name in g['param_names']}
        total = sum(DEPTHS[arch]) + 2
        assert scale['backbone.patch_embed.conv1.weight'] == pytest.approx(decay ** (total - 1))
        top = 'decode_head.transformer_decoder.post_norm.weight' if is_m2f else 'decode_head.conv_seg.weight'
        assert scale[top] == 1.0
        if is_m2f:
            for name in ('decode_head.query_feat.weight', 'decode_head.query_embed.weight',
                         'decode_head.level_embed.weight', 'decode_head.cls_embed.weight',
                         'decode_head.mask_embed.0.weight'):
                assert scale[name] == pytest.approx(decay ** (total - 1)), name


# --- one training iteration and inference from the saved checkpoint --------------------------------------

# A FlashInternImage of 4 blocks, 16..128 channels (16 channels per DCNv4 group, as every preset).
TINY_BACKBONE = dict(arch='t', channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], drop_path_rate=0.1,
                     init_cfg=None)


def _shrink_for_cpu(cfg, root, work_dir, crop=64):
    """Tiny backbone, 64x64 crops, 1 iteration, a checkpoint at the end, data from ``root``."""
    cfg.model.backbone.update(TINY_BACKBONE)
    cfg.optim_wrapper.paramwise_cfg.update(num_layers=4, depths=[1, 1, 1, 1])
    cfg.crop_size = (crop, crop)
    cfg.model.data_preprocessor.size = (crop, crop)
    for t in cfg.train_dataloader.dataset.pipeline:
        if t.type == 'RandomResize':
            t.scale = (4 * crop, crop)
        if t.type == 'RandomCrop':
            t.crop_size = (crop, crop)
    for t in cfg.test_pipeline:
        if t.type == 'Resize':
            t.scale = (4 * crop, crop)
    cfg.val_dataloader.dataset.pipeline = cfg.test_pipeline
    cfg.test_dataloader.dataset.pipeline = cfg.test_pipeline
    _point_at(cfg, root)
    cfg.train_cfg.update(max_iters=1, val_interval=1000)
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=1)
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.visualization = dict(type='SegVisualizationHook')
    cfg.work_dir = work_dir
    cfg.env_cfg.dist_cfg = dict(backend='gloo')
    return cfg


def _seg_demo():
    spec = importlib.util.spec_from_file_location('seg_demo', osp.join(ROOT, 'tools', 'seg_demo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_one_iteration_then_segment(cfg, root, tmp_path, demo_args=()):
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert np.isfinite(runner.message_hub.get_scalar('train/loss').current())
    model_types = {type(m).__name__ for m in runner.model.modules()}
    checkpoint = osp.join(cfg.work_dir, 'iter_1.pth')
    assert osp.isfile(checkpoint)

    # inference API on the saved checkpoint, through tools/seg_demo.py
    seg_demo = _seg_demo()
    config_file = osp.join(str(tmp_path), 'config.py')
    cfg.dump(config_file)
    image = sorted(glob.glob(osp.join(root, 'images', 'validation', '*.jpg')))[0]
    out_file = osp.join(str(tmp_path), 'mask.png')
    seg_demo.main([image, config_file, checkpoint, '--out-file', out_file,
                   '--overlay-file', osp.join(str(tmp_path), 'overlay.png'), *demo_args])
    import cv2
    mask = cv2.imread(out_file)
    assert mask.shape == (64, 64, 3)  # the original image size
    model = seg_demo.load_model(config_file, checkpoint)
    assert list(model.dataset_meta['classes'])[:2] == ['wall', 'building']  # ADE20K's, from the checkpoint
    pred = seg_demo.segment(model, image)
    palette = np.asarray(model.dataset_meta['palette'], np.uint8)
    assert np.array_equal(mask[..., ::-1], palette[pred])
    return model_types


def test_upernet_one_iteration_and_inference(synth_root, tmp_path):
    cfg = _load([p for p in UPERNET if 'flash-internimage-t' in p][0])
    cfg = _shrink_for_cpu(cfg, synth_root, str(tmp_path / 'work'))
    cfg.model.decode_head.update(channels=32, in_channels=[16, 32, 64, 128])
    cfg.model.auxiliary_head.update(channels=16, in_channels=64)
    _train_one_iteration_then_segment(cfg, synth_root, tmp_path)


def test_mask2former_one_iteration_and_sliding_inference(synth_root, tmp_path):
    cfg = _load([p for p in MASK2FORMER if 'flash-internimage-t' in p][0])
    cfg = _shrink_for_cpu(cfg, synth_root, str(tmp_path / 'work'))
    head = cfg.model.decode_head
    head.update(in_channels=[16, 32, 64, 128], feat_channels=32, out_channels=32, num_queries=8)
    head.pixel_decoder.encoder.num_layers = 1
    head.pixel_decoder.encoder.layer_cfg.self_attn_cfg.embed_dims = 32
    head.pixel_decoder.encoder.layer_cfg.ffn_cfg.update(embed_dims=32, feedforward_channels=64)
    head.pixel_decoder.positional_encoding.num_feats = 16
    head.positional_encoding.num_feats = 16
    head.transformer_decoder.num_layers = 3
    layer = head.transformer_decoder.layer_cfg
    layer.self_attn_cfg.embed_dims = layer.cross_attn_cfg.embed_dims = 32
    layer.ffn_cfg.update(embed_dims=32, feedforward_channels=64)
    head.train_cfg.num_points = 256
    # windows smaller than the image, so that the sliding-window path is the one tested
    cfg.model.test_cfg = dict(mode='slide', crop_size=(48, 48), stride=(32, 32))
    # the documented switch to mmdcnv4's fused MSDA (training) and seg_demo's --flash-msda (inference)
    cfg.custom_hooks = [dict(type='FlashMSDAHook')]
    model_types = _train_one_iteration_then_segment(cfg, synth_root, tmp_path, ['--flash-msda'])
    assert 'FlashMultiScaleDeformableAttention' in model_types
    assert 'MultiScaleDeformableAttention' not in model_types

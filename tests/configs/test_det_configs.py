"""The mmdet configs: every recipe builds its model, its optimizer and its data pipelines; small versions
of Mask R-CNN, Cascade Mask R-CNN and DINO train through mmengine's Runner; a checkpoint is saved,
resumed, tested with COCO metrics and used by mmdet's inference API.

Full-size models are built on the meta device (structure and parameter counts only). The data is a tiny
set from mmdcnv4.datasets.synthetic_coco, written once per module into a temporary folder.
"""
import copy
import glob
import os.path as osp

import pytest
import torch

import mmdcnv4  # noqa: F401  (registers FlashInternImage, LN2d and the layer-decay constructor)
from mmdcnv4.datasets.synthetic_coco import CLASSES, PALETTE, generate_synthetic_coco

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MASK_RCNN = sorted(glob.glob(osp.join(ROOT, 'configs', 'mask_rcnn', '*.py')))
CASCADE = sorted(glob.glob(osp.join(ROOT, 'configs', 'cascade_rcnn', '*.py')))
DINO = sorted(glob.glob(osp.join(ROOT, 'configs', 'dino', '*.py')))
SWAP = sorted(glob.glob(osp.join(ROOT, 'configs', 'swap_backbone', 'mask-rcnn*.py')))
DEMO = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_flash-internimage-demo_synthetic-coco.py')
ALL = MASK_RCNN + CASCADE + DINO + SWAP + [DEMO]

# Spec sections 2 and 5. Backbone parameters with layer_scale=1.0 (gamma parameters included).
BACKBONE_PARAMS = {'t': 28_666_624, 's': 48_490_176, 'b': 94_897_048, 'l': 218_914_640}
CHANNELS = {'t': 64, 's': 80, 'b': 112, 'l': 160}
DEPTHS = {'t': [4, 4, 18, 4], 's': [4, 4, 21, 4], 'b': [4, 4, 21, 4], 'l': [5, 5, 22, 5]}
# (method, arch, schedule) -> (drop_path, with_cp, lr, layer decay, offset_lr_scale, images per GPU)
RECIPES = {
    ('mask-rcnn', 't', '1x'): (0.2, True, 1e-4, 1.0, 1.0, 2),
    ('mask-rcnn', 't', '3x'): (0.2, True, 1e-4, 1.0, 1.0, 2),
    ('mask-rcnn', 's', '1x'): (0.3, True, 1e-4, 1.0, 1.0, 2),
    ('mask-rcnn', 's', '3x'): (0.4, True, 2e-4, 1.0, 1.0, 8),
    ('mask-rcnn', 'b', '1x'): (0.3, True, 1e-4, 1.0, 1.0, 2),
    ('mask-rcnn', 'b', '3x'): (0.4, True, 2e-4, 0.9, 0.01, 4),
    ('cascade-mask-rcnn', 'l', '1x'): (0.4, False, 1e-4, 0.94, 1.0, 2),
    ('cascade-mask-rcnn', 'l', '3x'): (0.4, True, 2e-4, 0.90, 0.01, 4),
}
# arch -> (drop_path, lr, weight decay, layer decay or None, images per GPU)
DINO_RECIPES = {'t': (0.2, 2e-4, 1e-4, 0.9, 4), 's': (0.3, 2e-4, 1e-4, 0.9, 4),
                'b': (0.3, 2e-4, 1e-4, 0.9, 4), 'l': (0.4, 1e-4, 0.05, None, 2)}

TINY_BACKBONE = dict(type='FlashInternImage', arch='t', channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8],
                     layer_scale=1.0, drop_path_rate=0.1, out_indices=(0, 1, 2, 3), with_cp=False,
                     init_cfg=None)
TINY_SIZE = 96


def _name(path):
    return osp.splitext(osp.basename(path))[0]


def _load(path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return cfg


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
    info = generate_synthetic_coco(str(tmp_path_factory.mktemp('synthetic_coco')), num_train=4, num_val=2,
                                   size=TINY_SIZE, min_size=20, max_size=40, max_objects=2, seed=1)
    return info['data_root']


def _point_at(cfg, root):
    """Every dataloader and evaluator of ``cfg`` reads the synthetic set in ``root``, in the main process."""
    metainfo = dict(classes=CLASSES, palette=list(PALETTE))
    for key, split in (('train_dataloader', 'train'), ('val_dataloader', 'val'), ('test_dataloader', 'val')):
        loader = cfg[key]
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.dataset.update(data_root=root, ann_file=f'annotations/instances_{split}.json',
                              data_prefix=dict(img=f'{split}/'), metainfo=metainfo)
    for key in ('val_evaluator', 'test_evaluator'):
        cfg[key].ann_file = osp.join(root, 'annotations', 'instances_val.json')


def _recipe_key(path):
    """(method, arch, schedule) from a name like mask-rcnn_flash-internimage-t_fpn_1x_coco."""
    name = _name(path)
    for method in ('cascade-mask-rcnn', 'mask-rcnn'):
        head = method + '_flash-internimage-'
        if name.startswith(head):
            return method, name[len(head)], name.split('_')[3]
    raise AssertionError(f'unexpected config name {name}')


# ----------------------------------------------------------------------------------------------------------
# every config: model and pipelines
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('path', ALL, ids=_name)
def test_config_builds_model(path):
    from mmdet.registry import MODELS
    cfg = _load(path)
    assert cfg.default_scope == 'mmdet'
    assert 'mmdcnv4' in cfg.custom_imports.imports
    assert cfg.auto_scale_lr.enable is False and cfg.auto_scale_lr.base_batch_size > 0
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    # the optimizer (layer-wise lr decay constructor where the recipe has one) accepts the model
    from mmengine.optim import build_optim_wrapper
    groups = build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups
    assert sum(len(g['params']) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert max(g['lr'] for g in groups) == pytest.approx(cfg.optim_wrapper.optimizer.lr)
    backbone = cfg.model.backbone
    if backbone.type == 'FlashInternImage' and backbone.get('channels') is None:  # a full-size recipe
        arch = backbone.arch
        assert sum(p.numel() for p in model.backbone.parameters()) == BACKBONE_PARAMS[arch]
        assert backbone.layer_scale == 1.0
        assert backbone.init_cfg.type == 'Pretrained'
        assert osp.basename(backbone.init_cfg.checkpoint).startswith(f'flash_intern_image_{arch}_')
    if cfg.model.type in ('MaskRCNN', 'CascadeRCNN'):
        assert cfg.model.neck.type == 'FPN'
        assert [c.conv.in_channels for c in model.neck.lateral_convs] == model.backbone.num_features
        if path not in SWAP:  # the swap config keeps mmdet's plain FPN on purpose
            assert cfg.model.neck.norm_cfg.type == 'LN2d'
            assert type(model.neck.lateral_convs[0].norm).__name__ == 'LayerNorm2d'


@pytest.mark.parametrize('path', MASK_RCNN + CASCADE, ids=_name)
def test_rcnn_recipe_values(path):
    cfg = _load(path)
    method, arch, schedule = _recipe_key(path)
    drop_path, with_cp, lr, decay, offset_scale, per_gpu = RECIPES[(method, arch, schedule)]
    backbone = cfg.model.backbone
    assert (backbone.arch, backbone.drop_path_rate, backbone.with_cp) == (arch, drop_path, with_cp)
    assert cfg.model.neck.in_channels == [CHANNELS[arch] * 2 ** i for i in range(4)]
    assert cfg.model.neck.out_channels == 256 and cfg.model.neck.num_outs == 5
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW'
    assert optim.optimizer.lr == pytest.approx(lr) and optim.optimizer.weight_decay == 0.05
    assert optim.constructor == 'CustomLayerDecayOptimizerConstructor'
    assert optim.paramwise_cfg == dict(num_layers=sum(DEPTHS[arch]), layer_decay_rate=decay,
                                       depths=DEPTHS[arch], offset_lr_scale=offset_scale)
    assert cfg.train_dataloader.batch_size == per_gpu
    assert cfg.auto_scale_lr.base_batch_size == 8 * per_gpu
    epochs, steps = {'1x': (12, [8, 11]), '3x': (36, [27, 33])}[schedule]
    assert cfg.train_cfg.max_epochs == epochs
    warmup, step = cfg.param_scheduler
    assert (warmup.type, warmup.by_epoch, warmup.end, warmup.start_factor) == ('LinearLR', False, 500, 0.001)
    assert step.type == 'MultiStepLR' and step.milestones == steps
    resizes = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'Resize']
    if schedule == '1x':
        assert resizes and resizes[0].scale == (1333, 800)
    else:
        assert any(t.type == 'RandomChoice' for t in cfg.train_dataloader.dataset.pipeline)
    hooks = cfg.get('custom_hooks', [])
    if method == 'cascade-mask-rcnn':
        for head in cfg.model.roi_head.bbox_head:
            assert (head.type, head.num_shared_convs, head.num_shared_fcs) == ('ConvFCBBoxHead', 4, 1)
            assert head.norm_cfg.type == 'SyncBN' and head.reg_decoded_bbox
            assert head.loss_bbox == dict(type='GIoULoss', loss_weight=10.0)
        ema = [h for h in hooks if h.type == 'EMAHook']
        if schedule == '3x':
            assert len(ema) == 1 and ema[0].ema_type == 'ExpMomentumEMA' and ema[0].momentum == 1e-4
        else:
            assert not ema


@pytest.mark.parametrize('path', DINO, ids=_name)
def test_dino_recipe_values(path):
    cfg = _load(path)
    arch = _name(path).split('_')[1].split('-')[-1]
    drop_path, lr, wd, decay, per_gpu = DINO_RECIPES[arch]
    model = cfg.model
    assert model.type == 'DINO' and model.num_queries == 900 and model.as_two_stage and model.with_box_refine
    assert model.backbone.out_indices == (1, 2, 3) and model.backbone.drop_path_rate == drop_path
    assert model.neck.in_channels == [CHANNELS[arch] * 2 ** i for i in (1, 2, 3)]
    assert model.neck.num_outs == 4 and model.neck.norm_cfg.type == 'GN'
    assert model.dn_cfg.label_noise_scale == 0.5 and model.dn_cfg.box_noise_scale == 1.0
    assert model.dn_cfg.group_cfg.num_dn_queries == 100
    assert model.encoder.num_layers == 6 and model.decoder.num_layers == 6
    assert model.encoder.layer_cfg.ffn_cfg.feedforward_channels == 2048
    optim = cfg.optim_wrapper
    assert optim.optimizer.lr == pytest.approx(lr) and optim.optimizer.weight_decay == pytest.approx(wd)
    assert optim.clip_grad.max_norm == 0.1
    if decay is None:
        assert optim.paramwise_cfg.custom_keys['backbone'].lr_mult == 0.1
        assert 'constructor' not in optim
    else:
        assert optim.constructor == 'CustomLayerDecayOptimizerConstructor'
        assert optim.paramwise_cfg.layer_decay_rate == decay
    assert cfg.train_dataloader.batch_size == per_gpu
    assert cfg.train_cfg.max_epochs == 12 and cfg.param_scheduler[-1].milestones == [11]
    assert cfg.val_evaluator.metric == 'bbox'


@pytest.mark.parametrize('path', ALL, ids=_name)
def test_config_pipelines(path, coco_root):
    """The train and val datasets of every config load the synthetic set and run their pipelines."""
    from mmdet.registry import DATASETS
    cfg = _load(path)
    _point_at(cfg, coco_root)
    with_mask = cfg.model.type != 'DINO'
    for key in ('train_dataloader', 'val_dataloader'):
        dataset = DATASETS.build(cfg[key].dataset)
        assert len(dataset) > 0
        sample = dataset[0]
        assert sample['inputs'].dtype == torch.uint8 and sample['inputs'].shape[0] == 3
        instances = sample['data_samples'].gt_instances
        if key == 'train_dataloader':
            assert len(instances) > 0 or cfg.model.type == 'DINO'  # DINO keeps crops without objects
        assert ('masks' in instances) == with_mask


# ----------------------------------------------------------------------------------------------------------
# small models through mmengine's Runner
# ----------------------------------------------------------------------------------------------------------
def _tiny(path, root, work_dir, max_iters=1, checkpoint_interval=None, validate=False):
    """The config of ``path`` with a tiny backbone, small images and a short iteration-based schedule."""
    cfg = _load(path)
    _point_at(cfg, root)
    cfg.work_dir = str(work_dir)
    tiny = copy.deepcopy(TINY_BACKBONE)
    chans = [16 * 2 ** i for i in range(4)]
    if cfg.model.type == 'DINO':
        tiny['out_indices'] = (1, 2, 3)
        cfg.model.neck.in_channels = chans[1:]
        cfg.model.num_queries = 30
        cfg.model.dn_cfg.group_cfg.num_dn_queries = 6
        for part in ('encoder', 'decoder'):
            cfg.model[part].num_layers = 1
            cfg.model[part].layer_cfg.ffn_cfg.feedforward_channels = 64
        cfg.model.test_cfg.max_per_img = 20
    else:
        cfg.model.neck.in_channels = chans
        cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
        cfg.model.test_cfg.rpn.update(nms_pre=200, max_per_img=50)
    cfg.model.backbone = tiny
    num_classes = len(CLASSES)
    if cfg.model.type == 'DINO':
        cfg.model.bbox_head.num_classes = num_classes
    else:  # 32-channel FPN and heads (the recipe heads hold tens of millions of parameters)
        width = 32
        cfg.model.neck.out_channels = width
        cfg.model.rpn_head.update(in_channels=width, feat_channels=width)
        roi_head = cfg.model.roi_head
        roi_head.bbox_roi_extractor.out_channels = roi_head.mask_roi_extractor.out_channels = width
        heads = roi_head.bbox_head
        for head in heads if isinstance(heads, list) else [heads]:
            head.update(num_classes=num_classes, in_channels=width, fc_out_channels=64)
            if 'conv_out_channels' in head:
                head.conv_out_channels = width
        roi_head.mask_head.update(num_classes=num_classes, in_channels=width, conv_out_channels=width)
    if cfg.optim_wrapper.get('constructor') == 'CustomLayerDecayOptimizerConstructor':
        cfg.optim_wrapper.paramwise_cfg.update(num_layers=4, depths=[1, 1, 1, 1])
    with_mask = cfg.model.type != 'DINO'
    cfg.train_dataloader.batch_size = 2
    cfg.train_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=with_mask),
        dict(type='Resize', scale=(TINY_SIZE, TINY_SIZE), keep_ratio=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackDetInputs')]
    test_pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(TINY_SIZE, TINY_SIZE), keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=with_mask),
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
    cfg.val_dataloader.dataset.pipeline = test_pipeline
    cfg.test_dataloader.dataset.pipeline = test_pipeline
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    cfg.train_dataloader.pop('batch_sampler', None)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
    if not validate:
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=max_iters)]
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False,
                                        interval=checkpoint_interval or max_iters, max_keep_ckpts=-1)
    cfg.log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
    cfg.randomness = dict(seed=0)
    for hook in cfg.get('custom_hooks', []):
        if hook.type == 'EMAHook':
            hook.begin_iter = 0
    return cfg


def _train(cfg):
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


@pytest.mark.slow
@pytest.mark.parametrize('path', [
    osp.join(ROOT, 'configs', 'cascade_rcnn', 'cascade-mask-rcnn_flash-internimage-l_fpn_3x_coco.py'),
    osp.join(ROOT, 'configs', 'dino', 'dino-4scale_flash-internimage-t_12e_coco.py'),
], ids=['cascade-mask-rcnn-3x-ema', 'dino'])
def test_one_training_iteration(path, coco_root, tmp_path):
    """Cascade (with the 3x recipe's EMA hook) and DINO; Mask R-CNN trains in the ``trained`` fixture."""
    cfg = _tiny(path, coco_root, tmp_path)
    runner = _train(cfg)
    assert runner.iter == 1
    assert osp.isfile(osp.join(str(tmp_path), 'iter_1.pth'))
    scalars = runner.message_hub.log_scalars
    assert torch.isfinite(torch.tensor(scalars['train/loss'].current()))
    if any(h.type == 'EMAHook' for h in cfg.get('custom_hooks', [])):
        assert any(type(h).__name__ == 'EMAHook' for h in runner.hooks)
        assert 'ema_state_dict' in torch.load(osp.join(str(tmp_path), 'iter_1.pth'), weights_only=False)


@pytest.fixture(scope='module')
def trained(coco_root, tmp_path_factory):
    """Two iterations of a small Mask R-CNN (B 1x recipe, tiny backbone), a checkpoint after each."""
    work_dir = tmp_path_factory.mktemp('mask_rcnn_run')
    cfg = _tiny(MASK_RCNN[0], coco_root, work_dir, max_iters=2, checkpoint_interval=1, validate=True)
    _train(cfg)
    return cfg, str(work_dir)


@pytest.mark.slow
def test_save_resume_test_round_trip(trained, tmp_path):
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    cfg, work_dir = trained
    first = osp.join(work_dir, 'iter_1.pth')
    assert osp.isfile(first) and osp.isfile(osp.join(work_dir, 'iter_2.pth'))
    saved = torch.load(first, map_location='cpu', weights_only=False)
    assert saved['meta']['iter'] == 1 and 'optimizer' in saved and 'message_hub' in saved

    class Probe(Hook):
        seen = {}

        def before_train(self, runner):
            key = 'backbone.patch_embed.conv1.weight'
            self.seen.update(iter=runner.iter, same=torch.equal(runner.model.state_dict()[key].cpu(),
                                                                saved['state_dict'][key]))

    resumed = cfg.copy()
    resumed.work_dir = str(tmp_path)
    resumed.resume = True
    resumed.load_from = first
    runner = Runner.from_cfg(resumed)
    runner.register_hook(Probe())
    runner.train()
    assert Probe.seen == dict(iter=1, same=True)  # training continued from the saved iteration and weights
    assert runner.iter == 2

    tester = cfg.copy()
    tester.work_dir = str(tmp_path / 'test')
    tester.load_from = osp.join(work_dir, 'iter_2.pth')
    tester.model.test_cfg.rcnn.score_thr = 0.0  # a 2-iteration model: keep its low scores, so COCO eval runs
    metrics = Runner.from_cfg(tester).test()
    assert 'coco/bbox_mAP' in metrics and 'coco/segm_mAP' in metrics


@pytest.mark.slow
def test_inference_api(trained, coco_root, tmp_path):
    import numpy as np
    from mmdet.apis import inference_detector, init_detector
    cfg, work_dir = trained
    # copies: mmdet's inference_detector edits model.cfg's test pipeline in place for array inputs
    model = init_detector(copy.deepcopy(cfg), osp.join(work_dir, 'iter_2.pth'), device='cpu')
    assert model.dataset_meta['classes'] == CLASSES
    image = osp.join(coco_root, 'val', '000000.jpg')
    result = inference_detector(model, image)
    pred = result.pred_instances
    assert pred.bboxes.shape[-1] == 4 and len(pred.scores) == len(pred.labels) == len(pred.masks)
    assert pred.masks.shape[-2:] == (TINY_SIZE, TINY_SIZE)
    array = np.zeros((TINY_SIZE, TINY_SIZE, 3), np.uint8)
    assert len(inference_detector(model, [array])) == 1

    import importlib.util
    spec = importlib.util.spec_from_file_location('image_demo', osp.join(ROOT, 'tools', 'image_demo.py'))
    image_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(image_demo)
    out = str(tmp_path / 'result.png')
    image_demo.run(image, copy.deepcopy(cfg), osp.join(work_dir, 'iter_2.pth'), out, device='cpu', score_thr=0.0)
    import cv2
    picture = cv2.imread(out)
    assert picture is not None and picture.shape[:2] == (TINY_SIZE, TINY_SIZE)


def test_ln2d_matches_layer_norm_over_channels():
    from mmcv.cnn import build_norm_layer
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    name, layer = build_norm_layer(dict(type='LN2d', eps=1e-6), 8)
    assert name == 'ln'
    x = torch.randn(2, 8, 5, 3)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8, ), layer.weight, layer.bias, 1e-6)
    torch.testing.assert_close(layer(x), ref.permute(0, 3, 1, 2))

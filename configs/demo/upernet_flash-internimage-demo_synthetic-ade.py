# A CPU-sized demo: a small FlashInternImage (4 DCNv4 stages, 32-256 channels, 5 blocks) with a light
# UPerHead, trained FROM SCRATCH on the synthetic ADE20K-format set of mmdcnv4.datasets.synthetic_ade
# (5 classes, 96x96 images; `python -m mmdcnv4.datasets.synthetic_ade data/synthetic_ade`), then evaluated
# with mmseg's IoUMetric. `python tools/demo_seg.py` does all of it (data, training, testing, a coloured
# mask); measured on a 2-core CPU machine shared with other jobs: 4.1 min wall, mIoU 92.66.
# `python tools/train.py <this config>` trains and evaluates it too; on a machine that is already busy, run
# it as `OMP_NUM_THREADS=1 python tools/train.py ...` (two compute threads fighting other jobs for the cores
# run several times slower than one; tools/demo_seg.py picks the thread count itself).
_base_ = ['../_base_seg/default_runtime.py']
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

# must match mmdcnv4.datasets.synthetic_ade.CLASSES / PALETTE
metainfo = dict(
    classes=('ground', 'disc', 'box', 'triangle', 'ring'),
    palette=[[120, 120, 70], [220, 20, 60], [0, 102, 204], [250, 170, 30],
             [153, 51, 255]])
num_classes = 5
dataset_type = 'BaseSegDataset'
data_root = 'data/synthetic_ade'
crop_size = (96, 96)

norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=crop_size),
    backbone=dict(
        type='FlashInternImage',
        arch='t',
        channels=32,
        depths=[1, 1, 2, 1],
        groups=[2, 4, 8, 16],  # 16 channels per group, as every FlashInternImage size
        layer_scale=1.0,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3),
        with_cp=False),
    decode_head=dict(
        type='UPerHead',
        in_channels=[32, 64, 128, 256],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=64,
        dropout_ratio=0.0,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomResize',
        scale=(96, 96),
        ratio_range=(0.75, 1.5),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        metainfo=metainfo,
        data_root=data_root,
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        metainfo=metainfo,
        data_root=data_root,
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# From scratch: a larger lr than the fine-tuning recipes, short warm-up, poly decay.
max_iters = 1000
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    clip_grad=dict(max_norm=1.0, norm_type=2))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=50,
        end=max_iters,
        by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=max_iters,
        max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)

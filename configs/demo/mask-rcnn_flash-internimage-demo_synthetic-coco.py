# A CPU-sized demo: Mask R-CNN on a small FlashInternImage (4 DCNv4 levels, 32-256 channels, depths
# 1-1-2-1) with the LayerNorm FPN, trained FROM SCRATCH on the synthetic COCO-format shapes of
# mmdcnv4.datasets.synthetic_coco (circles, squares, triangles; 160x160 images; 400 train / 50 val) and
# evaluated with mmdet's CocoMetric (box and mask mAP).
#   python -m mmdcnv4.datasets.synthetic_coco data/synthetic_coco     # the data (a few seconds)
#   python tools/train.py configs/demo/mask-rcnn_flash-internimage-demo_synthetic-coco.py
# `make demo` (tools/demo.py) runs data, training, test and an inference picture in one go.
# The heads are mmdet's Mask R-CNN heads, slimmed (64-channel FPN, 256-d box head, 2-conv mask head, 64
# sampled RoIs per image) so that training fits a few minutes of 2 CPU cores.
_base_ = ['../_base_/models/mask-rcnn_flash-internimage_fpn.py', '../_base_/default_runtime.py']
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

data_root = 'data/synthetic_coco/'
# must match mmdcnv4.datasets.synthetic_coco.CLASSES / PALETTE
metainfo = dict(classes=('circle', 'square', 'triangle'),
                palette=[(220, 40, 40), (40, 190, 60), (50, 80, 230)])
num_classes = 3
img_scale = (160, 160)
fpn_channels = 64

model = dict(
    backbone=dict(
        _delete_=True,
        type='FlashInternImage',
        arch='t',
        channels=32,
        depths=[1, 1, 2, 1],
        groups=[2, 4, 8, 16],  # 16 channels per group, as in every FlashInternImage size
        layer_scale=1.0,
        drop_path_rate=0.0,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=None),  # from scratch
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=fpn_channels),
    rpn_head=dict(in_channels=fpn_channels, feat_channels=fpn_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_channels),
        bbox_head=dict(in_channels=fpn_channels, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=fpn_channels),
        mask_head=dict(num_convs=2, in_channels=fpn_channels, conv_out_channels=fpn_channels,
                       num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=100)))

# tools/demo.py overrides the Resize scales by position (train index 2, test index 1) on a GPU
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'], format_only=False)
test_evaluator = val_evaluator

# 320 iterations of 4 images (3.2 epochs), evaluated at the end; AdamW, 50-iteration warm-up, cosine decay
max_iters = 320
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, eta_min=1e-5)
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1,
                    save_best=None),
    visualization=dict(type='DetVisualizationHook', draw=False))
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=False)
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=4)

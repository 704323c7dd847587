# DINO 4-scale + FlashInternImage-B, 12 epochs (lr x0.1 after epoch 11),
# DETR-style multi-scale + crop augmentation.
# Upstream result (COCO val2017): box mAP 56.0.
# Recipe: drop path 0.3, AdamW lr 0.0002 wd 0.0001, layer decay 0.9, grad clip 0.1,
# 4 images per GPU on 8 GPUs (total batch 32).
_base_ = [
    '../_base_/models/dino-4scale_flash-internimage.py',
    '../_base_/datasets/coco_detection_ms-crop.py',
    '../_base_/schedules/schedule_1x.py', '../_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_b_1k_224.pth'
model = dict(
    backbone=dict(
        arch='b',
        drop_path_rate=0.3,
        layer_scale=1.0,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[224, 448, 896]))

train_dataloader = dict(batch_size=4)

# AdamW lr 0.0002 wd 0.0001, layer-wise lr decay 0.9, gradient clipping (max norm 0.1).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0002, betas=(0.9, 0.999), weight_decay=0.0001),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    constructor='CustomLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(
        num_layers=33, layer_decay_rate=0.9, depths=[4, 4, 21, 4], offset_lr_scale=1.0))

# 12 epochs, 500-iteration linear warm-up, one lr step (x0.1) after epoch 11
max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[11], gamma=0.1)
]

# lr is set for this total batch (8 GPUs x 4 images); see configs/README.md
auto_scale_lr = dict(enable=False, base_batch_size=32)

# DINO 4-scale + FlashInternImage-L, 12 epochs (lr x0.1 after epoch 11),
# DETR-style multi-scale + crop augmentation.
# Upstream result (COCO val2017): box mAP 58.8.
# Recipe: drop path 0.4, AdamW lr 0.0001 wd 0.05, backbone lr x0.1, grad clip 0.1,
# 2 images per GPU on 8 GPUs (total batch 16).
_base_ = [
    '../_base_/models/dino-4scale_flash-internimage.py',
    '../_base_/datasets/coco_detection_ms-crop.py',
    '../_base_/schedules/schedule_1x.py', '../_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_l_22k_384.pth'
model = dict(
    backbone=dict(
        arch='l',
        drop_path_rate=0.4,
        layer_scale=1.0,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[320, 640, 1280]))

train_dataloader = dict(batch_size=2)

# AdamW lr 0.0001 wd 0.05, backbone lr x0.1 (no layer-wise decay), gradient clipping (max norm 0.1).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))

# 12 epochs, 500-iteration linear warm-up, one lr step (x0.1) after epoch 11
max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[11], gamma=0.1)
]

# lr is set for this total batch (8 GPUs x 2 images); see configs/README.md
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Mask R-CNN + FlashInternImage-S + LayerNorm FPN, 1x schedule (12 epochs),
# single scale 1333x800 + flip.
# Upstream result (COCO val2017): box mAP 49.2, mask mAP 44.0.
# Recipe: drop path 0.3, with_cp True, AdamW lr 0.0001 wd 0.05, layer decay 1.0, offset_lr_scale 1.0,
# 2 images per GPU on 8 GPUs (total batch 16).
_base_ = [
    '../_base_/models/mask-rcnn_flash-internimage_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_1x.py', '../_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_s_1k_224.pth'
model = dict(
    backbone=dict(
        arch='s',
        drop_path_rate=0.3,
        layer_scale=1.0,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[80, 160, 320, 640]))

train_dataloader = dict(batch_size=2)

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='CustomLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(
        num_layers=33, layer_decay_rate=1.0, depths=[4, 4, 21, 4], offset_lr_scale=1.0))

# lr is set for this total batch (8 GPUs x 2 images); see configs/README.md
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Cascade Mask R-CNN + FlashInternImage-L + LayerNorm FPN, 1x schedule (12 epochs),
# single scale 1333x800 + flip.
# Upstream result (COCO val2017): box mAP 55.6, mask mAP 48.2.
# Recipe: drop path 0.4, with_cp False, AdamW lr 0.0001 wd 0.05, layer decay 0.94, offset_lr_scale 1.0,
# 2 images per GPU on 8 GPUs (total batch 16).
_base_ = [
    '../_base_/models/cascade-mask-rcnn_flash-internimage_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_1x.py', '../_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_l_22k_384.pth'
model = dict(
    backbone=dict(
        arch='l',
        drop_path_rate=0.4,
        layer_scale=1.0,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[160, 320, 640, 1280]))

train_dataloader = dict(batch_size=2)

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='CustomLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(
        num_layers=37, layer_decay_rate=0.94, depths=[5, 5, 22, 5], offset_lr_scale=1.0))

# lr is set for this total batch (8 GPUs x 2 images); see configs/README.md
auto_scale_lr = dict(enable=False, base_batch_size=16)

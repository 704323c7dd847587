# Mask R-CNN + FlashInternImage-B + LayerNorm FPN, 3x schedule (36 epochs),
# DETR-style multi-scale + crop augmentation.
# Upstream result (COCO val2017): box mAP 50.6, mask mAP 45.4.
# Recipe: drop path 0.4, with_cp True, AdamW lr 0.0002 wd 0.05, layer decay 0.9, offset_lr_scale 0.01,
# 4 images per GPU on 8 GPUs (total batch 32).
_base_ = [
    '../_base_/models/mask-rcnn_flash-internimage_fpn.py',
    '../_base_/datasets/coco_instance_ms-crop.py',
    '../_base_/schedules/schedule_3x.py', '../_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_b_1k_224.pth'
model = dict(
    backbone=dict(
        arch='b',
        drop_path_rate=0.4,
        layer_scale=1.0,
        with_cp=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[112, 224, 448, 896]))

train_dataloader = dict(batch_size=4)

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=0.0002, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='CustomLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(
        num_layers=33, layer_decay_rate=0.9, depths=[4, 4, 21, 4], offset_lr_scale=0.01))

# lr is set for this total batch (8 GPUs x 4 images); see configs/README.md
auto_scale_lr = dict(enable=False, base_batch_size=32)

# Mask2Former + FlashInternImage-S, ADE20K 640x640, 160k iterations, 8 GPUs x 2 images.
# Upstream: 52.6 mIoU single-scale (another upstream page says 52.2).
# Mixed precision: `tools/train.py CONFIG --amp` (the published run is fp32).
# Flash MSDA in the pixel decoder: uncomment the FlashMSDAHook line below (see
# ../_base_seg/models/mask2former_flash_internimage.py).
_base_ = [
    '../_base_seg/models/mask2former_flash_internimage.py',
    '../_base_seg/datasets/ade20k_640x640.py', '../_base_seg/default_runtime.py',
    '../_base_seg/schedules/schedule_160k.py'
]
custom_imports = dict(
    imports=['mmdcnv4', 'mmdet.models'], allow_failed_imports=False)
# custom_hooks = [dict(type='FlashMSDAHook')]  # mmdcnv4's fused-softmax MSDA in the pixel decoder

# upstream's ImageNet-1k 224 checkpoint
pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_s_1k_224.pth'  # noqa: E501
crop_size = (640, 640)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='s',
        layer_scale=1.0,
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[80, 160, 320, 640], num_queries=200),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(426, 426)))

# Sliding-window testing of the keep-ratio resize. No ResizeToMultiple here: mmseg's Mask2FormerHead would
# read its `pad_shape` as the size of every window.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2560, 640), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(lr=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(
        num_layers=33,
        layer_decay_rate=1.0,
        depths=[4, 4, 21, 4],
        offset_lr_scale=1.0))

# Mask2Former + FlashInternImage-T, ADE20K 512x512, 160k iterations, 8 GPUs x 2 images.
# Upstream: 51.2 mIoU single-scale.
# Mixed precision: `tools/train.py CONFIG --amp` (the published run is fp32).
# Flash MSDA in the pixel decoder: uncomment the FlashMSDAHook line below (see
# ../_base_seg/models/mask2former_flash_internimage.py).
_base_ = [
    '../_base_seg/models/mask2former_flash_internimage.py',
    '../_base_seg/datasets/ade20k.py', '../_base_seg/default_runtime.py',
    '../_base_seg/schedules/schedule_160k.py'
]
custom_imports = dict(
    imports=['mmdcnv4', 'mmdet.models'], allow_failed_imports=False)
# custom_hooks = [dict(type='FlashMSDAHook')]  # mmdcnv4's fused-softmax MSDA in the pixel decoder

# upstream's ImageNet-1k 224 checkpoint
pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_t_1k_224.pth'  # noqa: E501
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='t',
        layer_scale=1.0,
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_queries=100),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# Sliding-window testing of the keep-ratio resize. No ResizeToMultiple here: mmseg's Mask2FormerHead would
# read its `pad_shape` as the size of every window.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(lr=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(
        num_layers=30,
        layer_decay_rate=0.9,
        depths=[4, 4, 18, 4],
        offset_lr_scale=1.0))

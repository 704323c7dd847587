# UperNet + FlashInternImage-B, ADE20K 512x512, 160k iterations, 8 GPUs x 2 images.
# Upstream: 52.0 / 52.6 mIoU (single-scale / multi-scale + flip, `tools/test.py ... --tta`).
# Mixed precision: `tools/train.py CONFIG --amp` (the published run is fp32).
_base_ = [
    '../_base_seg/models/upernet_flash_internimage.py',
    '../_base_seg/datasets/ade20k.py', '../_base_seg/default_runtime.py',
    '../_base_seg/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

# upstream's ImageNet-1k 224 checkpoint
pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_b_1k_224.pth'  # noqa: E501
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='b',
        layer_scale=1.0,
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[112, 224, 448, 896], num_classes=150),
    auxiliary_head=dict(in_channels=448, num_classes=150))

optim_wrapper = dict(
    optimizer=dict(lr=6e-5),
    paramwise_cfg=dict(
        num_layers=33,
        layer_decay_rate=1.0,
        depths=[4, 4, 21, 4],
        offset_lr_scale=1.0))

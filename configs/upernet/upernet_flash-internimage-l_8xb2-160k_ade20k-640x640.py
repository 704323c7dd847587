# UperNet + FlashInternImage-L, ADE20K 640x640, 160k iterations, 8 GPUs x 2 images.
# Upstream: 55.6 / 56.0 mIoU (single-scale / multi-scale + flip, `tools/test.py ... --tta`).
# Mixed precision: `tools/train.py CONFIG --amp` (the published run is fp32).
_base_ = [
    '../_base_seg/models/upernet_flash_internimage.py',
    '../_base_seg/datasets/ade20k_640x640.py', '../_base_seg/default_runtime.py',
    '../_base_seg/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

# upstream's ImageNet-22k 384 checkpoint
pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_l_22k_384.pth'  # noqa: E501
crop_size = (640, 640)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='l',
        layer_scale=1.0,
        drop_path_rate=0.4,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[160, 320, 640, 1280], num_classes=150),
    auxiliary_head=dict(in_channels=640, num_classes=150))

optim_wrapper = dict(
    optimizer=dict(lr=2e-5),
    paramwise_cfg=dict(
        num_layers=37,
        layer_decay_rate=0.94,
        depths=[5, 5, 22, 5],
        offset_lr_scale=1.0))

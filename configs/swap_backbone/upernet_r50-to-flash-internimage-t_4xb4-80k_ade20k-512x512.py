# mmseg's stock UperNet R-50 ADE20K recipe with its backbone swapped for FlashInternImage-T: only the
# backbone and the heads' input channels change; data, heads, SGD schedule and runtime are mmseg's own.
# (The tuned FlashInternImage recipes, with AdamW and layer decay, are in configs/upernet/.)
_base_ = 'mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py'
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

pretrained = 'https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_t_1k_224.pth'
model = dict(
    pretrained=None,  # the stock config's ResNet checkpoint; FlashInternImage loads through init_cfg
    backbone=dict(
        _delete_=True,
        type='FlashInternImage',
        arch='t',
        layer_scale=1.0,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))

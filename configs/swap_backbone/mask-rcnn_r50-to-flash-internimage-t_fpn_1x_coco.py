# mmdet's stock Mask R-CNN R-50-FPN 1x, unmodified, with its ResNet-50 swapped for FlashInternImage-T.
# Only the backbone and the FPN's in_channels change (plus the import that registers the backbone); data,
# heads, schedule and optimizer are mmdet's own (SGD lr 0.02, 8 GPUs x 2 images). The FlashInternImage
# recipe (AdamW, LayerNorm FPN, layer-wise lr decay) is
# configs/mask_rcnn/mask-rcnn_flash-internimage-t_fpn_1x_coco.py; docs/swap_backbone.md explains the
# steps and the optional changes.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # drop ResNet's arguments (depth, norm_eval, ...) instead of merging into them
        type='FlashInternImage',
        arch='t',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        layer_scale=1.0,
        with_cp=False,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://huggingface.co/OpenGVLab/DCNv4/resolve/main/flash_intern_image_t_1k_224.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))

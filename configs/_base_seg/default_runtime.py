# Runtime for the ADE20K recipes (mmseg 1.2's default_runtime plus mmdcnv4's registrations).
custom_imports = dict(imports=['mmdcnv4'], allow_failed_imports=False)
default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

# Multi-scale + flip testing (the "ms" column of configs/README_seg.md): `tools/test.py CONFIG CKPT --tta`.
tta_model = dict(type='SegTTAModel')

# The upstream ADE20K schedule: AdamW, 1500-iteration linear warm-up from lr * 1e-6, then a poly (power 1)
# decay to 0 at 160k iterations. The layer-wise decay constructor groups FlashInternImage's parameters;
# each recipe sets its own lr and paramwise_cfg (num_layers, layer_decay_rate, depths, offset_lr_scale).
#
# Mixed precision: `tools/train.py CONFIG --amp` turns `optim_wrapper` into an AmpOptimWrapper with a
# dynamic loss scale. The published numbers were trained in fp32.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='CustomLayerDecayOptimizerConstructor')  # no gradient clipping unless a recipe sets clip_grad
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # as upstream: a checkpoint every 1000 iterations (one kept, for resuming) plus the best mIoU
    checkpoint=dict(
        type='CheckpointHook',
        by_epoch=False,
        interval=1000,
        max_keep_ckpts=1,
        save_best='mIoU'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))

# The recipes' learning rates are for 8 GPUs x 2 images. `tools/train.py --auto-scale-lr` rescales them
# linearly for another total batch.
auto_scale_lr = dict(enable=False, base_batch_size=16)

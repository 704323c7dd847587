# 1x = 12 epochs, lr x0.1 after epochs 8 and 11, 500-iteration linear warm-up (ratio 0.001).
# AdamW (wd 0.05) with the layer-wise lr decay constructor; every recipe sets lr, the decay rate, depths
# and offset_lr_scale for its backbone (these values are FlashInternImage-T's, lr 1e-4, no decay).
max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1)
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='CustomLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=30, layer_decay_rate=1.0, depths=[4, 4, 18, 4], offset_lr_scale=1.0))

# The lr values are for the total batch given here (8 GPUs x images per GPU); see configs/README.md.
auto_scale_lr = dict(enable=False, base_batch_size=16)

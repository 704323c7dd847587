"""Random batches shaped as mmdet / mmseg dataloaders yield them, for benchmarks and FLOP counts.

``inputs`` are uint8 CHW images and ``data_samples`` carry the metainfo the models read; with
``with_gt=True`` they also carry ground truth (boxes, labels and masks for mmdet, a label map for mmseg)
so that a training step runs.
"""
import numpy as np
import torch
from mmengine.structures import InstanceData, PixelData

__all__ = ['random_batch']


def _sample_class(scope):
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return DetDataSample
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return SegDataSample
    raise ValueError(f'random batches are built for mmdet and mmseg configs, not default_scope={scope!r}')


def _detection_targets(height, width, gen, num=8, num_classes=80):
    from mmdet.structures.mask import BitmapMasks
    xy = torch.rand(num, 2, generator=gen) * torch.tensor([width * 0.7, height * 0.7])
    wh = 32 + torch.rand(num, 2, generator=gen) * torch.tensor([width * 0.25, height * 0.25])
    boxes = torch.cat([xy, xy + wh], dim=1)
    masks = np.zeros((num, height, width), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    return InstanceData(bboxes=boxes, labels=torch.randint(0, num_classes, (num,), generator=gen),
                        masks=BitmapMasks(masks, height, width))


def random_batch(scope, height, width, batch_size=1, seed=0, with_gt=False):
    """A batch of ``batch_size`` random ``height`` x ``width`` images for a ``scope`` ('mmdet'/'mmseg') model."""
    sample_class = _sample_class(scope)
    gen = torch.Generator().manual_seed(seed)
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                scale_factor=(1.0, 1.0), img_path='', flip=False, flip_direction=None, reduce_zero_label=False)
    inputs, samples = [], []
    for i in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen))
        sample = sample_class(metainfo=dict(meta, img_id=i))
        if with_gt and scope == 'mmdet':
            sample.gt_instances = _detection_targets(height, width, gen)
        elif with_gt:
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, height, width), generator=gen))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)

"""Inference speed (images/s) of a model from an mmdet or mmseg config: the whole test step, from the
dataloader's batch to the post-processed predictions (data preprocessing, network, NMS / mask pasting).

    python tools/benchmark_fps.py CONFIG [CHECKPOINT] [--shape H W] [--num-iters 50] [--warmup 5]
                                  [--batch-size 1] [--device cuda] [--fp16] [--cfg-options ...]

Without ``--shape`` the images come from the config's test dataloader (the dataset must be there);
with it, one random image of that size is used for every step. The first ``--warmup`` steps are not timed.
Without a checkpoint the weights are random, which is fine for timing (detectors then keep few boxes, so
give a checkpoint for timings that include realistic post-processing).
"""
import argparse
import os.path as osp
import sys
import time


def _import_mmdcnv4():
    try:
        import mmdcnv4  # noqa: F401
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
        import mmdcnv4  # noqa: F401


_import_mmdcnv4()

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402
from mmengine.utils import ProgressBar  # noqa: E402

from mmdcnv4.datasets.random_batch import random_batch  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Measure inference images/s')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', nargs='?', help='checkpoint file (optional)')
    parser.add_argument('--shape', type=int, nargs='+', help='random input of this size (H W, or one int)')
    parser.add_argument('--num-iters', type=int, default=50, help='timed steps')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps first')
    parser.add_argument('--batch-size', type=int, default=1, help='images per step')
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda if available)')
    parser.add_argument('--fp16', action='store_true', help='run under torch.autocast(float16)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs in xxx=yyy format')
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error('--shape takes one or two integers')
    return args


def _batches(cfg, args, scope):
    if args.shape is not None:
        h, w = (args.shape[0], args.shape[0]) if len(args.shape) == 1 else args.shape
        batch = random_batch(scope, h, w, args.batch_size)
        while True:
            yield batch
    loader_cfg = cfg.test_dataloader.copy()
    loader_cfg['batch_size'] = args.batch_size
    loader_cfg['num_workers'] = min(loader_cfg.get('num_workers', 2), 2)
    loader_cfg['persistent_workers'] = False
    loader = Runner.build_dataloader(loader_cfg)
    while True:
        yield from loader


def benchmark(cfg, checkpoint=None, args=None):
    """Returns ``dict(images_per_s, ms_per_image, images, device)``."""
    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    cfg.model.pop('pretrained', None)
    if cfg.model.get('backbone', {}).get('init_cfg') is not None:
        cfg.model.backbone.init_cfg = None  # weights come from the checkpoint (or stay random)
    model = MODELS.build(cfg.model)
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu')
    model = model.to(device).eval()

    def sync():
        if device.startswith('cuda'):
            torch.cuda.synchronize()

    batches = _batches(cfg, args, scope)
    total = args.warmup + args.num_iters
    progress = ProgressBar(total)
    elapsed, images = 0.0, 0
    with torch.no_grad(), torch.autocast(device.split(':')[0], dtype=torch.float16, enabled=args.fp16):
        for step in range(total):
            batch = next(batches)
            sync()
            start = time.perf_counter()
            model.test_step(batch)
            sync()
            if step >= args.warmup:
                elapsed += time.perf_counter() - start
                images += len(batch['inputs'])
            progress.update()
    sys.stdout.write('\n')
    return dict(images_per_s=images / elapsed, ms_per_image=1000 * elapsed / images, images=images,
                device=device)


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    result = benchmark(cfg, args.checkpoint, args)
    source = f'random {args.shape} input' if args.shape else 'test dataloader'
    print_log(f"{result['images_per_s']:.2f} images/s ({result['ms_per_image']:.1f} ms per image) over "
              f"{result['images']} images, batch {args.batch_size}, {source}, device {result['device']}"
              f"{', fp16 autocast' if args.fp16 else ''}", logger='current')
    return result


if __name__ == '__main__':
    main()

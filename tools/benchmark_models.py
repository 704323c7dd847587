"""GPU speed of whole detectors / segmentors: inference images/s and training iteration time.

Compares configs of this repository with stock mmdet / mmseg baselines on random images of a fixed size
(random weights; no dataset needed):

    python tools/benchmark_models.py --task det --out docs/benchmarks/detection.md
        Mask R-CNN FlashInternImage-T vs mmdet's Mask R-CNN ResNet-50: 800x1333, inference at batch 1,
        training at batch 2 (random boxes and masks as ground truth)
    python tools/benchmark_models.py --task seg --out docs/benchmarks/segmentation.md
        UperNet FlashInternImage-T vs mmseg's UperNet ResNet-50: 512x512, inference batch 1, training batch 2

Models run as their configs say (e.g. activation checkpointing where the recipe enables it), in fp32 and
with --amp also under fp16 autocast; SyncBN becomes BN (one process). Times: median over --iters steps
after --warmup steps, CUDA-synchronised.
"""
import argparse
import datetime
import os.path as osp
import statistics
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TASKS = {
    'det': dict(scope='mmdet', shape=(800, 1333), models=[
        ('Mask R-CNN FlashInternImage-T', osp.join(ROOT, 'configs/mask_rcnn/mask-rcnn_flash-internimage-t_fpn_1x_coco.py')),
        ('Mask R-CNN ResNet-50 (mmdet)', 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'),
    ]),
    'seg': dict(scope='mmseg', shape=(512, 512), models=[
        ('UperNet FlashInternImage-T', osp.join(ROOT, 'configs/upernet/upernet_flash-internimage-t_8xb2-160k_ade20k-512x512.py')),
        ('UperNet ResNet-50 (mmseg)', 'mmseg::upernet/upernet_r50_4xb4-80k_ade20k-512x512.py'),
    ]),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--task', choices=sorted(TASKS), required=True)
    parser.add_argument('--iters', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--train-batch', type=int, default=2)
    parser.add_argument('--amp', action='store_true', help='also time fp16 autocast')
    parser.add_argument('--shape', type=int, nargs=2, help='override the image size (H W)')
    parser.add_argument('--device', default='cuda', help='cuda (default), or cpu for a smoke test')
    parser.add_argument('--out', help='write the markdown table here')
    return parser.parse_args()


def median_ms(step, iters, warmup, device):
    import torch
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    times = []
    for i in range(warmup + iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(name, config, task, args):
    import torch
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope

    from mmdcnv4.datasets.random_batch import random_batch
    init_default_scope(task['scope'])
    # 'mmdet::...' names a config shipped inside the package
    cfg = get_config(config) if '::' in config else Config.fromfile(config)
    model = revert_sync_batchnorm(MODELS.build(cfg.model)).to(args.device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rows = []
    for precision in (['fp32', 'fp16'] if args.amp else ['fp32']):
        autocast = torch.autocast(args.device, dtype=torch.float16, enabled=precision == 'fp16')
        test_batch = random_batch(task['scope'], *task['shape'])
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                model.test_step(test_batch)

        infer_ms = median_ms(infer, args.iters, args.warmup, args.device)
        optim_cfg = dict(cfg.optim_wrapper)
        optim_cfg['type'] = 'AmpOptimWrapper' if precision == 'fp16' else optim_cfg.get('type', 'OptimWrapper')
        optim_wrapper = build_optim_wrapper(model, optim_cfg)
        train_batch = random_batch(task['scope'], *task['shape'], args.train_batch, seed=1, with_gt=True)
        model.train()
        train_ms = median_ms(lambda: model.train_step(train_batch, optim_wrapper), args.iters, args.warmup,
                             args.device)
        rows.append(f'| {name} | {params:.1f}M | {precision} | {1e3 / infer_ms:.1f} | {infer_ms:.1f} | '
                    f'{train_ms:.1f} |')
        print(rows[-1], flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def main():
    args = parse_args()
    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('benchmark_models.py needs a CUDA GPU (or --device cpu for a smoke test).')
    task = dict(TASKS[args.task])
    if args.shape:
        task['shape'] = tuple(args.shape)
    header = ('| model | params | precision | inference img/s (batch 1) | inference ms | '
              f'train ms / iteration (batch {args.train_batch}) |\n|---|---|---|---|---|---|')
    print(header)
    rows = [r for name, config in task['models'] for r in measure(name, config, task, args)]
    if args.out:
        h, w = task['shape']
        where = (f'{torch.cuda.get_device_name()} (torch {torch.__version__})' if args.device == 'cuda'
                 else f'CPU (torch {torch.__version__})')
        with open(args.out, 'w') as f:
            f.write(f'# {args.task} model speed\n\nGenerated by `python tools/benchmark_models.py --task {args.task}'
                    f'{" --amp" if args.amp else ""}` on {datetime.date.today()} on {where}. Random weights and '
                    f'{h}x{w} random images; whole test step (preprocessing, network, post-processing) and whole '
                    f'train step (forward, backward, optimizer); medians of {args.iters} steps after '
                    f'{args.warmup}. Models as configured (FlashInternImage recipes enable activation '
                    'checkpointing for training); SyncBN as BN.\n\n' + header + '\n' + '\n'.join(rows) + '\n')
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

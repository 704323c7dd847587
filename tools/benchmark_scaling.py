"""Multi-GPU training throughput: the same config on 1, 2, ... GPUs through tools/dist_train.sh.

Trains CONFIG for --iters iterations on a synthetic COCO-format set written at full detection resolution
(no dataset needed), once per GPU count, and reads mmengine's logged iteration times:

    python tools/benchmark_scaling.py configs/mask_rcnn/mask-rcnn_flash-internimage-t_fpn_1x_coco.py \\
        --gpus 1 2 --out docs/benchmarks/scaling.md

images/s = GPUs x images per GPU / median iteration time (the first --skip logged intervals are warm-up);
scaling efficiency = images/s on n GPUs / (n x images/s on 1 GPU). The recipe runs as configured (its
images per GPU, activation checkpointing, SyncBN where it has it); evaluation and checkpoints are off.
"""
import argparse
import datetime
import glob
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OVERRIDES = '''_base_ = {config!r}
train_dataloader = dict(dataset=dict(data_root={data_root!r}, ann_file='annotations/instances_train.json',
                                     data_prefix=dict(img='train/'), metainfo=dict(classes={classes!r})))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={iters}, val_interval={never})
param_scheduler = []
model = dict(backbone=dict(init_cfg=None))  # speed only: no pretrained download
val_dataloader = val_cfg = val_evaluator = test_dataloader = test_cfg = test_evaluator = None
default_hooks = dict(logger=dict(type='LoggerHook', interval={log_interval}),
                     checkpoint=dict(type='CheckpointHook', interval={never}, by_epoch=False))
'''


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--gpus', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--iters', type=int, default=60)
    parser.add_argument('--log-interval', type=int, default=10)
    parser.add_argument('--skip', type=int, default=2, help='logged intervals left out as warm-up')
    parser.add_argument('--size', type=int, nargs=2, default=[800, 1333], help='image height and width')
    parser.add_argument('--num-images', type=int, default=64)
    parser.add_argument('--work-dir', default=None, help='default: a temporary folder')
    parser.add_argument('--out', help='write the markdown table here')
    return parser.parse_args()


def iteration_times(work_dir):
    """The 'time' of every logged training interval, from mmengine's scalars.json."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not files:
        raise RuntimeError(f'no mmengine log under {work_dir}')
    with open(files[-1]) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r['time'] for r in records if 'time' in r and 'iter' in r]


def run(config, gpus, args, work_root):
    work_dir = osp.join(work_root, f'{gpus}gpu')
    env = dict(os.environ, PORT=str(29500 + gpus), PYTHON=sys.executable)
    cmd = ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), config, str(gpus), '--work-dir', work_dir]
    print('running', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    times = iteration_times(work_dir)[args.skip:]
    if not times:
        raise RuntimeError('too few logged iterations: raise --iters or lower --skip')
    return statistics.median(times)


def main():
    args = parse_args()
    from mmengine.config import Config

    from mmdcnv4.datasets import generate_synthetic_coco
    from mmdcnv4.datasets.synthetic_coco import CLASSES
    work_root = args.work_dir or tempfile.mkdtemp(prefix='scaling_')
    data_root = osp.join(work_root, 'data') + '/'
    short = min(args.size)
    generate_synthetic_coco(data_root, num_train=args.num_images, num_val=2, size=tuple(args.size),
                            min_size=max(4, short // 10), max_size=short // 2, max_objects=6)
    config = osp.join(work_root, 'scaling.py')
    with open(config, 'w') as f:
        f.write(OVERRIDES.format(config=osp.abspath(args.config), data_root=data_root, classes=tuple(CLASSES),
                                 iters=args.iters, never=10 ** 9, log_interval=args.log_interval))
    per_gpu = Config.fromfile(config).train_dataloader.batch_size
    rows, base = [], None
    for gpus in args.gpus:
        seconds = run(config, gpus, args, work_root)
        images = gpus * per_gpu / seconds
        base = base if base is not None else images / gpus
        rows.append(f'| {gpus} | {per_gpu} | {gpus * per_gpu} | {seconds * 1e3:.0f} | {images:.2f} | '
                    f'{100 * images / (gpus * base):.1f}% |')
        print(rows[-1], flush=True)
    header = ('| GPUs | images per GPU | total batch | ms / iteration | images/s | scaling efficiency |\n'
              '|---|---|---|---|---|---|')
    print(header + '\n' + '\n'.join(rows))
    if args.out:
        import torch
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
        with open(args.out, 'w') as f:
            f.write(f'# Multi-GPU training scaling\n\nGenerated by `python tools/benchmark_scaling.py '
                    f'{osp.relpath(args.config, ROOT)} --gpus {" ".join(map(str, args.gpus))}` on '
                    f'{datetime.date.today()} on {device} (torch {torch.__version__}): {args.iters} iterations '
                    f'per run on {args.size[0]}x{args.size[1]} synthetic COCO-format images, median of the '
                    f'logged intervals after the first {args.skip}; torch DDP over NCCL through '
                    'tools/dist_train.sh (torchrun).\n\n' + header + '\n' + '\n'.join(rows) + '\n')
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

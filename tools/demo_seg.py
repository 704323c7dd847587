"""End-to-end segmentation demo on CPU: synthetic ADE20K-format data -> train -> test -> coloured mask.

    python tools/demo_seg.py [--config configs/demo/upernet_flash-internimage-demo_synthetic-ade.py]
                             [--data-root data/synthetic_ade] [--work-root work_dirs/demo_seg]
                             [--device cpu] [--min-miou 50]

1. writes the synthetic dataset (mmdcnv4.datasets.synthetic_ade) under --data-root, or reuses it;
2. trains the demo config from scratch (mmengine Runner) into a new timestamped folder of --work-root;
3. tests the saved checkpoint with mmseg's IoUMetric;
4. segments one validation image and writes its coloured mask (and an overlay) next to the checkpoint;
5. prints what it ran, the mIoU and the wall time. Exits 1 when the mIoU is below --min-miou (percent).
"""
import argparse
import glob
import os
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join('configs', 'demo', 'upernet_flash-internimage-demo_synthetic-ade.py')


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Train and test FlashInternImage + UPerHead on synthetic '
                                     'ADE20K-format data, on CPU.')
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--data-root', default=osp.join('data', 'synthetic_ade'))
    parser.add_argument('--work-root', default=osp.join('work_dirs', 'demo_seg'))
    parser.add_argument('--device', default='cpu', help='device of the mask inference (cpu or cuda:0)')
    parser.add_argument('--min-miou', type=float, default=50.0, help='exit 1 below this mIoU (percent)')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch compute threads; 0 (default): all cores on an idle machine, 1 when the '
                        '1-minute load average is already >= 1 (threads that wait on each other for a '
                        'shared core run several times slower than one thread)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='config overrides, as tools/train.py (e.g. train_cfg.max_iters=500)')
    return parser.parse_args(argv)


def pick_threads(requested):
    if requested > 0:
        return requested, 'as requested'
    load = os.getloadavg()[0]
    if load >= 1.0:
        return 1, f'the machine is busy (1-min load {load:.1f})'
    return os.cpu_count() or 1, f'an idle machine (1-min load {load:.1f})'


def main(argv=None):
    args = parse_args(argv)
    os.chdir(ROOT)  # the config's relative paths and the default folders are relative to the repository
    start = time.time()

    import torch
    import mmdcnv4.datasets.synthetic_ade as synthetic_ade
    from mmengine.config import Config
    from mmengine.runner import Runner

    threads, why = pick_threads(args.threads)
    torch.set_num_threads(threads)
    print(f'[demo_seg] {threads} compute thread(s): {why}', flush=True)

    # 1. data
    reused = synthetic_ade.is_complete(args.data_root)
    synthetic_ade.generate(args.data_root)
    print(f'[demo_seg] data: {args.data_root} ({"reused" if reused else "written"}; '
          f'python -m mmdcnv4.datasets.synthetic_ade {args.data_root})', flush=True)

    # 2. training, in a new timestamped folder
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = args.data_root
    work_dir = osp.join(args.work_root, time.strftime('%Y%m%d_%H%M%S'))
    while osp.exists(work_dir):
        work_dir += '_'
    cfg.work_dir = work_dir
    cfg.train_cfg.val_interval = cfg.train_cfg.max_iters + 1  # evaluation is step 3, on the saved weights
    print(f'[demo_seg] train: {args.config} from scratch, {cfg.train_cfg.max_iters} iterations of '
          f'{cfg.train_dataloader.batch_size} images -> {work_dir}', flush=True)
    t_train = time.time()
    Runner.from_cfg(cfg).train()
    t_train = time.time() - t_train
    checkpoint = osp.join(work_dir, f'iter_{cfg.train_cfg.max_iters}.pth')
    if not osp.isfile(checkpoint):
        sys.exit(f'[demo_seg] no checkpoint at {checkpoint}')

    # 3. testing the saved checkpoint
    test_cfg = cfg.copy()
    test_cfg.load_from = checkpoint
    test_cfg.work_dir = osp.join(work_dir, 'test')
    print(f'[demo_seg] test: {checkpoint} on {args.data_root}/images/validation (IoUMetric)', flush=True)
    metrics = Runner.from_cfg(test_cfg).test()
    miou = float(metrics['mIoU'])

    # 4. one coloured mask
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    from seg_demo import load_model, segment, write_outputs
    image = sorted(glob.glob(osp.join(args.data_root, 'images', 'validation', '*.jpg')))[0]
    model = load_model(args.config, checkpoint, args.device)
    pred = segment(model, image)
    stem = osp.splitext(osp.basename(image))[0]
    mask_file = osp.join(work_dir, f'{stem}_mask.png')
    overlay_file = osp.join(work_dir, f'{stem}_overlay.png')
    write_outputs(image, pred, model.dataset_meta['palette'], mask_file, overlay_file)

    wall = time.time() - start
    ok = miou >= args.min_miou
    print('\n[demo_seg] summary')
    print(f'  data      {args.data_root}: {synthetic_ade.CLASSES}')
    print(f'  trained   {args.config} from scratch in {t_train:.0f} s -> {checkpoint}')
    print(f'  tested    mIoU {miou:.2f} (aAcc {float(metrics["aAcc"]):.2f}, mAcc {float(metrics["mAcc"]):.2f}) '
          f'on {len(glob.glob(osp.join(args.data_root, "images", "validation", "*.jpg")))} validation images; '
          f'target >= {args.min_miou:g}: {"met" if ok else "NOT met"}')
    print(f'  mask      {mask_file} (overlay {overlay_file})')
    print(f'  again     python tools/seg_demo.py {image} {args.config} {checkpoint} --out-file mask.png')
    print(f'  wall time {wall:.0f} s ({wall / 60:.1f} min)')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())

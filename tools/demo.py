"""The detection demo behind `make demo`: synthetic data -> training from scratch -> COCO test -> a picture.

    python tools/demo.py [--work-dir work_dirs/demo_det] [--data-root data/synthetic_coco]
                         [--device auto|cpu|cuda] [--iters N] [--threads N]

1. writes the synthetic COCO-format shapes dataset (mmdcnv4.datasets.synthetic_coco) to ``--data-root``,
   or reuses it when an identical one is there;
2. trains configs/demo/mask-rcnn_flash-internimage-demo_synthetic-coco.py (a small FlashInternImage
   Mask R-CNN) from scratch with tools/train.py, in a new ``<work-dir>/<timestamp>/`` folder;
3. tests the last checkpoint with tools/test.py (COCO box and mask mAP on the validation split);
4. runs tools/image_demo.py on one validation image and writes ``prediction.png`` next to the checkpoint.

It prints each command it runs (they can be run again by hand), the mAPs and the wall time; the complete
output of each step is in a ``.log`` file in the run folder. Nothing in the work directory or the data
folder is deleted. On CPU the default budget fits about 5 minutes on 2 cores; with a GPU the same command
trains longer on images twice the size.
"""
import argparse
import datetime
import os
import os.path as osp
import re
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = 'configs/demo/mask-rcnn_flash-internimage-demo_synthetic-coco.py'
# GPU budget: more iterations, a bigger batch and images upscaled to twice the size
GPU_SETTINGS = dict(iters=2000, batch_size=8, img_scale=320)
# what of the training output is shown on the console (all of it is in train.log)
_SHOW = re.compile(r'Iter\(|coco/(bbox|segm)_mAP|Error|Traceback|Saving checkpoint')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/demo_det',
                        help='each run goes to a new <work-dir>/<timestamp>/ folder')
    parser.add_argument('--data-root', default='data/synthetic_coco', help='where the dataset is written')
    parser.add_argument('--device', choices=['auto', 'cpu', 'cuda'], default='auto',
                        help='auto: cuda when a GPU is visible')
    parser.add_argument('--iters', type=int, help='training iterations (default: the config\'s on CPU, '
                        f"{GPU_SETTINGS['iters']} on GPU)")
    parser.add_argument('--threads', type=int,
                        help='CPU threads for torch (default: the cores not busy with other work)')
    return parser.parse_args(argv)


def _cuda_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def cpu_threads():
    """The cores that other processes leave idle (at least 1): more threads than that only fight for them."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _fmt_cmd(cmd):
    return ' '.join(a if re.fullmatch(r'[\w@%+=:,./-]+', a) else repr(a) for a in cmd)


def _console(line):
    """A shorter form of mmengine's log lines for the console (the .log files keep them whole)."""
    line = line.rstrip()
    if 'Iter(' in line:
        line = line[line.index('Iter('):]
        keep = re.findall(r'(Iter\(\w+\) +\[ *\d+/\d+\]|eta: \S+|(?<!_)time: \S+|(?<!_)loss: \S+)', line)
        metrics = re.findall(r'coco/(?:bbox|segm)_mAP(?:_50)?: \S+', line)
        return '  '.join(keep[:1] + metrics) if metrics else '  '.join(keep)
    return line[:200]


def run_step(title, cmd, log_file, env, show=None):
    """Runs ``cmd`` from the repository root, logging everything to ``log_file``; returns the output."""
    print(f'\n== {title}\n$ {_fmt_cmd(cmd)}', flush=True)
    lines = []
    with open(log_file, 'w') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if show is not None and show.search(line):
                print('   ' + _console(line), flush=True)
        code = proc.wait()
    if code != 0:
        tail = ''.join(lines[-40:])
        sys.exit(f'{tail}\ndemo: "{title}" failed (exit code {code}); the full output is in {log_file}')
    return ''.join(lines)


def parse_metrics(output):
    """The last ``coco/...: value`` pairs printed by mmengine."""
    metrics = {}
    for key, value in re.findall(r'(coco/[\w]+): (-?[0-9.]+)', output):
        metrics[key] = float(value)
    return metrics


def _in_root(path):
    """``path`` (relative to the current directory) relative to the repository root when inside it."""
    path = osp.abspath(path)
    rel = osp.relpath(path, ROOT)
    return path if rel.startswith('..') else rel


def main(argv=None):
    args = parse_args(argv)
    args.work_dir = _in_root(args.work_dir)
    args.data_root = _in_root(args.data_root)
    start = time.time()
    gpu = args.device == 'cuda' or (args.device == 'auto' and _cuda_available())
    python = sys.executable
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    env.setdefault('PYTHONUNBUFFERED', '1')

    overrides = []
    if gpu:
        iters = args.iters or GPU_SETTINGS['iters']
        scale = GPU_SETTINGS['img_scale']
        overrides += [f"train_dataloader.batch_size={GPU_SETTINGS['batch_size']}",
                      f'train_dataloader.dataset.pipeline.2.scale=({scale},{scale})',
                      f'val_dataloader.dataset.pipeline.1.scale=({scale},{scale})',
                      f'test_dataloader.dataset.pipeline.1.scale=({scale},{scale})']
        where = f'GPU ({env.get("CUDA_VISIBLE_DEVICES", "cuda")})'
    else:
        iters = args.iters
        threads = args.threads or cpu_threads()
        # threads that wait sleep instead of spinning: spinning OpenMP threads on a busy machine cost
        # several times the work itself
        env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
        env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(threads)
        env['CUDA_VISIBLE_DEVICES'] = ''
        where = f'CPU, {threads} thread{"s" if threads > 1 else ""}'
    if iters is not None:
        if iters < 2:
            sys.exit('demo: --iters must be at least 2')
        # the config's schedule (warm-up, then cosine decay) written for another length
        warmup = min(50, iters // 4) or 1
        overrides += [f'train_cfg.max_iters={iters}', f'param_scheduler.0.end={warmup}',
                      f'param_scheduler.1.begin={warmup}', f'param_scheduler.1.end={iters}',
                      f'default_hooks.checkpoint.interval={iters}']

    stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
    run_dir = osp.join(args.work_dir, stamp)
    suffix = 1
    while osp.exists(osp.join(ROOT, run_dir)):
        run_dir = osp.join(args.work_dir, f'{stamp}_{suffix}')
        suffix += 1
    os.makedirs(osp.join(ROOT, run_dir))
    print(f'mmdcnv4 detection demo on {where}; outputs in {run_dir}/', flush=True)

    # 1. data
    data_root = args.data_root.rstrip('/') + '/'
    run_step('1/4 synthetic COCO-format dataset (reused when already there)',
             [python, '-m', 'mmdcnv4.datasets.synthetic_coco', data_root], osp.join(ROOT, run_dir, 'data.log'),
             env, show=re.compile(r'.'))
    if data_root != 'data/synthetic_coco/':
        overrides += [f'{k}.dataset.data_root={data_root}'
                      for k in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
        overrides += [f'{k}.ann_file={data_root}annotations/instances_val.json'
                      for k in ('val_evaluator', 'test_evaluator')]

    # 2. training, without validation: the test step below evaluates the last checkpoint
    train_cmd = [python, 'tools/train.py', CONFIG, '--work-dir', run_dir, '--cfg-options'] + overrides + [
        'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']
    t0 = time.time()
    run_step('2/4 training from scratch', train_cmd, osp.join(ROOT, run_dir, 'train.log'), env, show=_SHOW)
    train_time = time.time() - t0
    with open(osp.join(ROOT, run_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    checkpoint = osp.relpath(checkpoint, ROOT) if osp.isabs(checkpoint) else checkpoint

    # 3. test
    test_overrides = [o for o in overrides if not o.startswith(('train_', 'param_', 'default_hooks'))]
    test_cmd = [python, 'tools/test.py', CONFIG, checkpoint, '--work-dir', osp.join(run_dir, 'test')]
    if test_overrides:
        test_cmd += ['--cfg-options'] + test_overrides
    output = run_step('3/4 COCO evaluation of the last checkpoint on the validation split', test_cmd,
                      osp.join(ROOT, run_dir, 'test.log'), env,
                      show=re.compile(r'coco/(bbox|segm)_mAP|Error|Traceback'))
    metrics = parse_metrics(output)

    # 4. one picture
    image = osp.join(data_root, 'val', '000000.jpg')
    picture = osp.join(run_dir, 'prediction.png')
    demo_cmd = [python, 'tools/image_demo.py', image, CONFIG, checkpoint, '--out-file', picture,
                '--device', 'cuda' if gpu else 'cpu']
    run_step('4/4 inference on one validation image', demo_cmd, osp.join(ROOT, run_dir, 'image_demo.log'),
             env, show=re.compile(r'detections|Error|Traceback'))

    total = time.time() - start
    box, mask = metrics.get('coco/bbox_mAP'), metrics.get('coco/segm_mAP')
    print('\n== result')
    print(f'model      : {CONFIG} (FlashInternImage Mask R-CNN, from scratch)')
    print(f'checkpoint : {checkpoint}')
    if box is None or mask is None:
        sys.exit(f'demo: the test step printed no COCO metrics; see {run_dir}/test.log')
    print(f'COCO val   : bbox mAP {box:.3f}, segm mAP {mask:.3f} (bbox mAP@0.5 '
          f"{metrics.get('coco/bbox_mAP_50', float('nan')):.3f})")
    if box < 0.5:
        print('note       : lower than usual (about 0.8 box mAP with the default budget); a short --iters '
              'does that')
    print(f'picture    : {picture}')
    print(f'wall time  : {total / 60:.1f} min ({total:.0f} s; training {train_time:.0f} s) on {where}')
    return dict(metrics=metrics, run_dir=run_dir, checkpoint=checkpoint, seconds=total)


if __name__ == '__main__':
    main()

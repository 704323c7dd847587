"""Train a detector, segmentor or 3D detector from an mmdet, mmseg or mmdet3d config.

One script for the three codebases: the config's ``default_scope`` picks the registries, mmengine's Runner
does the rest. The command line is mmdet's:

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr] [--resume [CKPT]]
                                 [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]

Multi-GPU: ``tools/dist_train.sh CONFIG GPUS [ARGS]``.

The work directory (``--work-dir``, else ``work_dirs/<config name>``) is never cleared. If it already holds
checkpoints of an earlier run, training stops with a message unless ``--resume`` continues that run;
choose another ``--work-dir`` to start afresh. Logs go to a new ``<work_dir>/<timestamp>/`` every run.
"""
import argparse
import glob
import os
import os.path as osp
import sys


def _import_mmdcnv4():
    """Imports mmdcnv4 first: it registers its models and makes mmengine load checkpoints on torch >= 2.6."""
    try:
        import mmdcnv4  # noqa: F401
    except ImportError:  # a checkout that is not on the path: use the repository this script is in
        sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
        import mmdcnv4  # noqa: F401


_import_mmdcnv4()

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

# Files of an earlier run that a new run in the same work directory would overwrite or delete.
_RUN_FILES = ('last_checkpoint', 'epoch_*.pth', 'iter_*.pth', 'best_*.pth')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model (mmdet, mmseg or mmdet3d config)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by total batch / auto_scale_lr.base_batch_size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from the given checkpoint; without a path, from the latest '
                        'checkpoint in the work directory')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs in xxx=yyy format; '
                        'lists as key="[a,b]" or key=a,b; nested lists/tuples as key="[(a,b),(c,d)]" '
                        '(quotation marks needed, no white space)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    # torch.distributed.launch passes --local-rank; older launchers --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def earlier_run_files(work_dir):
    """Checkpoint files of an earlier run in ``work_dir`` (sorted), which a fresh run would overwrite."""
    found = []
    for pattern in _RUN_FILES:
        found += glob.glob(osp.join(work_dir, pattern))
    return sorted(found)


def build_config(args):
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir: command line > config > ./work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_wrapper == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in the config.', logger='current')
        else:
            if optim_wrapper != 'OptimWrapper':
                raise ValueError(f'--amp works with optim_wrapper.type="OptimWrapper", not {optim_wrapper!r}')
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')

    if args.auto_scale_lr:
        if cfg.get('auto_scale_lr', None) is None or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs auto_scale_lr = dict(base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True

    if args.launcher != 'none' and not torch.cuda.is_available() and cfg.get('model_wrapper_cfg') is None:
        # CPU processes (gloo): DDP must not be given device ids (mmengine passes the local rank).
        cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None)

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def check_work_dir(cfg):
    """Refuses to start a fresh run over the checkpoints of an earlier one (the files are kept)."""
    if cfg.get('resume', False):
        return
    found = earlier_run_files(cfg.work_dir)
    if found:
        names = ', '.join(osp.basename(f) for f in found[:5]) + (' ...' if len(found) > 5 else '')
        sys.exit(f'train.py: the work directory {cfg.work_dir} already holds checkpoints of an earlier run '
                 f'({names}). A new run would overwrite them, so nothing was started. Continue that run '
                 'with --resume, or pass another --work-dir.')


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    check_work_dir(cfg)
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()

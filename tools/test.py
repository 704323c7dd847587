"""Evaluate a checkpoint with an mmdet, mmseg or mmdet3d config (the config's test_dataloader/evaluator).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] [--show-dir DIR]
                                           [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]

Multi-GPU: ``tools/dist_test.sh CONFIG CHECKPOINT GPUS [ARGS]``.

``--out``: a ``.pkl`` file receives the raw predictions (mmdet: boxes/masks per image, as mmdet's own
test.py writes them); for an mmseg config a folder receives the predicted label maps as PNGs.
``--show-dir``: images with the predictions drawn are saved in this folder (relative paths are inside
``<work_dir>/<timestamp>/``). The metrics are printed and logged in ``<work_dir>/<timestamp>/``; nothing in
the work directory is overwritten.
"""
import argparse
import inspect
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

from mmengine.config import Config, ConfigDict, DictAction  # noqa: E402
from mmengine.registry import HOOKS, RUNNERS, init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the directory to save the file containing evaluation metrics')
    parser.add_argument('--out', type=str,
                        help='dump predictions to a pickle file (mmdet/mmdet3d: FILE.pkl) or, for mmseg '
                        'configs, save the predicted label maps in this folder')
    parser.add_argument('--show', action='store_true', help='show prediction results in a window')
    parser.add_argument('--show-dir', help='folder where painted images will be saved (relative paths are '
                        'inside <work_dir>/<timestamp>/)')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument('--task', choices=['mono_det', 'multi-view_det', 'lidar_det', 'lidar_seg',
                                           'multi-modality_det'],
                        help='mmdet3d only: what the visualization hook draws')
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation (needs tta_model and tta_pipeline in the config)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs in xxx=yyy format')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _hook_accepts(hook_type, arg):
    """Whether the visualization hook class named in the config takes the keyword ``arg``."""
    if isinstance(hook_type, str):
        with HOOKS.switch_scope_and_registry(None) as registry:  # the default scope's registry
            hook_cls = registry.get(hook_type)
    else:
        hook_cls = hook_type
    if hook_cls is None:
        return False
    return arg in inspect.signature(hook_cls.__init__).parameters


def trigger_visualization_hook(cfg, args):
    """Turns on drawing in the config's visualization hook (mmdet, mmseg and mmdet3d hooks)."""
    hooks = cfg.get('default_hooks', {})
    if 'visualization' not in hooks or hooks['visualization'] is None:
        raise RuntimeError('--show/--show-dir need a visualization hook in default_hooks (e.g. mmdet\'s '
                           'DetVisualizationHook or mmseg\'s SegVisualizationHook)')
    hook = hooks['visualization']
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.task is not None:
        hook['vis_task'] = args.task
    if args.show_dir:
        if _hook_accepts(hook['type'], 'test_out_dir'):  # mmdet / mmdet3d hooks
            hook['test_out_dir'] = args.show_dir
        else:  # mmseg: the visualizer's own save_dir
            cfg.visualizer['save_dir'] = args.show_dir
    return cfg


def add_output(cfg, out, scope):
    """Adds what writes ``--out``, as the codebase's own test.py does."""
    if scope == 'mmseg':
        cfg.test_evaluator['output_dir'] = out
        cfg.test_evaluator['keep_results'] = True
        return cfg
    if not out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl or .pickle file, got {out!r}')
    dump = ConfigDict(type='DumpDetResults' if scope == 'mmdet' else 'DumpResults', out_file_path=out)
    evaluator = cfg.test_evaluator
    if isinstance(evaluator, (list, tuple)):
        cfg.test_evaluator = list(evaluator) + [dump]
    elif isinstance(evaluator, dict) and 'metrics' in evaluator:  # an Evaluator config
        metrics = evaluator['metrics']
        evaluator['metrics'] = (list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]) + [dump]
    else:
        cfg.test_evaluator = [evaluator, dump]
    return cfg


def build_config(args):
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    scope = cfg.get('default_scope', None)
    if scope is not None:
        init_default_scope(scope)  # the visualization hook classes are looked up in that scope

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ValueError('--tta needs tta_model and tta_pipeline in the config')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out is not None:
        cfg = add_output(cfg, args.out, scope)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args)
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        runner = RUNNERS.build(cfg)
    metrics = runner.test()
    return metrics


if __name__ == '__main__':
    main()

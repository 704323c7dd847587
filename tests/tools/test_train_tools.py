"""tools/train.py, tools/test.py and the other detection tools, and the synthetic COCO generator.

The command-line runs are real subprocesses on the CPU demo config, shrunk to two iterations on a tiny
synthetic set (``--cfg-options``); the argument handling is also checked in-process, which is fast.
"""
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

import mmdcnv4  # noqa: F401
from mmdcnv4.datasets.synthetic_coco import CLASSES, generate_synthetic_coco, synthetic_coco_exists

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO = 'configs/demo/mask-rcnn_flash-internimage-demo_synthetic-coco.py'
SIZE = 96


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', osp.join(ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
    info = generate_synthetic_coco(str(tmp_path_factory.mktemp('synthetic_coco')), num_train=4, num_val=2,
                                   size=SIZE, min_size=24, max_size=48, max_objects=2, seed=3)
    return info['data_root']


def _data_options(root):
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    return ([f'{k}.dataset.data_root={root}/' for k in loaders]
            + [f'{k}.ann_file={root}/annotations/instances_val.json' for k in ('val_evaluator', 'test_evaluator')]
            + [f'{k}.dataset.pipeline.{i}.scale=({SIZE},{SIZE})' for k, i in zip(loaders, (2, 1, 1))])


def _train_options(root, iters):
    return ['train_dataloader.batch_size=2', f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            'param_scheduler.0.end=1', 'param_scheduler.1.begin=1', f'param_scheduler.1.end={iters}',
            'default_hooks.checkpoint.interval=1', 'default_hooks.checkpoint.max_keep_ckpts=-1',
            'default_hooks.logger.interval=1', 'log_processor.window_size=1'] + _data_options(root) + [
            'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']  # after the val_* keys above


def _run(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE', CUDA_VISIBLE_DEVICES='')
    env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------------------------------------
# the synthetic COCO generator
# ----------------------------------------------------------------------------------------------------------
def test_synthetic_coco_is_valid_and_deterministic(tmp_path):
    from pycocotools.coco import COCO
    kwargs = dict(num_train=3, num_val=2, size=(64, 80), min_size=16, max_size=30, seed=7)
    first = generate_synthetic_coco(str(tmp_path / 'a'), **kwargs)
    second = generate_synthetic_coco(str(tmp_path / 'b'), **kwargs)
    assert not first['reused'] and first['classes'] == CLASSES
    for split in ('train', 'val'):
        ann = osp.join('annotations', f'instances_{split}.json')
        with open(tmp_path / 'a' / ann, 'rb') as f, open(tmp_path / 'b' / ann, 'rb') as g:
            assert f.read() == g.read()
        coco = COCO(str(tmp_path / 'a' / ann))
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            assert (img['height'], img['width']) == (64, 80)
            with open(tmp_path / 'a' / split / img['file_name'], 'rb') as f, \
                    open(tmp_path / 'b' / split / img['file_name'], 'rb') as g:
                data = f.read()
                assert data[:2] == b'\xff\xd8' and data == g.read()  # identical JPEG files
        for ann_ in coco.loadAnns(coco.getAnnIds()):
            mask = coco.annToMask(ann_)
            x, y, w, h = ann_['bbox']
            assert 0 <= x and x + w <= 80 and 0 <= y and y + h <= 64 and w >= 10 and h >= 10
            assert abs(int(mask.sum()) - ann_['area']) <= 0.15 * ann_['area'] + 10  # the mask is the shape
    assert synthetic_coco_exists(str(tmp_path / 'a'), **kwargs)
    assert not synthetic_coco_exists(str(tmp_path / 'a'), **dict(kwargs, seed=8))
    again = generate_synthetic_coco(str(tmp_path / 'a'), **kwargs)
    assert again['reused'] and again['train_instances'] == first['train_instances']
    other = generate_synthetic_coco(str(tmp_path / 'c'), **dict(kwargs, seed=8))
    with open(tmp_path / 'a' / 'annotations' / 'instances_val.json') as f, \
            open(tmp_path / 'c' / 'annotations' / 'instances_val.json') as g:
        assert json.load(f)['annotations'] != json.load(g)['annotations']


def test_synthetic_coco_command_line(tmp_path):
    out = _run(['-m', 'mmdcnv4.datasets.synthetic_coco', str(tmp_path / 'set'), '--num-train', '2',
                '--num-val', '1', '--size', '64', '--min-size', '16', '--max-size', '30'], timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'wrote' in out.stdout and 'RuntimeWarning' not in out.stderr
    assert sorted(os.listdir(tmp_path / 'set' / 'train')) == ['000000.jpg', '000001.jpg']


# ----------------------------------------------------------------------------------------------------------
# tools/train.py and tools/test.py, in-process
# ----------------------------------------------------------------------------------------------------------
def test_train_arguments(tmp_path):
    train = _tool('train')
    cfg = train.build_config(train.parse_args([DEMO, '--amp', '--resume', '--cfg-options',
                                               'train_cfg.max_iters=7']))
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.resume is True and cfg.load_from is None
    assert cfg.train_cfg.max_iters == 7
    assert cfg.work_dir == osp.join('./work_dirs', osp.splitext(osp.basename(DEMO))[0])
    cfg = train.build_config(train.parse_args([DEMO, '--resume', 'some.pth', '--work-dir', str(tmp_path),
                                               '--auto-scale-lr', '--launcher', 'none']))
    assert (cfg.resume, cfg.load_from, cfg.work_dir) == (True, 'some.pth', str(tmp_path))
    assert cfg.auto_scale_lr.enable is True and cfg.launcher == 'none'
    cfg = train.build_config(train.parse_args([DEMO]))
    assert cfg.resume is False and cfg.optim_wrapper.type == 'OptimWrapper'


def test_test_arguments(tmp_path):
    test = _tool('test')
    cfg = test.build_config(test.parse_args([DEMO, 'ckpt.pth', '--out', 'r.pkl', '--show-dir', 'vis',
                                             '--work-dir', str(tmp_path)]))
    assert cfg.load_from == 'ckpt.pth' and cfg.work_dir == str(tmp_path)
    hook = cfg.default_hooks.visualization
    assert hook.draw is True and hook.test_out_dir == 'vis'
    assert [m['type'] for m in cfg.test_evaluator] == ['CocoMetric', 'DumpDetResults']
    with pytest.raises(ValueError, match='pkl'):
        test.build_config(test.parse_args([DEMO, 'ckpt.pth', '--out', 'results.json']))


def test_dist_scripts_usage():
    for script in ('dist_train.sh', 'dist_test.sh'):
        out = subprocess.run(['bash', osp.join(ROOT, 'tools', script)], capture_output=True, text=True)
        assert out.returncode == 2 and 'usage' in out.stderr


def test_get_flops_counts_dcnv4():
    from mmengine.config import Config
    flops = _tool('get_flops')
    cfg = Config.fromfile(osp.join(ROOT, DEMO))
    result = flops.count(cfg, shape=(64, 64))
    assert result['params'] > 1e6 and result['flops'] > 1e8
    assert not any('dcnv4' in op for op in result['unsupported'])
    assert result['by_module']['backbone'] > 0


# ----------------------------------------------------------------------------------------------------------
# the command line, end to end
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_resume_test_command_line(coco_root, tmp_path):
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    (work_dir / 'notes.txt').write_text('mine')

    out = _run(['tools/train.py', DEMO, '--work-dir', str(work_dir), '--cfg-options']
               + _train_options(coco_root, 2))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (work_dir / 'notes.txt').read_text() == 'mine'
    for name in ('iter_1.pth', 'iter_2.pth', 'last_checkpoint'):
        assert (work_dir / name).is_file(), os.listdir(work_dir)
    stamp = (work_dir / 'iter_2.pth').stat().st_mtime_ns

    # a fresh run over the same work dir is refused and touches nothing
    out = _run(['tools/train.py', DEMO, '--work-dir', str(work_dir), '--cfg-options']
               + _train_options(coco_root, 2))
    assert out.returncode != 0 and 'already holds checkpoints' in out.stderr
    assert (work_dir / 'iter_2.pth').stat().st_mtime_ns == stamp
    assert (work_dir / 'notes.txt').read_text() == 'mine'

    # --resume continues from iteration 2 (torch >= 2.6 loads the full checkpoint through mmdcnv4.compat)
    out = _run(['tools/train.py', DEMO, '--work-dir', str(work_dir), '--resume', '--cfg-options']
               + _train_options(coco_root, 3))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert 'resumed epoch: 0, iter: 2' in log
    assert (work_dir / 'iter_3.pth').is_file() and (work_dir / 'notes.txt').read_text() == 'mine'

    # test.py: COCO metrics, --out pickle, --show-dir pictures
    pkl = tmp_path / 'results.pkl'
    out = _run(['tools/test.py', DEMO, str(work_dir / 'iter_3.pth'), '--work-dir', str(tmp_path / 'test'),
                '--out', str(pkl), '--show-dir', 'vis', '--cfg-options'] + _data_options(coco_root))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log
    assert pkl.is_file()
    pictures = [f for _, _, files in os.walk(tmp_path / 'test') for f in files if f.endswith('.jpg')]
    assert len(pictures) == 2


def test_benchmark_fps_on_random_input():
    from mmengine.config import Config
    bench = _tool('benchmark_fps')
    args = bench.parse_args([DEMO, '--shape', '64', '--num-iters', '2', '--warmup', '1', '--device', 'cpu'])
    result = bench.benchmark(Config.fromfile(osp.join(ROOT, DEMO)), None, args)
    assert result['images'] == 2 and result['images_per_s'] > 0 and result['device'] == 'cpu'


@pytest.mark.slow
def test_demo_script_plumbing(tmp_path):
    """tools/demo.py (`make demo`) end to end with a 2-iteration budget: data, train, test, picture."""
    out = _run(['tools/demo.py', '--iters', '2', '--device', 'cpu', '--threads', '1',
                '--work-dir', str(tmp_path / 'work'), '--data-root', str(tmp_path / 'data')], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'bbox mAP' in out.stdout and 'wall time' in out.stdout
    (run_dir, ) = os.listdir(tmp_path / 'work')
    files = os.listdir(tmp_path / 'work' / run_dir)
    assert {'iter_2.pth', 'prediction.png', 'train.log', 'test.log'} <= set(files)

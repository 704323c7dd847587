"""Distributed training on mmengine's engine: two CPU processes (gloo) through tools/dist_train.sh."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdcnv4.datasets import generate_synthetic_coco

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / 'configs' / 'demo' / 'mask-rcnn_flash-internimage-demo_synthetic-coco.py'

# Saves each rank's weights after training, so the test can compare them.
DUMP_HOOK = '''
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpWeightsHook(Hook):

    def _dump(self, runner, name):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        torch.save(model.state_dict(), f'{runner.work_dir}/{name}_rank{get_rank()}.pth')

    def before_train(self, runner):
        self._dump(runner, 'initial')

    def after_train(self, runner):
        self._dump(runner, 'weights')
'''


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_agree(tmp_path):
    generate_synthetic_coco(tmp_path / 'data' / 'synthetic_coco', num_train=16, num_val=4, size=96)
    (tmp_path / 'dump_weights_hook.py').write_text(DUMP_HOOK)
    config = tmp_path / 'dist_demo.py'
    config.write_text(f"""_base_ = '{CONFIG}'
custom_imports = dict(imports=['mmdcnv4', 'dump_weights_hook'], allow_failed_imports=False)
custom_hooks = [dict(type='DumpWeightsHook')]
train_cfg = dict(max_iters=3, val_interval=100)
train_dataloader = dict(batch_size=2)
""")
    work_dir = tmp_path / 'work'
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(free_port()), OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get('PYTHONPATH', '')]))
    # No backend or wrapper settings: on a machine without CUDA the run falls back to gloo by itself.
    result = subprocess.run(
        ['bash', str(ROOT / 'tools' / 'dist_train.sh'), str(config), '2', '--work-dir', str(work_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(work_dir / f'weights_rank{r}.pth', map_location='cpu') for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # Training moved the weights: the ranks agree on something other than their initialisation.
    initial = torch.load(work_dir / 'initial_rank0.pth', map_location='cpu')
    assert any(not torch.equal(initial[key], ranks[0][key]) for key in initial)

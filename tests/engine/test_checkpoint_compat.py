"""mmengine 0.10.7 + torch >= 2.6: a run's own checkpoint resumes, and upstream-style files load."""
import pickle
import sys
import types

import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn
from torch.utils.data import Dataset

import mmdcnv4  # noqa: F401  (installs the trusted checkpoint loaders)
from mmdcnv4.compat import load_trusted_checkpoint


class ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs, targets, mode='tensor'):
        loss = (self.linear(inputs).squeeze(-1) - targets).square().mean()
        return dict(loss=loss) if mode == 'loss' else [loss]


class ToyData(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, index):
        gen = torch.Generator().manual_seed(index)
        return dict(inputs=torch.randn(4, generator=gen), targets=torch.randn((), generator=gen))


def make_runner(work_dir, max_iters, resume=False):
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=False), batch_size=2,
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        resume=resume, default_scope='mmengine', experiment_name=f'run{int(resume)}')


def test_save_then_resume(tmp_path):
    torch.manual_seed(0)
    make_runner(tmp_path, 2).train()
    checkpoint = tmp_path / 'iter_2.pth'
    assert checkpoint.exists()
    # The checkpoint holds non-tensor objects (message hub, numpy), which weights_only=True refuses.
    resumed = make_runner(tmp_path, 4, resume=True)
    resumed.train()
    assert resumed.iter == 4
    assert (tmp_path / 'iter_4.pth').exists() and checkpoint.exists()  # nothing the user had is lost


def test_upstream_style_file_with_a_missing_class_loads(tmp_path):
    # An upstream ImageNet file may pickle its training config from a package that is not installed.
    fake = types.ModuleType('yacs_like_missing')

    class CfgNode(dict):
        pass

    CfgNode.__module__ = 'yacs_like_missing'
    CfgNode.__qualname__ = 'CfgNode'
    fake.CfgNode = CfgNode
    sys.modules['yacs_like_missing'] = fake
    path = tmp_path / 'upstream.pth'
    try:
        torch.save({'model': {'w': torch.ones(2)}, 'config': CfgNode(a=1)}, path, pickle_module=pickle)
    finally:
        del sys.modules['yacs_like_missing']
    loaded = load_trusted_checkpoint(str(path), map_location='cpu')
    assert torch.equal(loaded['model']['w'], torch.ones(2))
    via_mmengine = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert torch.equal(via_mmengine['model']['w'], torch.ones(2))

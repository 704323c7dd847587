"""Compatibility fixes for mmengine 0.10.7 on today's torch, applied when mmdcnv4 is imported.

1. Checkpoint loading on torch >= 2.6 (below). 2. The torchrun launcher on CPU-only machines
(``patch_mmengine_cpu_distributed``).


torch 2.6 changed ``torch.load``'s default to ``weights_only=True``. mmengine 0.10.7 calls ``torch.load``
without the argument, so resuming a run (whose checkpoint holds the message hub, numpy arrays and
config objects) and loading upstream checkpoints fail with an ``UnpicklingError``. Checkpoint files that
a user names in a config or on the command line are trusted input, exactly as they were on older torch,
so the local and http(s) loaders are re-registered with ``weights_only=False``. Nothing else about
``torch.load`` changes.
"""
import os.path as osp
import pickle

import torch

__all__ = ['load_trusted_checkpoint', 'patch_mmengine_checkpoint_loading', 'patch_mmengine_cpu_distributed']


class _Placeholder(dict):
    """Stands in for a pickled object whose class cannot be imported here (e.g. a training config)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        self.__dict__['pickled_state'] = state


class _TolerantUnpickler(pickle.Unpickler):

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {'__module__': module})


class _TolerantPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler survives missing classes."""
    Unpickler = _TolerantUnpickler
    load = staticmethod(pickle.load)


def load_trusted_checkpoint(filename, map_location=None):
    """``torch.load`` for a checkpoint file the user chose (full unpickling, as before torch 2.6).

    Upstream's ImageNet files can carry their training config as an object of a package that is not
    installed here (yacs); such objects load as placeholders instead of failing the whole file.
    """
    try:
        return torch.load(filename, map_location=map_location, weights_only=False)
    except (ImportError, AttributeError):
        return torch.load(filename, map_location=map_location, weights_only=False, pickle_module=_TolerantPickle)


def patch_mmengine_checkpoint_loading():
    """Registers the trusted loaders with mmengine's CheckpointLoader; a no-op without mmengine."""
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:
        return False

    @CheckpointLoader.register_scheme(prefixes='', force=True)
    def load_from_local(filename, map_location):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return load_trusted_checkpoint(filename, map_location)

    @CheckpointLoader.register_scheme(prefixes=('http://', 'https://'), force=True)
    def load_from_http(filename, map_location=None, model_dir=None, progress=True):
        return torch.hub.load_state_dict_from_url(filename, model_dir=model_dir, map_location=map_location,
                                                  progress=progress, weights_only=False)

    return True


def patch_mmengine_cpu_distributed():
    """Lets mmengine's torchrun launcher start on machines without CUDA (CPU training over gloo).

    mmengine 0.10.7 calls ``torch.cuda.set_device`` unconditionally when it initialises a 'pytorch'
    launcher, which fails on a CPU-only torch; NCCL, its default backend, needs GPUs anyway. Without CUDA,
    the process group is created directly, with gloo in place of nccl.
    """
    try:
        import mmengine.dist.utils as dist_utils
    except ImportError:
        return False
    original = dist_utils._init_dist_pytorch
    if getattr(original, 'handles_cpu', False):
        return True

    def init_dist_pytorch(backend, init_backend='torch', **kwargs):
        if torch.cuda.is_available() or init_backend != 'torch':
            return original(backend, init_backend=init_backend, **kwargs)
        import torch.distributed as torch_dist
        torch_dist.init_process_group(backend='gloo' if backend == 'nccl' else backend, **kwargs)

    init_dist_pytorch.handles_cpu = True
    dist_utils._init_dist_pytorch = init_dist_pytorch
    return True


patch_mmengine_checkpoint_loading()
patch_mmengine_cpu_distributed()

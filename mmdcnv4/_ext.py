"""Loads the compiled extension ``mmdcnv4._C`` lazily, with messages that say what to do.

Importing mmdcnv4 never fails because of the extension: the first call of an op that needs it raises
(or, on CPU, warns once and falls back to the pure-PyTorch reference) with the reason.
"""
import functools
import warnings

import torch

_BUILD_HINT = ('Build it against the installed torch with `pip install --no-build-isolation -e .` '
               '(or `make test`, which sets everything up).')


@functools.lru_cache(maxsize=None)
def load_error():
    """Returns None when ``mmdcnv4._C`` is loaded, else the reason it could not be."""
    try:
        from mmdcnv4 import _C  # noqa: F401  (registers the torch.ops.mmdcnv4 kernels)
    except (ImportError, OSError) as err:
        return f'mmdcnv4._C could not be loaded ({err}).'
    # Autograd of the ops is registered in C++ (csrc/*/*_autograd.cpp): an older build would run the
    # kernels but lose the gradients.
    if not torch._C._dispatch_has_kernel_for_dispatch_key('mmdcnv4::dcnv4_forward', 'Autograd'):
        return 'mmdcnv4._C is out of date (it has no autograd kernels, so gradients would be lost).'
    return None


@functools.lru_cache(maxsize=None)
def has_kernel(op_name, device_type):
    """Whether ``torch.ops.mmdcnv4.<op_name>`` has a kernel for ``device_type`` ('cpu' or 'cuda').

    Cached: the registrations do not change once ``mmdcnv4._C`` is loaded, and the dispatcher query costs
    about as much as a small op call.
    """
    if load_error() is not None:
        return False
    key = {'cpu': 'CPU', 'cuda': 'CUDA'}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f'mmdcnv4::{op_name}', key)


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(op_name, reason):
    warnings.warn(f'{reason} {_BUILD_HINT} Using the slow pure-PyTorch reference for {op_name} on CPU.',
                  RuntimeWarning, stacklevel=3)


def require_kernel(op_name, device_type):
    """Returns True if the compiled kernel can run; False means 'use the CPU reference'.

    Raises a clear RuntimeError when no path exists (a CUDA tensor without CUDA kernels, or another device).
    """
    if has_kernel(op_name, device_type):
        return True
    reason = load_error()
    if device_type == 'cpu':
        _warn_fallback_once(op_name, reason or 'mmdcnv4._C has no CPU kernel.')
        return False
    if device_type == 'cuda':
        if reason is None:
            reason = ('mmdcnv4 was built without its CUDA kernels (torch without CUDA, or no CUDA toolkit '
                      'at build time).')
        raise RuntimeError(f'{op_name} got CUDA tensors, but {reason} Rebuild on a machine with a '
                           f'CUDA-enabled torch and nvcc: `pip install --no-build-isolation -e .`.')
    raise RuntimeError(f'{op_name} supports CPU and CUDA tensors, not {device_type!r}.')

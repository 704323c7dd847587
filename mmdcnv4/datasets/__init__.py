"""Synthetic datasets for demos and tests, written to disk in the standard formats.

The generators are imported on first use, so ``python -m mmdcnv4.datasets.<generator>`` runs cleanly.
"""
import importlib

_EXPORTS = {
    'generate_synthetic_coco': 'synthetic_coco',
    'synthetic_coco_exists': 'synthetic_coco',
    'random_batch': 'random_batch',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

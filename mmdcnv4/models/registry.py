"""Registers mmdcnv4's classes with mmengine and with the OpenMMLab codebases that are installed.

A class goes into mmengine's root registry, which every codebase's registry has as its parent, and into
the registry of the same name of each of mmdet, mmseg and mmdet3d that imports. With mmengine's parent
lookup the root entry alone makes ``dict(type='FlashInternImage')`` build under any default scope; the
codebase entries also make ``mmdet.registry.MODELS.get('FlashInternImage')`` and scoped names such as
``'mmdet.FlashInternImage'`` resolve. Importing the three registries costs about 70 ms (most of it
mmcv, which their packages import) of the 3.8 s that ``import mmdcnv4`` takes with torch and mmengine,
measured on a 2-core CPU machine. A codebase that is missing or fails to import is skipped, so
``import mmdcnv4`` never fails because of one.
"""
import importlib
import warnings

import mmengine.registry

__all__ = ['CODEBASES', 'register', 'register_model']

# Codebases whose ``<codebase>.registry`` gets the classes too.
CODEBASES = ('mmdet', 'mmseg', 'mmdet3d')


def _codebase_registry(codebase, registry_name):
    try:
        module = importlib.import_module(f'{codebase}.registry')
    except Exception:  # noqa: BLE001  (a broken optional codebase must not break import mmdcnv4)
        return None
    return getattr(module, registry_name, None)


def _add(registry, obj):
    """Registers ``obj`` under its class name unless that name is already taken."""
    name = obj.__name__
    current = registry.module_dict.get(name)
    if current is obj:
        return
    if current is not None:
        warnings.warn(f'{registry.scope}.{registry.name} already has a {name!r} ({current.__module__}); '
                      f'mmdcnv4 leaves it in place', RuntimeWarning, stacklevel=3)
        return
    registry.register_module(module=obj)


def register(registry_name='MODELS', codebases=CODEBASES):
    """Class decorator: adds the class to ``mmengine.registry.<registry_name>`` and to the registry of
    that name of each codebase in ``codebases`` that imports."""

    def decorator(obj):
        _add(getattr(mmengine.registry, registry_name), obj)
        for codebase in codebases:
            registry = _codebase_registry(codebase, registry_name)
            if registry is not None:
                _add(registry, obj)
        return obj

    return decorator


register_model = register('MODELS')

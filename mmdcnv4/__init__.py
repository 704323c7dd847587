"""mmdcnv4: DCNv4 operators and FlashInternImage models for the OpenMMLab 2.0 stack.

Importing the package registers its ops with torch's dispatcher and its layers and models with the
OpenMMLab registries that are installed. It never probes the GPU and never fails for want of one.
"""
from . import compat  # noqa: F401  (mmengine fixes: checkpoint loading on torch >= 2.6, CPU launches; first)
from . import ops  # noqa: F401
from . import engine, models  # noqa: F401
from .version import __version__

__all__ = ['__version__', 'ops']

"""Models: the FlashInternImage backbone and neck pieces (importing registers them)."""
from . import backbones, necks  # noqa: F401
from .backbones import FlashInternImage, FlashInternImageCls

__all__ = ['FlashInternImage', 'FlashInternImageCls']

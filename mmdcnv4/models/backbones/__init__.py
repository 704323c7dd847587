"""Backbones (importing registers them in the OpenMMLab registries)."""
from .flash_internimage import (ARCH_SETTINGS, FlashInternImage, FlashInternImageCls,
                                filter_upstream_state_dict, load_upstream_checkpoint)

__all__ = ['ARCH_SETTINGS', 'FlashInternImage', 'FlashInternImageCls', 'filter_upstream_state_dict',
           'load_upstream_checkpoint']

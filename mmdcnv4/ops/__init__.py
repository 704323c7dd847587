"""Operators: DCNv4 and flash multi-scale deformable attention (CPU and CUDA)."""
from .dcnv4 import dcnv4
from .modules import DCNv4, DCNv4Conv2d
from .reference import dcnv4_reference

__all__ = ['dcnv4', 'dcnv4_reference', 'DCNv4', 'DCNv4Conv2d']

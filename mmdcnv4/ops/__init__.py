"""Operators: DCNv4 and flash multi-scale deformable attention (CPU and CUDA), and the fused post-norm
residual of FlashInternImage (CUDA inference)."""
from .dcnv4 import dcnv4
from .layer_norm import residual_layer_norm
from .modules import DCNv4, DCNv4Conv2d
from .ms_deform_attn import flash_deform_attn, ms_deform_attn
from .ms_deform_attn_module import FlashMSDAHook, FlashMultiScaleDeformableAttention, replace_ms_deform_attn
from .reference import dcnv4_reference, flash_deform_attn_reference, ms_deform_attn_reference

__all__ = [
    'dcnv4', 'dcnv4_reference', 'DCNv4', 'DCNv4Conv2d', 'flash_deform_attn', 'ms_deform_attn',
    'FlashMultiScaleDeformableAttention', 'FlashMSDAHook', 'replace_ms_deform_attn', 'flash_deform_attn_reference',
    'ms_deform_attn_reference', 'residual_layer_norm'
]

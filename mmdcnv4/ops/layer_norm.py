"""``x + gamma * LayerNorm(branch)``: the post-norm residual of FlashInternImage, fused for inference.

On CUDA, when no gradient is needed, one kernel (``csrc/layer_norm/cuda/residual_layer_norm.cu``) reads
the branch (any of fp32/fp16/bf16) and the fp32 residual once and writes the fp32 sum; everywhere else
(CPU, training, ``torch.compile``, unusual dtypes) the same result comes from the eager ops. Both compute
the LayerNorm in fp32, as autocast does.
"""
import torch

from .. import _ext

__all__ = ['residual_layer_norm']

_MAX_FUSED_CHANNELS = 1536


def _fusable(x, branch, norm, gamma):
    return (x.is_cuda and x.dtype == torch.float32 and branch.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and x.shape == branch.shape and norm.elementwise_affine and norm.bias is not None
            and len(norm.normalized_shape) == 1 and norm.normalized_shape[0] == branch.shape[-1] <= _MAX_FUSED_CHANNELS
            and norm.weight.dtype == torch.float32 and (gamma is None or gamma.dtype == torch.float32)
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and _ext.has_kernel("_residual_layer_norm", "cuda"))


def residual_layer_norm(x, branch, norm, gamma=None):
    """Returns ``x + gamma * norm(branch)`` (``x + norm(branch)`` when ``gamma`` is None).

    Args:
        x: the residual stream, ``(..., C)``.
        branch: the branch output, same shape.
        norm: an ``nn.LayerNorm`` over the last dimension (C).
        gamma: layer scale ``(C,)`` or None.
    """
    if _fusable(x, branch, norm, gamma):
        return torch.ops.mmdcnv4._residual_layer_norm(x, branch, norm.weight, norm.bias, gamma, float(norm.eps))
    normed = norm(branch)
    return x + normed if gamma is None else torch.addcmul(x, normed, gamma)


def _register():
    @torch.library.register_fake('mmdcnv4::_residual_layer_norm')
    def _fake(x, branch, weight, bias, gamma, eps):
        return torch.empty_like(x)


if _ext.load_error() is None:
    _register()

// The fused post-norm residual (layer_norm.cpp): shared limits and the CUDA launcher.
#pragma once

#include <ATen/ATen.h>

namespace mmdcnv4 {

// Channels the CUDA kernel keeps in registers (one warp per row).
constexpr int kResidualLayerNormMaxChannels = 1536;

// out = x + gamma * LayerNorm(branch) on the current stream, for arguments layer_norm.cpp has checked:
// contiguous, same CUDA device, x/weight/bias/gamma float32, branch float32/float16/bfloat16. gamma may be
// undefined (no layer scale).
void residual_layer_norm_launch(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight,
                                const at::Tensor& bias, const at::Tensor& gamma, at::Tensor& out, double eps);

}  // namespace mmdcnv4

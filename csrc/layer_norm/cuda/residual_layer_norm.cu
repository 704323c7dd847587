// out = x + gamma * LayerNorm(branch), one warp per row of C channels (the last dimension).
//
// Why: in FlashInternImage's post-norm blocks under fp16 autocast, eager PyTorch runs this as a cast of the
// fp16 branch to fp32, a LayerNorm whose one-block-per-row kernel is slow for C = 80..1280, and a mixed-dtype
// addcmul: three passes that took about half of FlashInternImage-B's inference time on an H200. Here a row is
// read once into registers (C <= kResidualLayerNormMaxChannels), its mean and variance come from warp shuffles (two
// passes over the registers, as numerically safe as Welford), and the result is written once, in fp32.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "layer_norm/layer_norm.h"

namespace mmdcnv4 {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxPerLane = kResidualLayerNormMaxChannels / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename branch_t, int PER_LANE>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    residual_layer_norm_kernel(const float* __restrict__ x, const branch_t* __restrict__ branch,
                               const float* __restrict__ weight, const float* __restrict__ bias,
                               const float* __restrict__ gamma, float* __restrict__ out, int64_t rows, int C,
                               float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t base = row * C;
  float v[PER_LANE];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int c = lane + 32 * i;
    v[i] = c < C ? static_cast<float>(branch[base + c]) : 0.f;
    sum += v[i];
  }
  const float mean = warp_sum(sum) / C;
  float squares = 0.f;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int c = lane + 32 * i;
    const float d = c < C ? v[i] - mean : 0.f;
    squares += d * d;
  }
  const float rstd = rsqrtf(warp_sum(squares) / C + eps);
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int c = lane + 32 * i;
    if (c < C) {
      const float normed = (v[i] - mean) * rstd * weight[c] + bias[c];
      out[base + c] = x[base + c] + (gamma != nullptr ? gamma[c] * normed : normed);
    }
  }
}

template <typename branch_t, int PER_LANE>
void launch(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight, const at::Tensor& bias,
            const float* gamma, at::Tensor& out, int64_t rows, int C, float eps) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "residual_layer_norm: too many rows");
  residual_layer_norm_kernel<branch_t, PER_LANE>
      <<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<float>(), branch.const_data_ptr<branch_t>(), weight.const_data_ptr<float>(),
          bias.const_data_ptr<float>(), gamma, out.mutable_data_ptr<float>(), rows, C, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Registers per lane by size class, so small C (80, 112) does not pay for the largest.
template <typename branch_t>
void dispatch(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight, const at::Tensor& bias,
              const float* gamma, at::Tensor& out, int64_t rows, int C, float eps) {
  if (C <= 128) return launch<branch_t, 4>(x, branch, weight, bias, gamma, out, rows, C, eps);
  if (C <= 256) return launch<branch_t, 8>(x, branch, weight, bias, gamma, out, rows, C, eps);
  if (C <= 512) return launch<branch_t, 16>(x, branch, weight, bias, gamma, out, rows, C, eps);
  if (C <= 1024) return launch<branch_t, 32>(x, branch, weight, bias, gamma, out, rows, C, eps);
  launch<branch_t, kMaxPerLane>(x, branch, weight, bias, gamma, out, rows, C, eps);
}

}  // namespace

void residual_layer_norm_launch(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight,
                                const at::Tensor& bias, const at::Tensor& gamma, at::Tensor& out, double eps) {
  const int C = static_cast<int>(branch.size(-1));
  const int64_t rows = x.numel() / C;
  if (rows == 0) return;
  const float* g = gamma.defined() ? gamma.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, branch.scalar_type(), "residual_layer_norm", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {  // the caller admits fp32, fp16 and bf16 only
      dispatch<scalar_t>(x, branch, weight, bias, g, out, rows, C, static_cast<float>(eps));
    }
  });
}

}  // namespace mmdcnv4

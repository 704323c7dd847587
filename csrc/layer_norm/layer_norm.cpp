// The fused post-norm residual: out = x + gamma * LayerNorm(branch) over the last dimension.
// Inference only (the autograd kernel refuses calls that need a gradient): mmdcnv4/ops/layer_norm.py calls
// it when no gradient is needed and falls back to the eager ops otherwise. The argument checks live here,
// in host code; the kernel is in cuda/residual_layer_norm.cu.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common/message.h"
#include "layer_norm/layer_norm.h"

#ifdef MMDCNV4_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

TORCH_LIBRARY_FRAGMENT(mmdcnv4, m) {
  m.def(
      "_residual_layer_norm(Tensor x, Tensor branch, Tensor weight, Tensor bias, Tensor? gamma, float eps) "
      "-> Tensor");
}

namespace mmdcnv4 {
namespace {

using Signature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, double);

// Autograd kernel: the op has no backward, so a call that would need one is refused with a clear message
// rather than producing an output silently cut from the graph; otherwise it runs the device kernel.
at::Tensor residual_layer_norm_autograd(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight,
                                        const at::Tensor& bias, const std::optional<at::Tensor>& gamma,
                                        double eps) {
  const bool needs_grad = x.requires_grad() || branch.requires_grad() || weight.requires_grad() ||
                          bias.requires_grad() || (gamma.has_value() && gamma->requires_grad());
  TORCH_CHECK(!(needs_grad && at::GradMode::is_enabled()),
              "_residual_layer_norm has no backward (inference only): call it under torch.no_grad() or "
              "torch.inference_mode(), or use mmdcnv4.ops.residual_layer_norm, which falls back to the eager ops");
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mmdcnv4::_residual_layer_norm", "").typed<Signature>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, branch, weight, bias, gamma, eps);
}

}  // namespace
}  // namespace mmdcnv4

TORCH_LIBRARY_IMPL(mmdcnv4, Autograd, m) { m.impl("_residual_layer_norm", &mmdcnv4::residual_layer_norm_autograd); }

#ifdef MMDCNV4_WITH_CUDA
namespace mmdcnv4 {
namespace {

at::Tensor residual_layer_norm_cuda(const at::Tensor& x, const at::Tensor& branch, const at::Tensor& weight,
                                    const at::Tensor& bias, const std::optional<at::Tensor>& gamma, double eps) {
  const int64_t C = branch.dim() > 0 ? branch.size(-1) : 0;
  TORCH_CHECK(C >= 1 && C <= kResidualLayerNormMaxChannels, "residual_layer_norm: the last dimension must be 1..",
              int_text(kResidualLayerNormMaxChannels), ", got ", int_text(C));
  TORCH_CHECK(x.sizes() == branch.sizes(), "residual_layer_norm: x and branch must have the same shape, got ",
              shape_text(x.sizes()), " and ", shape_text(branch.sizes()));
  TORCH_CHECK(x.scalar_type() == at::kFloat, "residual_layer_norm: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(branch.scalar_type() == at::kFloat || branch.scalar_type() == at::kHalf ||
                  branch.scalar_type() == at::kBFloat16,
              "residual_layer_norm: branch must be float32, float16 or bfloat16, got ", branch.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && weight.numel() == C &&
                  bias.numel() == C,
              "residual_layer_norm: weight and bias must be float32 with C = ", int_text(C), " elements");
  TORCH_CHECK(!gamma.has_value() || (gamma->scalar_type() == at::kFloat && gamma->numel() == C),
              "residual_layer_norm: gamma must be float32 with C = ", int_text(C), " elements");
  TORCH_CHECK(x.is_cuda() && branch.device() == x.device() && weight.device() == x.device() &&
                  bias.device() == x.device() && (!gamma.has_value() || gamma->device() == x.device()),
              "residual_layer_norm: all tensors must be on the same CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  residual_layer_norm_launch(xc, branch.contiguous(), weight.contiguous(), bias.contiguous(),
                             gamma.has_value() ? gamma->contiguous() : at::Tensor(), out, eps);
  return out;
}

}  // namespace
}  // namespace mmdcnv4

TORCH_LIBRARY_IMPL(mmdcnv4, CUDA, m) { m.impl("_residual_layer_norm", &mmdcnv4::residual_layer_norm_cuda); }
#endif

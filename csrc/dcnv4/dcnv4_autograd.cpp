// Autograd kernel of dcnv4_forward (schema in dcnv4.cpp). It is C++ for its per-call host cost: a
// torch::autograd::Function takes a few microseconds where a Python autograd formula takes tens, which
// dominated small calls. The fake kernels stay in Python (mmdcnv4/ops/dcnv4.py): torch.compile needs them.
// Device-agnostic: the same file is compiled into the CPU-only and the CUDA builds.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

namespace mmdcnv4 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t, int64_t, double, bool);
using BackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                                       int64_t, int64_t, int64_t, double, bool, bool);

// Looked up once: a schema lookup per call would cost more than the dispatch itself.
const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mmdcnv4::dcnv4_forward", "").typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mmdcnv4::dcnv4_backward", "").typed<BackwardSig>();
  return op;
}

class DCNv4Function : public torch::autograd::Function<DCNv4Function> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& offset_mask,
                            int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                            int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t group,
                            double offset_scale, bool remove_center) {
    // One int list rather than nine map entries: fewer hash-map insertions per call.
    ctx->saved_data["ints"] = std::vector<int64_t>{kernel_h, kernel_w,   stride_h,   stride_w, pad_h,
                                                   pad_w,    dilation_h, dilation_w, group};
    ctx->saved_data["offset_scale"] = offset_scale;
    ctx->saved_data["remove_center"] = remove_center;
    ctx->save_for_backward({value, offset_mask});
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                             dilation_w, group, offset_scale, remove_center);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto ints = ctx->saved_data["ints"].toIntVector();
    // grad_output in its own dtype (the kernels cast it); the deterministic flag as set when backward runs.
    auto grads = backward_op().call(saved[0], saved[1], grad_outputs[0].contiguous(), ints[0], ints[1], ints[2],
                                    ints[3], ints[4], ints[5], ints[6], ints[7], ints[8],
                                    ctx->saved_data["offset_scale"].toDouble(),
                                    ctx->saved_data["remove_center"].toBool(),
                                    at::globalContext().deterministicAlgorithms());
    // One entry per forward argument: gradients for value and offset_mask, none for the 11 scalars.
    variable_list result(13);
    result[0] = std::move(std::get<0>(grads));
    result[1] = std::move(std::get<1>(grads));
    return result;
  }
};

// GCC 13 reports false -Warray-bounds / -Wstringop-overflow warnings in torch's Function::apply (its
// std::vector<bool>::reserve) inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
at::Tensor dcnv4_forward_autograd(const at::Tensor& value, const at::Tensor& offset_mask, int64_t kernel_h,
                                  int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                  int64_t dilation_h, int64_t dilation_w, int64_t group, double offset_scale,
                                  bool remove_center) {
  if (!at::GradMode::is_enabled() || !(value.requires_grad() || offset_mask.requires_grad())) {
    // Nothing to record: skip building a graph node.
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                             dilation_w, group, offset_scale, remove_center);
  }
  return DCNv4Function::apply(value, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                              dilation_w, group, offset_scale, remove_center);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace

TORCH_LIBRARY_IMPL(mmdcnv4, Autograd, m) { m.impl("dcnv4_forward", &dcnv4_forward_autograd); }

}  // namespace mmdcnv4

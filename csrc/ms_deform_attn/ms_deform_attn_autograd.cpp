// Autograd kernels of ms_deform_attn_forward and flash_deform_attn_forward (schemas in ms_deform_attn.cpp).
// They are C++ for their per-call host cost: a torch::autograd::Function takes a few microseconds where a
// Python autograd formula takes tens, which dominated small calls. The fake kernels stay in Python
// (mmdcnv4/ops/ms_deform_attn.py): torch.compile needs them. Device-agnostic: the same file is compiled
// into the CPU-only and the CUDA builds.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>

namespace mmdcnv4 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using MsForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&);
using MsBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&, bool);
using FlashForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   int64_t);
using FlashBackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const at::Tensor&, int64_t, bool);

// Looked up once: a schema lookup per call would cost more than the dispatch itself.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const c10::TypedOperatorHandle<MsForwardSig>& ms_forward_op() {
  static const auto op = find_op<MsForwardSig>("mmdcnv4::ms_deform_attn_forward");
  return op;
}

const c10::TypedOperatorHandle<MsBackwardSig>& ms_backward_op() {
  static const auto op = find_op<MsBackwardSig>("mmdcnv4::ms_deform_attn_backward");
  return op;
}

const c10::TypedOperatorHandle<FlashForwardSig>& flash_forward_op() {
  static const auto op = find_op<FlashForwardSig>("mmdcnv4::flash_deform_attn_forward");
  return op;
}

const c10::TypedOperatorHandle<FlashBackwardSig>& flash_backward_op() {
  static const auto op = find_op<FlashBackwardSig>("mmdcnv4::flash_deform_attn_backward");
  return op;
}

// Whether the call must be recorded for backward (grad mode on and some tensor input requires grad).
bool needs_graph(std::initializer_list<const at::Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs) {
    if (t->requires_grad()) return true;
  }
  return false;
}

class MsDeformAttnFunction : public torch::autograd::Function<MsDeformAttnFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
    ctx->save_for_backward({value, spatial_shapes, level_start_index, sampling_locations, attention_weights});
    at::AutoDispatchBelowADInplaceOrView guard;
    return ms_forward_op().call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    // grad_output in its own dtype (the kernels cast it); the deterministic flag as set when backward runs.
    auto grads = ms_backward_op().call(saved[0], saved[1], saved[2], saved[3], saved[4], grad_outputs[0].contiguous(),
                                       at::globalContext().deterministicAlgorithms());
    // value, spatial_shapes, level_start_index, sampling_locations, attention_weights: no gradient for the tables.
    return {std::move(std::get<0>(grads)), at::Tensor(), at::Tensor(), std::move(std::get<1>(grads)),
            std::move(std::get<2>(grads))};
  }
};

class FlashDeformAttnFunction : public torch::autograd::Function<FlashDeformAttnFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_loc_attn,
                            int64_t num_points) {
    ctx->saved_data["num_points"] = num_points;
    ctx->save_for_backward({value, spatial_shapes, level_start_index, sampling_loc_attn});
    at::AutoDispatchBelowADInplaceOrView guard;
    return flash_forward_op().call(value, spatial_shapes, level_start_index, sampling_loc_attn, num_points);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto grads = flash_backward_op().call(saved[0], saved[1], saved[2], saved[3], grad_outputs[0].contiguous(),
                                          ctx->saved_data["num_points"].toInt(),
                                          at::globalContext().deterministicAlgorithms());
    // value, spatial_shapes, level_start_index, sampling_loc_attn, num_points.
    return {std::move(std::get<0>(grads)), at::Tensor(), at::Tensor(), std::move(std::get<1>(grads)), at::Tensor()};
  }
};

at::Tensor ms_deform_attn_forward_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                           const at::Tensor& attention_weights) {
  if (!needs_graph({&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights})) {
    // Nothing to record: skip building a graph node.
    at::AutoDispatchBelowADInplaceOrView guard;
    return ms_forward_op().call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  }
  return MsDeformAttnFunction::apply(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
}

at::Tensor flash_deform_attn_forward_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                              const at::Tensor& level_start_index,
                                              const at::Tensor& sampling_loc_attn, int64_t num_points) {
  if (!needs_graph({&value, &spatial_shapes, &level_start_index, &sampling_loc_attn})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return flash_forward_op().call(value, spatial_shapes, level_start_index, sampling_loc_attn, num_points);
  }
  return FlashDeformAttnFunction::apply(value, spatial_shapes, level_start_index, sampling_loc_attn, num_points);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdcnv4, Autograd, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_autograd);
  m.impl("flash_deform_attn_forward", &flash_deform_attn_forward_autograd);
}

}  // namespace mmdcnv4

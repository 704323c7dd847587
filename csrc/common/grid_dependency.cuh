// Programmatic dependent launch (sm_90), device side. A kernel launched as a dependent one
// (cuda_buffers::launch_kernel(true, ...)) may start while the kernel before it on the stream still runs,
// once every block of that one has called release_dependents() (or exited); until it calls
// wait_for_prior_grids() it must not touch what that kernel writes. Everything before that kernel on the
// stream has finished by then (that kernel was launched the ordinary way), so the freshly allocated tensors a
// dependent kernel writes before its wait are safe. Both are no-ops before sm_90 and in kernels launched the
// ordinary way.
#pragma once

namespace mmdcnv4 {
namespace grid_dependency {

// Lets the kernel launched after this one as a dependent one start.
__device__ __forceinline__ void release_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the kernel before this one on the stream has finished and its writes are visible.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace grid_dependency
}  // namespace mmdcnv4

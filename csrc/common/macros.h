// Qualifiers shared by the CPU and CUDA translation units.
#pragma once

#ifdef __CUDACC__
#define MMDCNV4_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MMDCNV4_HOST_DEVICE inline
#endif

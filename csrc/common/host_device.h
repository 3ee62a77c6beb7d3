// HOST_DEVICE: mark per-element math that is shared, unchanged, by the C++ CPU
// kernels (compiled by the host compiler) and the CUDA kernels (compiled by nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE __host__ __device__
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE
#define HOST_DEVICE_INLINE inline
#endif

// N elements moved as one access (16 bytes for 8 halves or 4 floats): the vector type of the
// epilogue kernels and the implicit GEMM. The address must be aligned to the whole access: a
// GPU faults otherwise. The CPU emulation (tests/emulation) defines PTL_FUSED_ALIGNED to
// report a misaligned access and skip it; in the CUDA build it is true and costs nothing.
#pragma once

#include <cstdint>

#ifndef PTL_FUSED_ALIGNED
#define PTL_FUSED_ALIGNED(ptr, bytes) true
#endif

namespace ptl_fused {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  if (!PTL_FUSED_ALIGNED(p, sizeof(Vec<T, N>))) return {};
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  if (PTL_FUSED_ALIGNED(p, sizeof(Vec<T, N>))) *reinterpret_cast<Vec<T, N>*>(p) = x;
}

}  // namespace ptl_fused

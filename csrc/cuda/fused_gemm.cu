// Host entry points of the fused implicit-GEMM forward (the kernel: fused_gemm_kernel.cuh):
// dtype dispatch, the tensor-core check, the launch on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>

#include <atomic>
#include <cstdint>
#include <limits>

#include "fused_gemm.h"
#include "fused_gemm_kernel.cuh"

namespace ptl_fused {
namespace {

using namespace fused_gemm;

void check_tensor_cores(const Tensor& x) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "ptl_fused: the fused implicit-GEMM forward needs sm_80 or newer ",
              "for ", x.scalar_type(), " (tensor cores); this GPU is sm_", prop->major, prop->minor,
              ". Use backend 'cuda' (cuDNN + fused epilogue) instead.");
}

// The tensor-core path is compiled only for compute_80+ (PTL_FUSED_WMMA); older code traps. A
// build whose image for this GPU is JIT-compiled from older PTX (TORCH_CUDA_ARCH_LIST=
// "7.5+PTX" run on sm_90) passes check_tensor_cores, so ask which PTX the image came from
// (once per device: every device may load another image) before a trap ends the CUDA context.
template <typename Kernel>
void check_compiled_with_tensor_cores(Kernel* kernel) {
  // 0: not asked yet (static storage starts zeroed). Two threads that both ask store the same
  // answer, so a relaxed atomic is enough and a launch takes no lock.
  static std::atomic<int> ptx_of_device[C10_COMPILE_TIME_MAX_GPUS];
  auto& cached = ptx_of_device[c10::cuda::current_device()];
  int ptx = cached.load(std::memory_order_relaxed);
  if (ptx == 0) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    ptx = attr.ptxVersion;
    cached.store(ptx, std::memory_order_relaxed);
  }
  TORCH_CHECK(ptx >= 80, "ptl_fused: this build's fused implicit-GEMM kernel runs on ",
              "this GPU from code for compute_", ptx, ", which has no tensor-core path ",
              "(it needs 8.0 or newer); rebuild for this GPU, e.g. TORCH_CUDA_ARCH_LIST=\"9.0\" ",
              "pip install --no-build-isolation -e .");
}

template <typename T, int G, bool kTapMajor, typename A>
void launch(const Params<T, A>& p) {
  const int64_t blocks_m = (p.M + BM - 1) / BM, blocks_n = (p.Cout + BN - 1) / BN;
  TORCH_CHECK(blocks_m <= std::numeric_limits<int32_t>::max(), "ptl_fused: B*Ho*Wo = ", p.M,
              " is too large for the fused kernel");
  TORCH_CHECK(blocks_n <= 65535, "ptl_fused: Cout = ", p.Cout,
              " is too large for the fused kernel");
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(blocks_n));
  auto stream = at::cuda::getCurrentCUDAStream();
  if constexpr (kTensorCores<T>) {
    check_compiled_with_tensor_cores(fused_cell_kernel<T, G, TensorCoreTile<T, G>, kTapMajor>);
    fused_cell_kernel<T, G, TensorCoreTile<T, G>, kTapMajor><<<grid, kThreads, 0, stream>>>(p);
  } else {
    fused_cell_kernel<T, G, ScalarTile<T, G>, kTapMajor><<<grid, kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int G, typename MakeParams>
void launch(const GemmArgs& g, MakeParams make_params) {
  with_gather_order<T>(g, make_params, [](auto tap_major, const auto& p) {
    launch<T, G, decltype(tap_major)::value>(p);
  });
}

}  // namespace

void fused_fwd_cuda(const GemmArgs& g, const FwdEpilogueArgs& a) {
  const c10::cuda::CUDAGuard guard(g.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.x.scalar_type(), "bconv_cell_fused_fwd_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        if constexpr (kTensorCores<scalar_t>) check_tensor_cores(g.x);
        launch<scalar_t, 4>(g, [&](const Tensor& w) { return fwd_params<scalar_t, A>(g, w, a); });
      });
}

void fused_eval_cuda(const GemmArgs& g, const EvalEpilogueArgs& a) {
  const c10::cuda::CUDAGuard guard(g.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.x.scalar_type(), "bconv_cell_fused_eval_cuda", [&] {
        using A = at::opmath_type<scalar_t>;
        if constexpr (kTensorCores<scalar_t>) check_tensor_cores(g.x);
        launch<scalar_t, 3>(g, [&](const Tensor& w) { return eval_params<scalar_t, A>(g, w, a); });
      });
}

}  // namespace ptl_fused

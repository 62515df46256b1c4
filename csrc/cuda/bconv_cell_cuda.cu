// The CUDA epilogues of the BConv-Cell (kernels: epilogue_kernels.cuh) and the registration
// of the CUDA kernels: epilogues + the fused implicit-GEMM forward (fused_gemm.cu).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "epilogue_kernels.cuh"
#include "fused_gemm.h"

namespace ptl_fused {
namespace {

constexpr int kThreads = 256;

// Grid-stride kernels on the current stream, at most 32 blocks per SM.
struct CudaLaunch {
  template <typename... KArgs, typename... Args>
  static void launch(void (*kernel)(KArgs...), int64_t work, Args&&... args) {
    const int64_t max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 32;
    const auto blocks =
        static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
    kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void fwd_epilogue_cuda(const FwdEpilogueArgs& a) {
  const c10::cuda::CUDAGuard guard(a.z.device());
  epilogue::run_fwd_epilogue<CudaLaunch>(a);
}

void bwd_epilogue_cuda(const BwdEpilogueArgs& a) {
  const c10::cuda::CUDAGuard guard(a.gates.device());
  epilogue::run_bwd_epilogue<CudaLaunch>(a);
}

void eval_epilogue_cuda(const EvalEpilogueArgs& a) {
  const c10::cuda::CUDAGuard guard(a.z.device());
  epilogue::run_eval_epilogue<CudaLaunch>(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(ptl_fused, CUDA, m) {
  register_bconv_kernels<fwd_epilogue_cuda, bwd_epilogue_cuda, eval_epilogue_cuda, fused_fwd_cuda,
                         fused_eval_cuda>(m);
}

}  // namespace ptl_fused

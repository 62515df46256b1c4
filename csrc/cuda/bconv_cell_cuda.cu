// CUDA epilogues of the BConv-Cell: one elementwise kernel each for forward and backward,
// on the current stream, no host synchronisation (h_alpha is read from device memory).
// Math: csrc/cell_math.h; reference: python_ref/bconv_cell.py.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../bconv_cell.h"
#include "../cell_math.h"

namespace ptl_fused {
namespace {

// Point p of the (B, C, Ho, Wo) state in NCHW or NHWC order -> offset of gate 0 in the
// (B, gates*C, Ho, Wo) gate tensor of the same layout (4 gates; 3 in eval); gate k is
// k * gate_stride further.
struct GateIndex {
  int64_t c, s, gates;
  bool channels_last;
  __device__ int64_t base(int64_t p) const {
    if (channels_last) return (p / c) * gates * c + p % c;
    const int64_t bc = p / s;
    return ((bc / c) * gates * c + bc % c) * s + p % s;
  }
  __host__ __device__ int64_t gate_stride() const { return channels_last ? c : c * s; }
  // One sample's block of the gate tensor: v2's eval gate map has this layout.
  __host__ __device__ int64_t sample() const { return gates * c * s; }
};

GateIndex gate_index(const Tensor& state, bool channels_last, int64_t gates = 4) {
  return {state.size(1), state.size(2) * state.size(3), gates, channels_last};
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  const int64_t max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 32;
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks));
}

template <typename scalar_t, typename acc_t>
__global__ void fwd_kernel(int64_t n, GateIndex gi, scalar_t* __restrict__ z,
                           const acc_t* __restrict__ cp, const acc_t* __restrict__ hp,
                           const acc_t* __restrict__ alpha, scalar_t* __restrict__ y,
                           acc_t* __restrict__ cn, acc_t* __restrict__ hn) {
  const int64_t gs = gi.gate_stride();
  const acc_t a = hp ? *alpha : acc_t(0);
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    scalar_t* zp = z + gi.base(p);
    const auto c = cell_forward<acc_t>(zp[0], zp[gs], zp[2 * gs], zp[3 * gs], cp[p]);
    zp[0] = c.i;
    zp[gs] = c.f;
    zp[2 * gs] = c.o;
    zp[3 * gs] = c.g;
    cn[p] = c.c;
    const scalar_t yv = static_cast<scalar_t>(c.y);
    y[p] = yv;
    if (hp) hn[p] = hp[p] + a * (static_cast<acc_t>(yv) - hp[p]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_kernel(int64_t n, GateIndex gi, const scalar_t* __restrict__ gates,
                           const acc_t* __restrict__ cp, const scalar_t* __restrict__ gy,
                           const acc_t* __restrict__ gc, const acc_t* __restrict__ gh,
                           const acc_t* __restrict__ alpha, scalar_t* __restrict__ gz,
                           acc_t* __restrict__ gcp, acc_t* __restrict__ ghp) {
  const int64_t gs = gi.gate_stride();
  const acc_t a = alpha ? *alpha : acc_t(0);
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g0 = gi.base(p);
    const scalar_t* gp = gates + g0;
    const acc_t dh = gh ? gh[p] : acc_t(0);
    const acc_t dy = (gy ? static_cast<acc_t>(gy[p]) : acc_t(0)) + a * dh;
    const auto d = cell_backward<acc_t>(gp[0], gp[gs], gp[2 * gs], gp[3 * gs], cp[p], dy,
                                        gc ? gc[p] : acc_t(0));
    gz[g0] = d.dzi;
    gz[g0 + gs] = d.dzf;
    gz[g0 + 2 * gs] = d.dzo;
    gz[g0 + 3 * gs] = d.dzg;
    gcp[p] = d.dc_prev;
    if (ghp) ghp[p] = (acc_t(1) - a) * dh;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void eval_kernel(int64_t n, GateIndex gi, const scalar_t* __restrict__ z,
                            const scalar_t* __restrict__ map, scalar_t* __restrict__ y) {
  const int64_t gs = gi.gate_stride(), sample = gi.sample();
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < n;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g0 = gi.base(p);
    // The map is added in the compute dtype, as the reference adds it to the conv output.
    auto pre = [&](int64_t q) {
      const scalar_t v =
          map ? static_cast<scalar_t>(z[g0 + q * gs] + map[g0 % sample + q * gs]) : z[g0 + q * gs];
      return static_cast<acc_t>(v);
    };
    y[p] = static_cast<scalar_t>(cell_eval<acc_t>(pre(0), pre(1), pre(2)));
  }
}

void fwd_epilogue_cuda(const FwdEpilogueArgs& a) {
  const c10::cuda::CUDAGuard guard(a.z.device());
  const int64_t n = a.c_prev.numel();
  const auto gi = gate_index(a.c_prev, a.channels_last);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.z.scalar_type(), "bconv_cell_fwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        fwd_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
            n, gi, a.z.data_ptr<scalar_t>(), a.c_prev.data_ptr<acc_t>(),
            ptr_or_null<acc_t>(a.h_prev), ptr_or_null<acc_t>(a.h_alpha), a.y.data_ptr<scalar_t>(),
            a.c_new.data_ptr<acc_t>(), ptr_or_null<acc_t>(a.h_new));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void bwd_epilogue_cuda(const BwdEpilogueArgs& a) {
  const c10::cuda::CUDAGuard guard(a.gates.device());
  const int64_t n = a.c_prev.numel();
  const auto gi = gate_index(a.c_prev, a.channels_last);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.gates.scalar_type(), "bconv_cell_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        bwd_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
            n, gi, a.gates.data_ptr<scalar_t>(), a.c_prev.data_ptr<acc_t>(),
            ptr_or_null<scalar_t>(a.grad_y), ptr_or_null<acc_t>(a.grad_c_new),
            ptr_or_null<acc_t>(a.grad_h_new), ptr_or_null<acc_t>(a.h_alpha),
            a.grad_z.data_ptr<scalar_t>(), a.grad_c_prev.data_ptr<acc_t>(),
            ptr_or_null<acc_t>(a.grad_h_prev));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void eval_epilogue_cuda(const EvalEpilogueArgs& a) {
  const c10::cuda::CUDAGuard guard(a.z.device());
  const int64_t n = a.y.numel();
  const auto gi = gate_index(a.y, a.channels_last, 3);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.z.scalar_type(), "bconv_cell_eval_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        eval_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
            n, gi, a.z.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.gate_map),
            a.y.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(ptl_fused, CUDA, m) {
  register_bconv_kernels<fwd_epilogue_cuda, bwd_epilogue_cuda, eval_epilogue_cuda>(m);
}

}  // namespace ptl_fused

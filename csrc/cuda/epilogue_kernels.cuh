// The CUDA epilogue kernels of the BConv-Cell (after the ATen convolution): one
// elementwise kernel each for forward, backward and eval, vectorised, h_alpha read from
// device memory (no host synchronisation). The host side is templated on a Launcher,
// Launcher::launch(kernel, work_items, args...): bconv_cell_cuda.cu launches on the current
// stream; tests/emulation/ runs the same kernels on the CPU (cuda_emulation.h), so keep
// everything here to what that stand-in provides.
// Math: csrc/cell_math.h; reference: python_ref/bconv_cell.py.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../bconv_cell.h"
#include "../cell_math.h"
#include "vec.cuh"

namespace ptl_fused::epilogue {

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

inline GateIndex gate_index(const Tensor& state, bool channels_last, int64_t gates = 4) {
  return {state.size(1), state.size(2) * state.size(3), gates, channels_last};
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Each thread handles V consecutive points of one row (NCHW: one (b, c) plane; NHWC: one
// pixel), whose gate slices are then V consecutive elements too, so every load and store is
// one V-wide access (16 bytes of fp32 state). V = 1 where a row length or a pointer does
// not allow it (see vec_width); vectors are Vec (vec.cuh).

#define PTL_GRID_STRIDE_LOOP(q, count)                                          \
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < (count); \
       q += int64_t(gridDim.x) * blockDim.x)

template <typename scalar_t, typename acc_t, int V>
__global__ void fwd_kernel(int64_t n, GateIndex gi, scalar_t* __restrict__ z, bool save_gates,
                           const acc_t* __restrict__ cp, const acc_t* __restrict__ hp,
                           const acc_t* __restrict__ alpha, scalar_t* __restrict__ y,
                           acc_t* __restrict__ cn, acc_t* __restrict__ hn) {
  const int64_t gs = gi.gate_stride();
  const acc_t a = hp ? *alpha : acc_t(0);
  PTL_GRID_STRIDE_LOOP(q, n / V) {
    const int64_t p = q * V;
    scalar_t* zp = z + gi.base(p);
    auto zi = load_vec<V>(zp), zf = load_vec<V>(zp + gs), zo = load_vec<V>(zp + 2 * gs),
         zg = load_vec<V>(zp + 3 * gs);
    const auto c0 = load_vec<V>(cp + p);
    Vec<acc_t, V> c1, h0, h1;
    Vec<scalar_t, V> yv;
    if (hp) h0 = load_vec<V>(hp + p);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const auto c = cell_forward<acc_t>(zi.v[j], zf.v[j], zo.v[j], zg.v[j], c0.v[j]);
      zi.v[j] = c.i;
      zf.v[j] = c.f;
      zo.v[j] = c.o;
      zg.v[j] = c.g;
      c1.v[j] = c.c;
      yv.v[j] = static_cast<scalar_t>(c.y);
      if (hp) h1.v[j] = h0.v[j] + a * (static_cast<acc_t>(yv.v[j]) - h0.v[j]);
    }
    if (save_gates) {  // unsaved, z is dropped: its 4 stores are most of the kernel's writes
      store_vec(zp, zi);
      store_vec(zp + gs, zf);
      store_vec(zp + 2 * gs, zo);
      store_vec(zp + 3 * gs, zg);
    }
    store_vec(cn + p, c1);
    store_vec(y + p, yv);
    if (hp) store_vec(hn + p, h1);
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void bwd_kernel(int64_t n, GateIndex gi, const scalar_t* __restrict__ gates,
                           const acc_t* __restrict__ cp, const scalar_t* __restrict__ gy,
                           const acc_t* __restrict__ gc, const acc_t* __restrict__ gh,
                           const acc_t* __restrict__ alpha, scalar_t* __restrict__ gz,
                           acc_t* __restrict__ gcp, acc_t* __restrict__ ghp) {
  const int64_t gs = gi.gate_stride();
  const acc_t a = alpha ? *alpha : acc_t(0);
  PTL_GRID_STRIDE_LOOP(q, n / V) {
    const int64_t p = q * V, g0 = gi.base(p);
    const auto i = load_vec<V>(gates + g0), f = load_vec<V>(gates + g0 + gs),
               o = load_vec<V>(gates + g0 + 2 * gs), g = load_vec<V>(gates + g0 + 3 * gs);
    const auto c0 = load_vec<V>(cp + p);
    Vec<scalar_t, V> dy_in, dzi, dzf, dzo, dzg;
    Vec<acc_t, V> dc_in, dh, dcp, dhp;
    if (gy) dy_in = load_vec<V>(gy + p);
    if (gc) dc_in = load_vec<V>(gc + p);
    if (gh) dh = load_vec<V>(gh + p);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t dhj = gh ? dh.v[j] : acc_t(0);
      const acc_t dy = (gy ? static_cast<acc_t>(dy_in.v[j]) : acc_t(0)) + a * dhj;
      const auto d = cell_backward<acc_t>(i.v[j], f.v[j], o.v[j], g.v[j], c0.v[j], dy,
                                          gc ? dc_in.v[j] : acc_t(0), gy || gh);
      dzi.v[j] = d.dzi;
      dzf.v[j] = d.dzf;
      dzo.v[j] = d.dzo;
      dzg.v[j] = d.dzg;
      dcp.v[j] = d.dc_prev;
      dhp.v[j] = (acc_t(1) - a) * dhj;
    }
    store_vec(gz + g0, dzi);
    store_vec(gz + g0 + gs, dzf);
    store_vec(gz + g0 + 2 * gs, dzo);
    store_vec(gz + g0 + 3 * gs, dzg);
    store_vec(gcp + p, dcp);
    if (ghp) store_vec(ghp + p, dhp);
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void eval_kernel(int64_t n, GateIndex gi, const scalar_t* __restrict__ z,
                            const scalar_t* __restrict__ map, scalar_t* __restrict__ y) {
  const int64_t gs = gi.gate_stride(), sample = gi.sample();
  PTL_GRID_STRIDE_LOOP(q, n / V) {
    const int64_t p = q * V, g0 = gi.base(p);
    const auto zi = load_vec<V>(z + g0), zo = load_vec<V>(z + g0 + gs),
               zg = load_vec<V>(z + g0 + 2 * gs);
    Vec<scalar_t, V> mi{}, mo{}, mg{}, yv;  // the map's stay zero (unread) without one
    if (map) {
      const scalar_t* mp = map + g0 % sample;
      mi = load_vec<V>(mp);
      mo = load_vec<V>(mp + gs);
      mg = load_vec<V>(mp + 2 * gs);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      // The map is added in the compute dtype, as the reference adds it to the conv output.
      auto pre = [&](scalar_t zv, scalar_t mv) {
        return static_cast<acc_t>(map ? static_cast<scalar_t>(zv + mv) : zv);
      };
      yv.v[j] = static_cast<scalar_t>(
          cell_eval<acc_t>(pre(zi.v[j], mi.v[j]), pre(zo.v[j], mo.v[j]), pre(zg.v[j], mg.v[j])));
    }
    store_vec(y + p, yv);
  }
}

// The widest V (16-byte state accesses) when every row is a multiple of it and every tensor
// starts aligned for it; otherwise 1. Rows: the spatial plane (NCHW) or the channels (NHWC).
template <typename scalar_t, typename F>
void with_vec_width(const GateIndex& gi, std::initializer_list<Tensor> tensors, F launch) {
  constexpr int kWide = sizeof(scalar_t) == 8 ? 2 : 4;
  const int64_t row = gi.channels_last ? gi.c : gi.s;
  bool ok = row % kWide == 0;
  for (const Tensor& t : tensors) {
    if (t.defined()) {
      ok = ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % (t.element_size() * kWide) == 0;
    }
  }
  if (ok) {
    launch(std::integral_constant<int, kWide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

template <typename Launcher>
void run_fwd_epilogue(const FwdEpilogueArgs& a) {
  const int64_t n = a.c_prev.numel();
  const auto gi = gate_index(a.c_prev, a.channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.z.scalar_type(), "bconv_cell_fwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_vec_width<scalar_t>(
            gi, {a.z, a.c_prev, a.h_prev, a.y, a.c_new, a.h_new}, [&](auto vec) {
              constexpr int V = decltype(vec)::value;
              Launcher::launch(fwd_kernel<scalar_t, acc_t, V>, n / V, n, gi,
                               a.z.data_ptr<scalar_t>(), a.save_gates, a.c_prev.data_ptr<acc_t>(),
                               ptr_or_null<acc_t>(a.h_prev), ptr_or_null<acc_t>(a.h_alpha),
                               a.y.data_ptr<scalar_t>(), a.c_new.data_ptr<acc_t>(),
                               ptr_or_null<acc_t>(a.h_new));
            });
      });
}

template <typename Launcher>
void run_bwd_epilogue(const BwdEpilogueArgs& a) {
  const int64_t n = a.c_prev.numel();
  const auto gi = gate_index(a.c_prev, a.channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.gates.scalar_type(), "bconv_cell_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_vec_width<scalar_t>(
            gi,
            {a.gates, a.c_prev, a.grad_y, a.grad_c_new, a.grad_h_new, a.grad_z, a.grad_c_prev,
             a.grad_h_prev},
            [&](auto vec) {
              constexpr int V = decltype(vec)::value;
              Launcher::launch(bwd_kernel<scalar_t, acc_t, V>, n / V, n, gi,
                               a.gates.data_ptr<scalar_t>(), a.c_prev.data_ptr<acc_t>(),
                               ptr_or_null<scalar_t>(a.grad_y), ptr_or_null<acc_t>(a.grad_c_new),
                               ptr_or_null<acc_t>(a.grad_h_new), ptr_or_null<acc_t>(a.h_alpha),
                               a.grad_z.data_ptr<scalar_t>(), a.grad_c_prev.data_ptr<acc_t>(),
                               ptr_or_null<acc_t>(a.grad_h_prev));
            });
      });
}

template <typename Launcher>
void run_eval_epilogue(const EvalEpilogueArgs& a) {
  const int64_t n = a.y.numel();
  const auto gi = gate_index(a.y, a.channels_last, 3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, a.z.scalar_type(), "bconv_cell_eval_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        with_vec_width<scalar_t>(gi, {a.z, a.gate_map, a.y}, [&](auto vec) {
          constexpr int V = decltype(vec)::value;
          Launcher::launch(eval_kernel<scalar_t, acc_t, V>, n / V, n, gi, a.z.data_ptr<scalar_t>(),
                           ptr_or_null<scalar_t>(a.gate_map), a.y.data_ptr<scalar_t>());
        });
      });
}

}  // namespace ptl_fused::epilogue

// CPU epilogues of the BConv-Cell: one parallel pass each for forward and backward.
// Math: csrc/cell_math.h; reference: python_ref/bconv_cell.py.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "../bconv_cell.h"
#include "../cell_math.h"

namespace ptl_fused {
namespace {

// Walks the (B, C, Ho, Wo) points as rows of a contiguous inner run: NCHW rows are (b, c)
// with the spatial run inside; NHWC rows are (b, h, w) with the channel run inside. The gate
// tensor (B, 4C, Ho, Wo) has the same rows, its four gates `gate_stride` apart.
struct Rows {
  int64_t rows, inner, gate_stride;
  int64_t c;
  bool channels_last;

  Rows(const Tensor& state, bool cl) : channels_last(cl) {
    const int64_t b = state.size(0), s = state.size(2) * state.size(3);
    c = state.size(1);
    rows = cl ? b * s : b * c;
    inner = cl ? c : s;
    gate_stride = cl ? c : c * s;
  }
  int64_t gate_base(int64_t r) const {
    return channels_last ? r * 4 * c : ((r / c) * 4 * c + r % c) * inner;
  }
  template <typename F>
  void parallel(F&& f) const {
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(inner, 1));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) f(r);
    });
  }
};

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename scalar_t>
void fwd_typed(const FwdEpilogueArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Rows rows(a.c_prev, a.channels_last);
  scalar_t* z = a.z.data_ptr<scalar_t>();
  scalar_t* y = a.y.data_ptr<scalar_t>();
  const acc_t* cp = a.c_prev.data_ptr<acc_t>();
  acc_t* cn = a.c_new.data_ptr<acc_t>();
  const acc_t* hp = ptr_or_null<acc_t>(a.h_prev);
  acc_t* hn = ptr_or_null<acc_t>(a.h_new);
  const acc_t alpha = hp ? a.h_alpha.item<acc_t>() : acc_t(0);
  const int64_t n = rows.inner, gs = rows.gate_stride;
  rows.parallel([&](int64_t r) {
    scalar_t* zr = z + rows.gate_base(r);
    const int64_t s = r * n;
    for (int64_t j = 0; j < n; ++j) {
      const auto p = cell_forward<acc_t>(zr[j], zr[j + gs], zr[j + 2 * gs], zr[j + 3 * gs],
                                         cp[s + j]);
      zr[j] = p.i;
      zr[j + gs] = p.f;
      zr[j + 2 * gs] = p.o;
      zr[j + 3 * gs] = p.g;
      cn[s + j] = p.c;
      const scalar_t yv = static_cast<scalar_t>(p.y);
      y[s + j] = yv;
      if (hp) hn[s + j] = hp[s + j] + alpha * (static_cast<acc_t>(yv) - hp[s + j]);
    }
  });
}

template <typename scalar_t>
void bwd_typed(const BwdEpilogueArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Rows rows(a.c_prev, a.channels_last);
  const scalar_t* gates = a.gates.data_ptr<scalar_t>();
  scalar_t* gz = a.grad_z.data_ptr<scalar_t>();
  const acc_t* cp = a.c_prev.data_ptr<acc_t>();
  const scalar_t* gy = ptr_or_null<scalar_t>(a.grad_y);
  const acc_t* gc = ptr_or_null<acc_t>(a.grad_c_new);
  const acc_t* gh = ptr_or_null<acc_t>(a.grad_h_new);
  acc_t* gcp = a.grad_c_prev.data_ptr<acc_t>();
  acc_t* ghp = ptr_or_null<acc_t>(a.grad_h_prev);
  const acc_t alpha = a.h_alpha.defined() ? a.h_alpha.item<acc_t>() : acc_t(0);
  const int64_t n = rows.inner, gs = rows.gate_stride;
  rows.parallel([&](int64_t r) {
    const int64_t g0 = rows.gate_base(r);
    const scalar_t* gr = gates + g0;
    scalar_t* gzr = gz + g0;
    const int64_t s = r * n;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t dh = gh ? gh[s + j] : acc_t(0);
      const acc_t dy = (gy ? static_cast<acc_t>(gy[s + j]) : acc_t(0)) + alpha * dh;
      const auto d = cell_backward<acc_t>(gr[j], gr[j + gs], gr[j + 2 * gs], gr[j + 3 * gs],
                                          cp[s + j], dy, gc ? gc[s + j] : acc_t(0));
      gzr[j] = d.dzi;
      gzr[j + gs] = d.dzf;
      gzr[j + 2 * gs] = d.dzo;
      gzr[j + 3 * gs] = d.dzg;
      gcp[s + j] = d.dc_prev;
      if (ghp) ghp[s + j] = (acc_t(1) - alpha) * dh;
    }
  });
}

void fwd_epilogue_cpu(const FwdEpilogueArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.z.scalar_type(),
                                  "bconv_cell_fwd_cpu", [&] { fwd_typed<scalar_t>(a); });
}

void bwd_epilogue_cpu(const BwdEpilogueArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.gates.scalar_type(),
                                  "bconv_cell_bwd_cpu", [&] { bwd_typed<scalar_t>(a); });
}

}  // namespace

TORCH_LIBRARY_IMPL(ptl_fused, CPU, m) {
  register_bconv_kernels<fwd_epilogue_cpu, bwd_epilogue_cpu>(m);
}

}  // namespace ptl_fused

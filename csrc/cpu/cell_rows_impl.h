// The row loops themselves; included by one .cpp per instruction set, which defines
// CPU_CAPABILITY (the namespace, as in ATen) before any ATen header.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <type_traits>

#include "../cell_math.h"
#include "cell_rows.h"

namespace ptl_fused::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
T* cast(void* p) {
  return static_cast<T*>(p);
}
template <typename T>
const T* cast(const void* p) {
  return static_cast<const T*>(p);
}

template <typename scalar_t>
void fwd_typed(const FwdRowsArgs& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* z = cast<scalar_t>(a.z);
  scalar_t* y = cast<scalar_t>(a.y);
  const acc_t* cp = cast<acc_t>(a.c_prev);
  acc_t* cn = cast<acc_t>(a.c_new);
  const acc_t* hp = cast<acc_t>(a.h_prev);
  acc_t* hn = cast<acc_t>(a.h_new);
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  const int64_t n = a.geo.inner, gs = a.geo.gate_stride;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* zr = z + a.geo.gate_base(r);
    const int64_t s = r * n;
    int64_t j = 0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {  // float/double: whole vectors first
      using Vec = at::vec::Vectorized<acc_t>;
      for (; j + Vec::size() <= n; j += Vec::size()) {
        const auto p = cell_forward<Vec>(Vec::loadu(zr + j), Vec::loadu(zr + j + gs),
                                         Vec::loadu(zr + j + 2 * gs), Vec::loadu(zr + j + 3 * gs),
                                         Vec::loadu(cp + s + j));
        p.i.store(zr + j);
        p.f.store(zr + j + gs);
        p.o.store(zr + j + 2 * gs);
        p.g.store(zr + j + 3 * gs);
        p.c.store(cn + s + j);
        p.y.store(y + s + j);
        if (hp) {
          const Vec h = Vec::loadu(hp + s + j);
          (h + Vec(alpha) * (p.y - h)).store(hn + s + j);
        }
      }
    }
    for (; j < n; ++j) {
      const auto p =
          cell_forward<acc_t>(zr[j], zr[j + gs], zr[j + 2 * gs], zr[j + 3 * gs], cp[s + j]);
      zr[j] = p.i;
      zr[j + gs] = p.f;
      zr[j + 2 * gs] = p.o;
      zr[j + 3 * gs] = p.g;
      cn[s + j] = p.c;
      const scalar_t yv = static_cast<scalar_t>(p.y);
      y[s + j] = yv;
      if (hp) hn[s + j] = hp[s + j] + alpha * (static_cast<acc_t>(yv) - hp[s + j]);
    }
  }
}

template <typename scalar_t>
void bwd_typed(const BwdRowsArgs& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gates = cast<scalar_t>(a.gates);
  scalar_t* gz = cast<scalar_t>(a.grad_z);
  const acc_t* cp = cast<acc_t>(a.c_prev);
  const scalar_t* gy = cast<scalar_t>(a.grad_y);
  const acc_t* gc = cast<acc_t>(a.grad_c_new);
  const acc_t* gh = cast<acc_t>(a.grad_h_new);
  acc_t* gcp = cast<acc_t>(a.grad_c_prev);
  acc_t* ghp = cast<acc_t>(a.grad_h_prev);
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  const bool has_dy = gy || gh;  // does any gradient reach y?
  const int64_t n = a.geo.inner, gs = a.geo.gate_stride;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g0 = a.geo.gate_base(r);
    const scalar_t* gr = gates + g0;
    scalar_t* gzr = gz + g0;
    const int64_t s = r * n;
    int64_t j = 0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      using Vec = at::vec::Vectorized<acc_t>;
      const Vec zero(0), va(alpha);
      for (; j + Vec::size() <= n; j += Vec::size()) {
        const Vec dh = gh ? Vec::loadu(gh + s + j) : zero;
        const Vec dy = (gy ? Vec::loadu(gy + s + j) : zero) + va * dh;
        const auto d = cell_backward<Vec>(Vec::loadu(gr + j), Vec::loadu(gr + j + gs),
                                          Vec::loadu(gr + j + 2 * gs), Vec::loadu(gr + j + 3 * gs),
                                          Vec::loadu(cp + s + j), dy,
                                          gc ? Vec::loadu(gc + s + j) : zero, has_dy);
        d.dzi.store(gzr + j);
        d.dzf.store(gzr + j + gs);
        d.dzo.store(gzr + j + 2 * gs);
        d.dzg.store(gzr + j + 3 * gs);
        d.dc_prev.store(gcp + s + j);
        if (ghp) ((Vec(1) - va) * dh).store(ghp + s + j);
      }
    }
    for (; j < n; ++j) {
      const acc_t dh = gh ? gh[s + j] : acc_t(0);
      const acc_t dy = (gy ? static_cast<acc_t>(gy[s + j]) : acc_t(0)) + alpha * dh;
      const auto d = cell_backward<acc_t>(gr[j], gr[j + gs], gr[j + 2 * gs], gr[j + 3 * gs],
                                          cp[s + j], dy, gc ? gc[s + j] : acc_t(0), has_dy);
      gzr[j] = d.dzi;
      gzr[j + gs] = d.dzf;
      gzr[j + 2 * gs] = d.dzo;
      gzr[j + 3 * gs] = d.dzg;
      gcp[s + j] = d.dc_prev;
      if (ghp) ghp[s + j] = (acc_t(1) - alpha) * dh;
    }
  }
}

template <typename scalar_t>
void eval_typed(const EvalRowsArgs& a, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z = cast<scalar_t>(a.z);
  const scalar_t* map = cast<scalar_t>(a.gate_map);
  scalar_t* y = cast<scalar_t>(a.y);
  const int64_t n = a.geo.inner, gs = a.geo.gate_stride;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g0 = a.geo.gate_base(r);
    const scalar_t* zr = z + g0;
    const scalar_t* mr = map ? map + g0 % a.sample : nullptr;
    scalar_t* yr = y + r * n;
    int64_t j = 0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      using Vec = at::vec::Vectorized<acc_t>;
      for (; j + Vec::size() <= n; j += Vec::size()) {
        Vec zi = Vec::loadu(zr + j), zo = Vec::loadu(zr + j + gs), zg = Vec::loadu(zr + j + 2 * gs);
        if (mr) {
          zi += Vec::loadu(mr + j);
          zo += Vec::loadu(mr + j + gs);
          zg += Vec::loadu(mr + j + 2 * gs);
        }
        cell_eval<Vec>(zi, zo, zg).store(yr + j);
      }
    }
    for (; j < n; ++j) {
      // The map is added in the compute dtype, as the reference adds it to the conv output.
      auto pre = [&](int64_t q) {
        const scalar_t v =
            mr ? static_cast<scalar_t>(zr[j + q * gs] + mr[j + q * gs]) : zr[j + q * gs];
        return static_cast<acc_t>(v);
      };
      yr[j] = static_cast<scalar_t>(cell_eval<acc_t>(pre(0), pre(1), pre(2)));
    }
  }
}

}  // namespace

namespace {

// Calls fn(T{}) for the compute dtype T of `dtype`: one switch for every row loop.
template <typename Fn>
void by_dtype(c10::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case c10::kFloat:
      return fn(float{});
    case c10::kDouble:
      return fn(double{});
    case c10::kBFloat16:
      return fn(c10::BFloat16{});
    case c10::kHalf:
      return fn(c10::Half{});
    default:
      unsupported_dtype(dtype);
  }
}

}  // namespace

void fwd_rows(c10::ScalarType dtype, const FwdRowsArgs& a, int64_t r0, int64_t r1) {
  by_dtype(dtype, [&](auto t) { fwd_typed<decltype(t)>(a, r0, r1); });
}

void bwd_rows(c10::ScalarType dtype, const BwdRowsArgs& a, int64_t r0, int64_t r1) {
  by_dtype(dtype, [&](auto t) { bwd_typed<decltype(t)>(a, r0, r1); });
}

void eval_rows(c10::ScalarType dtype, const EvalRowsArgs& a, int64_t r0, int64_t r1) {
  by_dtype(dtype, [&](auto t) { eval_typed<decltype(t)>(a, r0, r1); });
}

}  // namespace ptl_fused::cpu::CPU_CAPABILITY

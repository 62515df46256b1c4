// The row loops themselves; included by one .cpp per instruction set, which defines
// CPU_CAPABILITY (the namespace, as in ATen) before any ATen header.
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <tuple>
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

// bf16/fp16 rows: one Vectorized<scalar_t> of the compute dtype holds two float vectors (kW
// elements), which the cell math runs on, as the scalar loop converts each element.
using FVec = at::vec::Vectorized<float>;
constexpr int64_t kW = 2 * FVec::size();

template <typename T>
void load2(const T* p, FVec (&out)[2]) {
  static_assert(at::vec::Vectorized<T>::size() == kW);
  std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
}
template <typename T>
void store2(T* p, const FVec (&v)[2]) {
  at::vec::convert_from_float<T>(v[0], v[1]).store(p);
}
// v rounded to T and back, as the scalar loop's static_cast<T> of a float.
template <typename T>
void round_to(FVec (&v)[2]) {
  std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[0], v[1]));
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
    } else {
      for (; j + kW <= n; j += kW) {
        FVec zi[2], zf[2], zo[2], zg[2], yv[2];
        load2(zr + j, zi);
        load2(zr + j + gs, zf);
        load2(zr + j + 2 * gs, zo);
        load2(zr + j + 3 * gs, zg);
        for (int k = 0; k < 2; ++k) {
          const int64_t o = s + j + k * FVec::size();
          const auto p = cell_forward<FVec>(zi[k], zf[k], zo[k], zg[k], FVec::loadu(cp + o));
          zi[k] = p.i, zf[k] = p.f, zo[k] = p.o, zg[k] = p.g, yv[k] = p.y;
          p.c.store(cn + o);
        }
        store2(zr + j, zi);
        store2(zr + j + gs, zf);
        store2(zr + j + 2 * gs, zo);
        store2(zr + j + 3 * gs, zg);
        store2(y + s + j, yv);
        if (hp) {
          round_to<scalar_t>(yv);  // H aggregates y as stored
          for (int k = 0; k < 2; ++k) {
            const int64_t o = s + j + k * FVec::size();
            const FVec h = FVec::loadu(hp + o);
            (h + FVec(alpha) * (yv[k] - h)).store(hn + o);
          }
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
    } else {
      const FVec zero(0), va(alpha);
      for (; j + kW <= n; j += kW) {
        FVec gi[2], gf[2], go[2], gg[2], dyv[2] = {zero, zero};
        load2(gr + j, gi);
        load2(gr + j + gs, gf);
        load2(gr + j + 2 * gs, go);
        load2(gr + j + 3 * gs, gg);
        if (gy) load2(gy + s + j, dyv);
        for (int k = 0; k < 2; ++k) {
          const int64_t o = s + j + k * FVec::size();
          const FVec dh = gh ? FVec::loadu(gh + o) : zero;
          const auto d =
              cell_backward<FVec>(gi[k], gf[k], go[k], gg[k], FVec::loadu(cp + o), dyv[k] + va * dh,
                                  gc ? FVec::loadu(gc + o) : zero, has_dy);
          gi[k] = d.dzi, gf[k] = d.dzf, go[k] = d.dzo, gg[k] = d.dzg;
          d.dc_prev.store(gcp + o);
          if (ghp) ((FVec(1) - va) * dh).store(ghp + o);
        }
        store2(gzr + j, gi);
        store2(gzr + j + gs, gf);
        store2(gzr + j + 2 * gs, go);
        store2(gzr + j + 3 * gs, gg);
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
    } else {
      for (; j + kW <= n; j += kW) {
        FVec zi[2], zo[2], zg[2], yv[2];
        load2(zr + j, zi);
        load2(zr + j + gs, zo);
        load2(zr + j + 2 * gs, zg);
        if (mr) {  // added in the compute dtype, as the scalar loop
          FVec mi[2], mo[2], mg[2];
          load2(mr + j, mi);
          load2(mr + j + gs, mo);
          load2(mr + j + 2 * gs, mg);
          for (int k = 0; k < 2; ++k) zi[k] += mi[k], zo[k] += mo[k], zg[k] += mg[k];
          round_to<scalar_t>(zi);
          round_to<scalar_t>(zo);
          round_to<scalar_t>(zg);
        }
        for (int k = 0; k < 2; ++k) yv[k] = cell_eval<FVec>(zi[k], zo[k], zg[k]);
        store2(yr + j, yv);
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

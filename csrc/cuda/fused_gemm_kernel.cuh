// The fused forward of the BConv-Cell: the gate convolution as an implicit GEMM and the cell
// as its epilogue, in ONE kernel (ops' fused_gemm=True; backend "cuda_igemm"). The kernel;
// its host entry points are in fused_gemm.cu.
//
// A block owns BM output pixels (of M = B·Ho·Wo) x BN channels (of Cout) and accumulates the
// G gates of those channels side by side (G = 4: i, f, o, g; eval: G = 3, i, o, g), so one
// thread holds every gate of a point when the cell runs: the (B, G·Cout, Ho, Wo)
// pre-activations never reach global memory, and training writes the activated gates once,
// for backward. v2's second K source (the recovered X~) is read in place: [x, X~] is never
// concatenated. Any stride, padding, kernel size and input strides (NCHW or channels_last).
//
// fp16/bf16 multiply on tensor cores (WMMA 16x16x16, fp32 accumulation, sm_80+). fp32/fp64
// run the same tiles with scalar FMAs in their own precision: slow, there so that fp64 checks
// the kernel's indexing exactly. Same tiling idea as ptl_fused/triton/forward.py; the math is
// csrc/cell_math.h, shared with the epilogue kernels; reference: python_ref/bconv_cell.py and
// python_ref/eval_path.py.
//
// Also compiled for the CPU by tests/emulation/ against a stand-in for the CUDA built-ins
// (threads, barriers, shared memory, WMMA), so the kernel's own source is tested without a
// GPU; keep everything here to what that stand-in provides.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../bconv_cell.h"
#include "../cell_math.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

// bf16 WMMA needs sm_80; the host refuses older GPUs before launching (check_tensor_cores).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PTL_FUSED_WMMA 1
#endif

namespace ptl_fused::fused_gemm {

constexpr int BM = 64;         // output pixels per block
constexpr int BN = 32;         // channels per block (x G gates)
constexpr int kThreads = 128;  // 4 warps

struct Strides4 {
  int64_t b, c, h, w;
};

inline Strides4 strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Everything a block reads and writes. A = the accumulation and state type (float for
// fp16/bf16/fp32, double for fp64).
template <typename T, typename A>
struct Params {
  const T* x;
  const T* x_rec;  // v2's second source (x's sizes), or null
  Strides4 sx, sxr;
  const T* w;     // (G·Cout, ldw) row-major: gate q of channel n is row q·Cout + n
  const T* bias;  // (G·Cout,) or null
  const A* c_prev;
  const A* h_prev;  // v2, or null
  const A* alpha;   // v2: 1 element on the device (no host sync)
  const T* map;     // eval v2: the (3·Cout, Ho, Wo) gate map (smap.b unused), or null
  Strides4 smap;
  T* y;
  A* c_new;
  A* h_new;
  T* gates;  // training: the activated gates (B, 4·Cout, Ho, Wo)
  Strides4 sg;
  Strides4 ss;  // every state-shaped tensor: y, c_prev, c_new, h_prev, h_new
  int64_t Cout, Ho, Wo, M;
  int Cin, H, W;
  int K;         // im2col columns per source: Cin·k·k
  int ldk, ldw;  // the weight's columns per source (K padded) and row stride (gemm_weight)
  int ks, stride, padding;
  bool channels_last;  // order of the epilogue's points: channels fastest, or pixels
};

struct Pixel {
  int64_t b, oh, ow;
};

template <typename P>
__device__ Pixel pixel_of(const P& p, int64_t m) {
  const int64_t hw = p.Ho * p.Wo;
  return {m / hw, (m % hw) / p.Wo, m % p.Wo};
}

// A thread fills one row of every A tile (its output pixel m = tid % BM) at every
// (kThreads / BM)-th column, and the tiles of one K source follow each other, so the thread
// walks the im2col columns of its pixel in one sequence per source: column k is (input
// channel ch, kernel row dh, kernel column dw), stepped by carrying digits and the element
// offset `at` by adding strides; nothing is divided or multiplied per element (the kernel
// size is only known at run time).
template <typename T>
struct Walker {
  static constexpr int kStep = kThreads / BM;
  const T* x;
  int64_t at;                      // offset of (ch, ih0 + dh, iw0 + dw); read only inside the image
  int64_t step_w, wrap_w, wrap_h;  // at's steps: kStep columns; next kernel row; next channel
  int ch, dh, dw, ih0, iw0, ks, cin, h, w;
  bool ok;  // the row is an output pixel (not past M)

  __device__ T get() const {
    const int ih = ih0 + dh, iw = iw0 + dw;
    const bool in = ok && ch < cin && ih >= 0 && ih < h && iw >= 0 && iw < w;
    return in ? x[at] : T(0);
  }

  // dw < ks before the step, so each digit wraps at most kStep times (ks = 1 wraps twice).
  __device__ void next() {
    dw += kStep;
    at += step_w;
#pragma unroll
    for (int j = 0; j < kStep; ++j)
      if (dw >= ks) dw -= ks, ++dh, at += wrap_w;
#pragma unroll
    for (int j = 0; j < kStep; ++j)
      if (dh >= ks) dh -= ks, ++ch, at += wrap_h;
  }
};

// The walker of this thread over source `src` (0: x, 1: X~), at its first column.
template <typename T, typename A>
__device__ Walker<T> walker_of(const Params<T, A>& p, int src, int64_t m) {
  Walker<T> g;
  const Strides4& s = src == 0 ? p.sx : p.sxr;
  g.ok = m < p.M;
  const Pixel px = pixel_of(p, g.ok ? m : 0);
  g.x = src == 0 ? p.x : p.x_rec;
  g.ks = p.ks;
  g.cin = p.Cin;
  g.h = p.H;
  g.w = p.W;
  g.ih0 = static_cast<int>(px.oh) * p.stride - p.padding;
  g.iw0 = static_cast<int>(px.ow) * p.stride - p.padding;
  const int k = threadIdx.x / BM;
  g.ch = k / (p.ks * p.ks);
  g.dh = k / p.ks - g.ch * p.ks;
  g.dw = k % p.ks;
  g.at = px.b * s.b + g.ch * s.c + (g.ih0 + g.dh) * s.h + (g.iw0 + g.dw) * s.w;
  g.step_w = Walker<T>::kStep * s.w;
  g.wrap_w = s.h - p.ks * s.w;
  g.wrap_h = s.c - p.ks * s.h;
  return g;
}

// A tile: As[m][k] = im2col(source)[m0 + m][k0 + k] for the walker's current k0; zero
// outside the image and past the source's K columns. A warp reads 32 neighbouring pixels of
// one column (coalesced in NCHW).
template <int BK, int LDS, typename T>
__device__ void load_a(Walker<T>& g, T* As) {
  constexpr int kStep = Walker<T>::kStep;
  static_assert(BK % kStep == 0, "every thread loads the same number of A elements");
  T* row = As + (threadIdx.x % BM) * LDS + threadIdx.x / BM;
#pragma unroll
  for (int i = 0; i < BK / kStep; ++i) {
    row[i * kStep] = g.get();
    g.next();
  }
}

// B tile: Bs[r][k] = w[q·Cout + n0 + j][src·ldk + k0 + k] for r = q·BN + j: the G gate rows
// of the block's channels, K contiguous (as in memory; WMMA reads it as the col-major
// K x G·BN B). A thread moves kVec elements at once (16 bytes on the tensor-core path):
// gemm_weight pads each source's columns to ldk, a multiple of kVec, so a chunk is all in or
// all out; columns past ldk are zero.
template <int G, int BK, int LDS, int kVec, typename T, typename A>
__device__ void load_b(const Params<T, A>& p, T* Bs, int64_t n0, int src, int k0) {
  struct alignas(sizeof(T) * kVec) Chunk {
    T v[kVec];
  };
  constexpr int kChunks = BK / kVec, kStep = kThreads / kChunks;
  static_assert(BK % kVec == 0 && (G * BN) % kStep == 0, "B chunks evenly over the threads");
  const int k = threadIdx.x % kChunks * kVec;
  const bool col_ok = k0 + k < p.ldk;
  const T* w = p.w + src * p.ldk + k0 + k;
#pragma unroll
  for (int i = 0; i < G * BN / kStep; ++i) {
    const int r = threadIdx.x / kChunks + i * kStep;
    const int64_t n = n0 + r % BN;
    Chunk v{};
    if (col_ok && n < p.Cout)
      v = *reinterpret_cast<const Chunk*>(w + ((r / BN) * p.Cout + n) * p.ldw);
    *reinterpret_cast<Chunk*>(Bs + r * LDS + k) = v;
  }
}

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// Elements per load_b chunk: 16 bytes on the tensor-core path; 1 on the scalar path, whose
// odd smem row length (LDS) leaves rows unaligned.
template <typename T>
constexpr int kChunk = kTensorCores<T> ? 16 / int(sizeof(T)) : 1;

// fp16/bf16: tensor cores. Warp w computes pixel rows [16w, 16w + 16) x all G·BN columns.
template <typename T>
struct WmmaType;
#ifdef __CUDACC__
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
#else  // the CPU emulation's WMMA (tests/emulation) takes the c10 types
template <>
struct WmmaType<at::Half> {
  using type = at::Half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = at::BFloat16;
};
#endif

template <typename T, int G>
struct TensorCoreTile {
  using A = float;
  using WT = typename WmmaType<T>::type;
  static constexpr int BK = 32, LDS = BK + 8;  // +8: keeps WMMA's 32-byte row alignment
  static constexpr int kVec = kChunk<T>;
  static constexpr int LDC = BN + 4;  // fp32 accumulator rows in smem
  static constexpr int kInBytes = (BM + G * BN) * LDS * int(sizeof(T));
  static constexpr int kOutBytes = G * BM * LDC * int(sizeof(float));
  static constexpr int kSmemBytes = kInBytes > kOutBytes ? kInBytes : kOutBytes;
  static_assert(BM == 16 * (kThreads / 32) && BN % 16 == 0, "one 16-row strip per warp");

#ifdef PTL_FUSED_WMMA
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[G][BN / 16];
#endif

  __device__ void zero() {
#ifdef PTL_FUSED_WMMA
    for (int q = 0; q < G; ++q)
      for (int j = 0; j < BN / 16; ++j) nvcuda::wmma::fill_fragment(acc[q][j], 0.0f);
#endif
  }

  __device__ void step(const T* As, const T* Bs) {
#ifdef PTL_FUSED_WMMA
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const WT*>(As + warp * 16 * LDS + kk), LDS);
#pragma unroll
      for (int q = 0; q < G; ++q) {
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> b;
          wmma::load_matrix_sync(b, reinterpret_cast<const WT*>(Bs + (q * BN + j * 16) * LDS + kk),
                                 LDS);
          wmma::mma_sync(acc[q][j], a, b, acc[q][j]);
        }
      }
    }
#else
    __trap();
#endif
  }

  // The cell needs all G gates of a point in one thread: the accumulators go through smem
  // (over the A/B tiles, which the caller has finished with).
  template <typename F>
  __device__ void for_each_point(unsigned char* smem, bool channels_last, F f) {
#ifdef PTL_FUSED_WMMA
    float* Cs = reinterpret_cast<float*>(smem);
    const int warp = threadIdx.x / 32;
    for (int q = 0; q < G; ++q)
      for (int j = 0; j < BN / 16; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (q * BM + warp * 16) * LDC + j * 16, acc[q][j], LDC,
                                        nvcuda::wmma::mem_row_major);
    __syncthreads();
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int m = channels_last ? e / BN : e % BM, n = channels_last ? e % BN : e / BM;
      float z[G];
#pragma unroll
      for (int q = 0; q < G; ++q) z[q] = Cs[(q * BM + m) * LDC + n];
      f(m, n, z);
    }
#endif
  }
};

// fp32/fp64: the same tiles with scalar FMAs. A thread owns one pixel (tid % BM) and every
// (kThreads / BM)-th channel of the block, all G gates.
template <typename T, int G>
struct ScalarTile {
  using A = at::opmath_type<T>;
  static constexpr int BK = 16, LDS = BK + 1;  // +1: a warp's 32 pixel rows hit 32 banks
  static constexpr int kVec = kChunk<T>;
  static constexpr int kSmemBytes = (BM + G * BN) * LDS * int(sizeof(T));
  static constexpr int kStep = kThreads / BM, kCols = BN / kStep;
  A acc[G][kCols];

  __device__ void zero() {
#pragma unroll
    for (int q = 0; q < G; ++q)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[q][j] = A(0);
  }

  __device__ void step(const T* As, const T* Bs) {
    const int m = threadIdx.x % BM, n = threadIdx.x / BM;
    for (int k = 0; k < BK; ++k) {
      const A a = As[m * LDS + k];
#pragma unroll
      for (int q = 0; q < G; ++q)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[q][j] += a * A(Bs[(q * BN + n + j * kStep) * LDS + k]);
    }
  }

  template <typename F>
  __device__ void for_each_point(unsigned char*, bool, F f) {
    const int m = threadIdx.x % BM, n = threadIdx.x / BM;
#pragma unroll  // indexed by constants only, acc stays in registers
    for (int j = 0; j < kCols; ++j) {
      A z[G];
#pragma unroll
      for (int q = 0; q < G; ++q) z[q] = acc[q][j];
      f(m, n + j * kStep, z);
    }
  }
};

// The cell at output pixel m, channel n, from the accumulated convolution z[G] (bias not yet
// added): the same steps and roundings as the epilogue kernels after an ATen convolution.
template <int G, typename T, typename A>
__device__ void cell_point(const Params<T, A>& p, int64_t m, int64_t n, const A* z) {
  const Pixel px = pixel_of(p, m);
  A pre[G];
#pragma unroll
  for (int q = 0; q < G; ++q) {
    const A v = z[q] + (p.bias ? static_cast<A>(p.bias[q * p.Cout + n]) : A(0));
    pre[q] = static_cast<A>(static_cast<T>(v));  // the conv output is in T, as the reference's
  }
  const int64_t s = px.b * p.ss.b + n * p.ss.c + px.oh * p.ss.h + px.ow * p.ss.w;
  if constexpr (G == 3) {
    if (p.map) {  // v2's constant share, added in T like the reference adds it to the conv
      const int64_t mo = n * p.smap.c + px.oh * p.smap.h + px.ow * p.smap.w;
#pragma unroll
      for (int q = 0; q < G; ++q) {
        const T mv = p.map[mo + q * p.Cout * p.smap.c];
        pre[q] = static_cast<A>(static_cast<T>(static_cast<T>(pre[q]) + mv));
      }
    }
    p.y[s] = static_cast<T>(cell_eval<A>(pre[0], pre[1], pre[2]));
  } else {
    const auto c = cell_forward<A>(pre[0], pre[1], pre[2], pre[3], p.c_prev[s]);
    const T y = static_cast<T>(c.y);
    p.y[s] = y;
    p.c_new[s] = c.c;
    if (p.h_prev) {
      const A h0 = p.h_prev[s];
      p.h_new[s] = h0 + *p.alpha * (static_cast<A>(y) - h0);
    }
    const int64_t g = px.b * p.sg.b + n * p.sg.c + px.oh * p.sg.h + px.ow * p.sg.w;
    const int64_t gs = p.Cout * p.sg.c;
    p.gates[g] = static_cast<T>(c.i);
    p.gates[g + gs] = static_cast<T>(c.f);
    p.gates[g + 2 * gs] = static_cast<T>(c.o);
    p.gates[g + 3 * gs] = static_cast<T>(c.g);
  }
}

template <typename T, int G, typename Tile>
__global__ void __launch_bounds__(kThreads) fused_cell_kernel(const Params<T, typename Tile::A> p) {
  __shared__ __align__(128) unsigned char smem[Tile::kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * Tile::LDS;
  const int64_t m0 = blockIdx.x * int64_t(BM), n0 = blockIdx.y * int64_t(BN);
  Tile tile;
  tile.zero();
  // v2: the K loop runs over x, then over X~ ([x, X~] is never concatenated).
  for (int src = 0; src < (p.x_rec ? 2 : 1); ++src) {
    Walker<T> g = walker_of(p, src, m0 + threadIdx.x % BM);
    for (int k0 = 0; k0 < p.K; k0 += Tile::BK) {
      load_a<Tile::BK, Tile::LDS>(g, As);
      load_b<G, Tile::BK, Tile::LDS, Tile::kVec>(p, Bs, n0, src, k0);
      __syncthreads();
      tile.step(As, Bs);
      __syncthreads();
    }
  }
  tile.for_each_point(smem, p.channels_last, [&](int m, int n, const typename Tile::A* z) {
    if (m0 + m < p.M && n0 + n < p.Cout) cell_point<G>(p, m0 + m, n0 + n, z);
  });
}

// g's weight as the kernel reads it: (G·Cout, S·ldk) row-major for S sources (v2: x and X~),
// each source's Cin·k·k columns zero-padded to ldk, a multiple of kChunk<T>, and the rows
// 16-byte aligned. A view of the weight when it already is. The caller keeps it alive until
// the launch.
template <typename T>
Tensor gemm_weight(const GemmArgs& g) {
  const int64_t sources = g.x_rec.defined() ? 2 : 1;
  const Tensor w = g.weight.reshape({g.weight.size(0), sources, -1});
  const int64_t k = w.size(2), ldk = (k + kChunk<T> - 1) / kChunk<T> * kChunk<T>;
  if (ldk == k && w.is_contiguous() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0)
    return w.view({w.size(0), -1});
  Tensor padded = at::zeros({w.size(0), sources, ldk}, w.options());
  padded.narrow(2, 0, k).copy_(w);
  return padded.view({w.size(0), -1});
}

// The geometry and inputs of g (w: gemm_weight of g.weight); the caller fills in the outputs.
template <typename T, typename A>
Params<T, A> gemm_params(const GemmArgs& g, const Tensor& w, const Tensor& y, bool channels_last) {
  TORCH_CHECK(!g.bias.defined() || g.bias.scalar_type() == g.x.scalar_type(),
              "ptl_fused: bias must have x's dtype ", g.x.scalar_type(), ", got ",
              g.bias.scalar_type());
  Params<T, A> p{};
  p.x = g.x.data_ptr<T>();
  p.sx = strides_of(g.x);
  if (g.x_rec.defined()) {
    p.x_rec = g.x_rec.data_ptr<T>();
    p.sxr = strides_of(g.x_rec);
  }
  p.w = w.data_ptr<T>();
  p.bias = ptr_or_null<T>(g.bias);
  p.y = y.data_ptr<T>();
  p.ss = strides_of(y);
  // The K loop and the gather index in 32 bits (below 2^31 for any weight that fits a GPU).
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(w.size(1) < kMax && g.x.size(2) < kMax && g.x.size(3) < kMax,
              "ptl_fused: the fused kernel indexes the weight's rows and the input's height and ",
              "width in 32 bits; got weight ", g.weight.sizes(), " and x ", g.x.sizes());
  p.Cin = static_cast<int>(g.x.size(1));
  p.H = static_cast<int>(g.x.size(2));
  p.W = static_cast<int>(g.x.size(3));
  p.Cout = y.size(1);
  p.Ho = y.size(2);
  p.Wo = y.size(3);
  p.M = y.size(0) * p.Ho * p.Wo;
  p.ks = static_cast<int>(g.weight.size(2));
  p.K = p.Cin * p.ks * p.ks;
  p.ldw = static_cast<int>(w.size(1));
  p.ldk = p.ldw / (g.x_rec.defined() ? 2 : 1);
  p.stride = static_cast<int>(g.stride);
  p.padding = static_cast<int>(g.padding);
  p.channels_last = channels_last;
  return p;
}

// Params of the training forward: g's convolution, a's states and outputs.
template <typename T, typename A>
Params<T, A> fwd_params(const GemmArgs& g, const Tensor& w, const FwdEpilogueArgs& a) {
  auto p = gemm_params<T, A>(g, w, a.y, a.channels_last);
  p.c_prev = a.c_prev.data_ptr<A>();
  p.c_new = a.c_new.data_ptr<A>();
  p.h_prev = ptr_or_null<A>(a.h_prev);
  p.h_new = ptr_or_null<A>(a.h_new);
  p.alpha = ptr_or_null<A>(a.h_alpha);
  p.gates = a.z.data_ptr<T>();
  p.sg = strides_of(a.z);
  return p;
}

// Params of eval: g's convolution (i, o, g rows), a's gate map and y.
template <typename T, typename A>
Params<T, A> eval_params(const GemmArgs& g, const Tensor& w, const EvalEpilogueArgs& a) {
  auto p = gemm_params<T, A>(g, w, a.y, a.channels_last);
  if (a.gate_map.defined()) {
    // (3C, Ho, Wo), or (Ho, Wo, 3C) for channels_last (see bconv_cell_eval).
    const Tensor& m = a.gate_map;
    p.map = m.data_ptr<T>();
    p.smap = a.channels_last ? Strides4{0, m.stride(2), m.stride(0), m.stride(1)}
                             : Strides4{0, m.stride(0), m.stride(1), m.stride(2)};
  }
  return p;
}

}  // namespace ptl_fused::fused_gemm

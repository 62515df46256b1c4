// The fused forward of the BConv-Cell: the gate convolution as an implicit GEMM and the cell
// as its epilogue, in ONE kernel (ops' fused_gemm=True; backend "cuda_igemm"). The kernel;
// its host entry points are in fused_gemm.cu.
//
// A block owns BM output pixels (of M = B·Ho·Wo) x BN channels (of Cout) and accumulates the
// G gates of those channels side by side (G = 4: i, f, o, g; eval: G = 3, i, o, g), so one
// thread holds every gate of a point when the cell runs: the (B, G·Cout, Ho, Wo)
// pre-activations never reach global memory, and the activated gates are written once,
// where backward keeps them. v2's second K source (the recovered X~) is read in place:
// [x, X~] is never concatenated. Any stride, padding, kernel size and input strides (NCHW or
// channels_last).
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
#include "vec.cuh"

// The CPU emulation defines this to fill the block's shared arrays with NaN/-1 bytes before
// any thread writes them, so that a read of shared memory the block did not write fails its
// tests; in the CUDA build it is nothing.
#ifndef PTL_FUSED_SHARED_DECLARED
#define PTL_FUSED_SHARED_DECLARED(...)
#endif

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
  T* gates;  // training: the activated gates (B, 4·Cout, Ho, Wo), or null (not saved)
  Strides4 sg;
  Strides4 ss;  // every state-shaped tensor: y, c_prev, c_new, h_prev, h_new
  int64_t Cout, Ho, Wo, M;
  int Cin, H, W;
  int K;         // im2col columns per source: Cin·k·k
  int ldk, ldw;  // the weight's columns per source (K padded) and row stride (gemm_weight)
  int ks, stride, padding;
  bool channels_last;  // order of the epilogue's points: channels fastest, or pixels
};

// The A tile is gathered through a table of its BK im2col columns, shared by the block: a
// column (input channel ch, kernel row dh, kernel column dw) is split once per tile by one
// thread, not by each of the BM pixels that read it (the kernel size is only known at run
// time, so splitting is a division).
//
// Two orders of the K columns, chosen per launch (tap_major below); the weight is laid out to
// match (gemm_weight):
//   channel-major (ch, dh, dw), as the weight is stored: for NCHW, where a warp's 32 pixels
//     of one column are 32 neighbouring elements;
//   tap-major (dh, dw, ch): for channels_last, where kChunk<T> consecutive columns are
//     consecutive channels of one tap, contiguous in memory, so each is one vector load
//     (16 bytes on the tensor-core path) instead of kChunk<T> loads a row apart.
struct Column {
  int64_t off;  // ch·s.c + dh·s.h + dw·s.w in the tile's source
  int dh, dw;   // dh = kNoRow past the source's K columns: out of every image, read as 0
};
constexpr int kNoRow = -(1 << 29);

// cols[k] for column k0 + k of source src (0: x, 1: v2's X~); threads [0, BK).
template <int BK, bool kTapMajor, typename T, typename A>
__device__ void write_columns(const Params<T, A>& p, Column* cols, int src, int k0) {
  const int k = threadIdx.x;
  if (k >= BK) return;
  const Strides4& s = src == 0 ? p.sx : p.sxr;
  const int kc = k0 + k;
  int ch, dh, dw;
  if constexpr (kTapMajor) {
    const int tap = kc / p.Cin;
    ch = kc - tap * p.Cin, dh = tap / p.ks, dw = tap - dh * p.ks;
  } else {
    const int taps = p.ks * p.ks;
    ch = kc / taps, dh = (kc - ch * taps) / p.ks, dw = kc - ch * taps - dh * p.ks;
  }
  cols[k] = kc < p.K ? Column{ch * s.c + dh * s.h + dw * s.w, dh, dw} : Column{0, kNoRow, 0};
}

// A thread's row of every A tile: its output pixel (m = tid % BM), fixed for the kernel.
// A row past M gathers pixel 0 (valid addresses); the epilogue drops its results.
struct GatherRow {
  int64_t base[2];  // offset of (b, channel 0, ih0, iw0) in x and X~ (may lie outside)
  int ih0, iw0;     // input row and column of the pixel's first tap
};

// Where the epilogue writes a block pixel: offsets of (b, channel 0, oh, ow); a channel adds
// n times the channel stride. Filled once per block pixel, so no point divides.
struct PointRow {
  int64_t s;    // y and every state tensor (strides ss)
  int64_t g;    // training: the gates (strides sg)
  int64_t map;  // eval v2: the gate map (strides smap, no batch)
};

// This thread's gather row; threads [0, BM) also fill their pixel's rows[tid] (m = m0 + tid).
template <typename T, typename A>
__device__ GatherRow gather_row(const Params<T, A>& p, int64_t m, PointRow* rows) {
  GatherRow g;
  const int64_t mm = m < p.M ? m : 0, hw = p.Ho * p.Wo;
  const int64_t b = mm / hw, oh = (mm - b * hw) / p.Wo, ow = mm - b * hw - oh * p.Wo;
  g.ih0 = static_cast<int>(oh) * p.stride - p.padding;
  g.iw0 = static_cast<int>(ow) * p.stride - p.padding;
  g.base[0] = b * p.sx.b + g.ih0 * p.sx.h + g.iw0 * p.sx.w;
  g.base[1] = b * p.sxr.b + g.ih0 * p.sxr.h + g.iw0 * p.sxr.w;
  if (threadIdx.x < BM)
    rows[threadIdx.x] = {b * p.ss.b + oh * p.ss.h + ow * p.ss.w,
                         b * p.sg.b + oh * p.sg.h + ow * p.sg.w, oh * p.smap.h + ow * p.smap.w};
  return g;
}

// Zeros of the element type (16 bytes: one tap-major vector), in global memory: the A gather's
// padding reads them. One array per type, so that they are read as the type they are.
template <typename T>
alignas(16) __device__ const T kZeros[16 / sizeof(T)] = {};

// One K tile's share of this thread, held in registers from the global loads to the smem
// stores, so that tile t + 1's loads are in flight while tile t multiplies.
//   A: As[m][k] = im2col(source)[m0 + m][k0 + k], zero outside the image and past the
//      source's K columns. The thread keeps its pixel (m = tid % BM) and kA consecutive
//      columns, so a warp reads 32 neighbouring pixels of one column at a time (coalesced in
//      NCHW; tap-major: kVec channels of 32 pixels, one vector load each) and stores
//      kVec-wide row pieces (16 bytes on the tensor-core path, whose 80-byte rows put 8
//      lanes' pieces on distinct banks).
//   B: Bs[r][k] = w[q·Cout + n0 + j][src·ldk + k0 + k] for r = q·BN + j: the G gate rows of
//      the block's channels, K contiguous (as in memory; WMMA reads it as the col-major
//      K x G·BN B), kVec elements at once (16 bytes on the tensor-core path): gemm_weight
//      pads each source's columns to ldk, a multiple of kVec, so a chunk is all in or all out;
//      columns past ldk are zero.
template <typename T, int G, int BK, int LDS, int kVec, bool kTapMajor>
struct Staged {
  static constexpr int kStepA = kThreads / BM, kA = BK / kStepA;
  static constexpr int kChunks = BK / kVec, kStepB = kThreads / kChunks, kB = G * BN / kStepB;
  static_assert(BK % kStepA == 0 && kA % kVec == 0, "A evenly over the threads, in chunks");
  static_assert(BK % kVec == 0 && (G * BN) % kStepB == 0, "B chunks evenly over the threads");
  Vec<T, kVec> a[kA / kVec];
  Vec<T, kVec> b[kB];

  template <typename A>
  __device__ void fetch(const Params<T, A>& p, const GatherRow& g, const Column* cols, int64_t n0,
                        int src, int k0) {
    const T* x = src == 0 ? p.x + g.base[0] : p.x_rec + g.base[1];
    // Branch-free: a padded element is read from kZeros, so every lane loads and the kA loads
    // issue back to back.
    const T* zero = kZeros<T>;
    // Tap-major, a chunk's kVec columns share one tap (tap_major: Cin % kVec == 0), so its
    // first column decides for all of them; channel-major, every column is its own tap.
    constexpr int kRun = kTapMajor ? kVec : 1;
#pragma unroll
    for (int i = 0; i < kA; i += kRun) {
      const Column c = cols[threadIdx.x / BM * kA + i];
      const bool in =
          (unsigned(g.ih0 + c.dh) < unsigned(p.H)) & (unsigned(g.iw0 + c.dw) < unsigned(p.W));
      if constexpr (kTapMajor)
        a[i / kVec] = load_vec<kVec>(in ? x + c.off : zero);
      else
        a[i / kVec].v[i % kVec] = *(in ? x + c.off : zero);
    }
    const int k = threadIdx.x % kChunks * kVec;
    const bool col_ok = k0 + k < p.ldk;
    const T* w = p.w + src * p.ldk + k0 + k;
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      const int r = threadIdx.x / kChunks + i * kStepB;
      const int64_t n = n0 + r % BN;
      b[i] = col_ok && n < p.Cout ? load_vec<kVec>(w + ((r / BN) * p.Cout + n) * p.ldw)
                                  : Vec<T, kVec>{};
    }
  }

  __device__ void store(T* As, T* Bs) const {
    T* row = As + (threadIdx.x % BM) * LDS + threadIdx.x / BM * kA;
#pragma unroll
    for (int i = 0; i < kA / kVec; ++i) store_vec(row + i * kVec, a[i]);
    const int k = threadIdx.x % kChunks * kVec;
#pragma unroll
    for (int i = 0; i < kB; ++i)
      store_vec(Bs + (threadIdx.x / kChunks + i * kStepB) * LDS + k, b[i]);
  }
};

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// Elements per B chunk (Staged): 16 bytes on the tensor-core path; 1 on the scalar path, whose
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
  // The fp32 accumulators in smem, gate-major, laid out so that a warp's 32 lanes read 32
  // consecutive floats (no bank conflicts): channels fastest for channels_last (rows of LDC),
  // pixels fastest for NCHW (columns of LDM); +4 keeps WMMA's 16-byte ldm rule.
  static constexpr int LDC = BN + 4, LDM = BM + 4;
  static constexpr int kOutFloats = BM * LDC > BN* LDM ? BM* LDC : BN* LDM;
  static constexpr int kInBytes = (BM + G * BN) * LDS * int(sizeof(T));
  static constexpr int kOutBytes = G * kOutFloats * int(sizeof(float));
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
    using namespace nvcuda;
    float* Cs = reinterpret_cast<float*>(smem);
    const int warp = threadIdx.x / 32;
    for (int q = 0; q < G; ++q)
      for (int j = 0; j < BN / 16; ++j) {
        float* gate = Cs + q * kOutFloats;
        if (channels_last)
          wmma::store_matrix_sync(gate + warp * 16 * LDC + j * 16, acc[q][j], LDC,
                                  wmma::mem_row_major);
        else
          wmma::store_matrix_sync(gate + j * 16 * LDM + warp * 16, acc[q][j], LDM,
                                  wmma::mem_col_major);
      }
    __syncthreads();
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int m = channels_last ? e / BN : e % BM, n = channels_last ? e % BN : e / BM;
      const int at = channels_last ? m * LDC + n : n * LDM + m;
      float z[G];
#pragma unroll
      for (int q = 0; q < G; ++q) z[q] = Cs[q * kOutFloats + at];
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
// added): the epilogue kernels' steps, with the pre-activation rounded to T once (acc + bias;
// ATen's convolution may round before and after its bias add), so fp16/bf16 may differ from
// the unfused path by an ulp of T there, within the tests' tolerance rule.
template <int G, typename T, typename A>
__device__ void cell_point(const Params<T, A>& p, const PointRow& px, int64_t n, const A* z) {
  A pre[G];
#pragma unroll
  for (int q = 0; q < G; ++q) {
    const A v = z[q] + (p.bias ? static_cast<A>(p.bias[q * p.Cout + n]) : A(0));
    pre[q] = static_cast<A>(static_cast<T>(v));  // the conv output is in T, as the reference's
  }
  const int64_t s = px.s + n * p.ss.c;
  if constexpr (G == 3) {
    if (p.map) {  // v2's constant share, added in T like the reference adds it to the conv
      const int64_t mo = px.map + n * p.smap.c;
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
    if (p.gates) {  // null: not saved (no backward, or one that recomputes them)
      const int64_t g = px.g + n * p.sg.c;
      const int64_t gs = p.Cout * p.sg.c;
      p.gates[g] = static_cast<T>(c.i);
      p.gates[g + gs] = static_cast<T>(c.f);
      p.gates[g + 2 * gs] = static_cast<T>(c.o);
      p.gates[g + 3 * gs] = static_cast<T>(c.g);
    }
  }
}

template <typename T, int G, typename Tile, bool kTapMajor>
__global__ void __launch_bounds__(kThreads) fused_cell_kernel(const Params<T, typename Tile::A> p) {
  __shared__ __align__(128) unsigned char smem[Tile::kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * Tile::LDS;
  const int64_t m0 = blockIdx.x * int64_t(BM), n0 = blockIdx.y * int64_t(BN);
  Tile tile;
  tile.zero();
  // The K tiles of x, then (v2) of X~: [x, X~] is never concatenated. cols[t % 2] holds
  // tile t's columns; tile t + 1 is fetched into registers after barrier A of step t and
  // stored after barrier B, so its global loads overlap tile t's multiply.
  __shared__ Column cols[2][Tile::BK];
  __shared__ PointRow rows[BM];
  PTL_FUSED_SHARED_DECLARED(smem, cols, rows);
  using Stage = Staged<T, G, Tile::BK, Tile::LDS, Tile::kVec, kTapMajor>;
  const GatherRow g = gather_row(p, m0 + threadIdx.x % BM, rows);
  const int per_src = (p.K + Tile::BK - 1) / Tile::BK, tiles = per_src * (p.x_rec ? 2 : 1);
  auto columns = [&](int t) {  // tile t's columns into cols[t % 2]
    const int src = t >= per_src;
    write_columns<Tile::BK, kTapMajor>(p, cols[t % 2], src, (t - src * per_src) * Tile::BK);
  };
  auto fetch = [&](Stage& st, int t) {
    const int src = t >= per_src;
    st.fetch(p, g, cols[t % 2], n0, src, (t - src * per_src) * Tile::BK);
  };
  Stage stage;
  columns(0);
  __syncthreads();
  fetch(stage, 0);
  if (tiles > 1) columns(1);
  for (int t = 0; t < tiles; ++t) {
    stage.store(As, Bs);
    __syncthreads();  // A: the tile is in smem; cols[(t + 1) % 2] is written
    if (t + 1 < tiles) fetch(stage, t + 1);
    tile.step(As, Bs);
    if (t + 2 < tiles) columns(t + 2);  // cols[t % 2] was last read by fetch(t), before A
    __syncthreads();                    // B: the tile has been read
  }
  tile.for_each_point(smem, p.channels_last, [&](int m, int n, const typename Tile::A* z) {
    if (m0 + m < p.M && n0 + n < p.Cout) cell_point<G>(p, rows[m], n0 + n, z);
  });
}

// Whether the kernel gathers A tap-major (see Column): when x (and X~) hold channels
// contiguously, a whole number of kChunk<T> per pixel, with every pixel's channels aligned to
// a chunk's bytes. Otherwise channel-major, which reads any strides.
template <typename T>
bool tap_major(const GemmArgs& g) {
  constexpr int v = kChunk<T>;
  const auto ok = [](const Tensor& t) {
    return t.stride(1) == 1 && t.size(1) % v == 0 && t.stride(0) % v == 0 && t.stride(2) % v == 0 &&
           t.stride(3) % v == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % (v * sizeof(T)) == 0;
  };
  return ok(g.x) && (!g.x_rec.defined() || ok(g.x_rec));
}

// g's weight as the kernel reads it: (G·Cout, S·ldk) row-major for S sources (v2: x and X~),
// each source's Cin·k·k columns in the gather's order (tap-major: (dh, dw, ch)), zero-padded
// to ldk, a multiple of kChunk<T>, and the rows 16-byte aligned. A view of the weight when it
// already is (tap-major: a channels_last v1 weight). The caller keeps it alive until the
// launch.
template <typename T>
Tensor gemm_weight(const GemmArgs& g, bool tap_major) {
  const int64_t sources = g.x_rec.defined() ? 2 : 1, rows = g.weight.size(0);
  // (rows, S, then a source's columns in gather order); a view of the weight, not a copy.
  const Tensor w = tap_major ? g.weight.unflatten(1, {sources, -1}).permute({0, 1, 3, 4, 2})
                             : g.weight.unflatten(1, {sources, -1});
  const int64_t k = g.weight.size(1) / sources * g.weight.size(2) * g.weight.size(3);
  const int64_t ldk = (k + kChunk<T> - 1) / kChunk<T> * kChunk<T>;
  if (ldk == k && w.is_contiguous() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0)
    return w.view({rows, -1});
  // One pass over the weight (it is re-laid out every call: a training step changes it), and
  // only the padding columns zeroed.
  Tensor packed = at::empty({rows, sources, ldk}, w.options());
  packed.narrow(2, 0, k).view(w.sizes()).copy_(w);
  if (ldk > k) packed.narrow(2, k, ldk - k).zero_();
  return packed.view({rows, -1});
}

// The one place that picks g's gather order: run(order, params), order a std::bool_constant
// of tap-major, params = make_params(the weight laid out for it, alive until run returns).
// The CUDA launch (fused_gemm.cu) and the CPU emulation (tests/emulation) both go through it.
template <typename T, typename MakeParams, typename Run>
void with_gather_order(const GemmArgs& g, MakeParams make_params, Run run) {
  if (tap_major<T>(g))
    run(std::true_type{}, make_params(gemm_weight<T>(g, true)));
  else
    run(std::false_type{}, make_params(gemm_weight<T>(g, false)));
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
  // The K loop indexes in 32 bits, and an input row or column plus kNoRow must stay negative
  // (write_columns); any weight that fits a GPU passes, an image would need 2^29 rows to fail.
  TORCH_CHECK(w.size(1) < std::numeric_limits<int>::max() && g.x.size(2) + g.padding < -kNoRow &&
                  g.x.size(3) + g.padding < -kNoRow,
              "ptl_fused: the fused kernel needs weight rows below 2^31 elements and an input ",
              "below 2^29 rows and columns; got weight ", g.weight.sizes(), " and x ", g.x.sizes());
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
  if (a.z.defined()) {
    p.gates = a.z.data_ptr<T>();
    p.sg = strides_of(a.z);
  }
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

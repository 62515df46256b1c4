// A CPU stand-in for the CUDA built-ins that csrc/cuda/*.cuh use, so the kernels' own source
// runs (and is tested) on a machine without a GPU:
//   - a block's threads are std::threads; __syncthreads() is a std::barrier, and every thread
//     of the block must meet it at the same call site;
//   - __shared__ is a function-local static, shared by the block's threads (blocks run one
//     after another); a kernel that names its shared arrays in PTL_FUSED_SHARED_DECLARED has
//     them poisoned (0xFF bytes: NaN floats, -1 integers) at the start of every block, so a
//     read of shared memory the block did not write is not a quiet zero or a stale value;
//   - WMMA is whole-tile: every lane holds the full 16x16 tile, lane 0 stores it, the
//     documented pointer-alignment and ldm rules are checked, and every lane of a warp must
//     make the same number of WMMA calls (no call under a lane-divergent branch);
//   - a vector access (csrc/cuda/vec.cuh) must be aligned to its size, as on a GPU.
// What it shows: indexing, tiling, grid-stride loops, barrier placement, the shared-memory
// reuse, the cell math, the alignment a GPU would fault on. What it cannot: the hardware's
// fragment layout, timing, races the barriers happen to hide on the CPU.
#pragma once

#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace cuda_emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index thread_index, block_index, block_dim, grid_dim;

// The first broken rule, reported by launch().
inline std::mutex error_mutex;
inline std::string error;
inline void fail(const std::string &what) {
  const std::lock_guard<std::mutex> lock(error_mutex);
  if (error.empty()) error = what;
}

inline bool aligned(const void *p, std::size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes == 0) return true;
  fail("a " + std::to_string(bytes) + "-byte vector access is not aligned to its size");
  return false;
}

// Runs when every thread of the block has arrived at a barrier: all must have come from the
// same __syncthreads() (source line).
struct SameSite {
  const std::vector<int> *lines;
  void operator()() noexcept {
    for (const int line : *lines)
      if (line != lines->front())
        fail("threads of a block met at different __syncthreads() (lines " +
             std::to_string(lines->front()) + " and " + std::to_string(line) + ")");
  }
};
inline std::barrier<SameSite> *block_barrier = nullptr;
inline std::vector<int> *barrier_lines = nullptr;

inline void sync_threads(int line) {
  (*barrier_lines)[thread_index.x] = line;
  block_barrier->arrive_and_wait();
}

inline thread_local long wmma_calls = 0;

// Thread 0 poisons the block's shared arrays while the others wait (all threads pass here
// before any of them writes shared memory).
template <typename... Arrays>
void poison_shared(Arrays &...arrays) {
  if (thread_index.x == 0) (std::memset(&arrays, 0xFF, sizeof(arrays)), ...);
  sync_threads(-1);
}

// Runs kernel() on a grid of gx x gy blocks of `threads` threads; returns the
// first error.
template <typename F>
std::string launch(unsigned gx, unsigned gy, unsigned threads, F kernel) {
  error.clear();
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      std::vector<int> lines(threads);
      std::vector<long> calls(threads);
      std::barrier<SameSite> barrier(threads, SameSite{&lines});
      block_barrier = &barrier;
      barrier_lines = &lines;
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          thread_index = {t, 0, 0};
          block_index = {bx, by, 0};
          block_dim = {threads, 1, 1};
          grid_dim = {gx, gy, 1};
          wmma_calls = 0;
          kernel();
          calls[t] = wmma_calls;
        });
      }
      for (auto &th : pool) th.join();
      for (unsigned t = 0; t < threads; ++t)
        if (calls[t] != calls[t - t % 32])
          fail("lane " + std::to_string(t % 32) + " of warp " + std::to_string(t / 32) + " made " +
               std::to_string(calls[t]) + " WMMA calls, lane 0 " +
               std::to_string(calls[t - t % 32]));
    }
  }
  block_barrier = nullptr;
  barrier_lines = nullptr;
  return error;
}

}  // namespace cuda_emulation

#define PTL_FUSED_SHARED_DECLARED(...) ::cuda_emulation::poison_shared(__VA_ARGS__)

// csrc/cuda/vec.cuh's hook: a misaligned vector access is reported by launch() and skipped
// (on the CPU it could crash the test process).
#define PTL_FUSED_ALIGNED(ptr, bytes) ::cuda_emulation::aligned(ptr, bytes)

#define threadIdx ::cuda_emulation::thread_index
#define blockIdx ::cuda_emulation::block_index
#define blockDim ::cuda_emulation::block_dim
#define gridDim ::cuda_emulation::grid_dim

#define __syncthreads() ::cuda_emulation::sync_threads(__LINE__)
[[noreturn]] inline void __trap() { std::abort(); }

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// The whole tile, rows x cols of the operand it holds (16 x 16 here).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation knows the 16x16x16 shape only");
  T x[16][16];
};

template <typename T>
void check_pointer(const T *p, unsigned ldm, const char *what) {
  // CUDA Programming Guide, WMMA: 256-bit aligned pointer; ldm a multiple of 16
  // bytes.
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    cuda_emulation::fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    cuda_emulation::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
void fill_fragment(fragment<Use, M, N, K, T, L> &f, V v) {
  ++cuda_emulation::wmma_calls;
  for (auto &row : f.x)
    for (auto &e : row) e = static_cast<T>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const T *p, unsigned ldm) {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>);
  ++cuda_emulation::wmma_calls;
  check_pointer(p, ldm, "load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r][c] = std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r];
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d,
              const fragment<matrix_a, 16, 16, 16, TA, LA> &a,
              const fragment<matrix_b, 16, 16, 16, TB, LB> &b,
              const fragment<accumulator, 16, 16, 16, float> &c) {
  ++cuda_emulation::wmma_calls;
  fragment<accumulator, 16, 16, 16, float> out;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k)
        s += static_cast<float>(a.x[i][k]) * static_cast<float>(b.x[k][j]);
      out.x[i][j] = s;
    }
  d = out;
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f,
                              unsigned ldm, layout_t layout) {
  ++cuda_emulation::wmma_calls;
  check_pointer(p, ldm, "store_matrix_sync");
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r][c];
}

}  // namespace nvcuda::wmma

// CUDA paged-KV movement: append_kv and commit_kv over raw device pointers.
// The cache is [num_blocks, 2, block_size, row_bytes] bytes (any dtype); rows are
// copied as 4-byte words when row_bytes allows it (always true for H_kv*D*elt
// with D even). Launched on the stream the caller passes (torch's current stream).
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

template <typename W>
__global__ void append_kv_kernel(W* cache, const int32_t* bt, int64_t max_blocks,
                                 int64_t block_size, int64_t row_words, const int64_t* start,
                                 const W* k, const W* v, const int64_t* lens, int64_t T) {
  const int64_t b = blockIdx.y, t = blockIdx.x;
  if (t >= lens[b]) return;
  const int64_t pos = start[b] + t;
  const int64_t blk = bt[b * max_blocks + pos / block_size];
  const int64_t off = pos % block_size;
  W* kd = cache + ((blk * 2 + 0) * block_size + off) * row_words;
  W* vd = cache + ((blk * 2 + 1) * block_size + off) * row_words;
  const W* ks = k + (b * T + t) * row_words;
  const W* vs = v + (b * T + t) * row_words;
  for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

template <typename W>
__global__ void commit_kv_kernel(W* cache, const int32_t* bt, int64_t max_blocks,
                                 int64_t block_size, int64_t row_words, const int64_t* prefix,
                                 const int64_t* path, const int64_t* path_lens, int64_t P) {
  const int64_t b = blockIdx.x;
  // One block per sequence walks the path in order: destination i is never a later
  // source (path[j] > path[i] >= i), and each thread owns the same words at every
  // step, so no inter-thread synchronisation is needed.
  for (int64_t i = 0; i < path_lens[b]; ++i) {
    const int64_t src = prefix[b] + path[b * P + i], dst = prefix[b] + i;
    if (src == dst) continue;
    const int64_t sb = bt[b * max_blocks + src / block_size], so = src % block_size;
    const int64_t db = bt[b * max_blocks + dst / block_size], dof = dst % block_size;
    for (int kv = 0; kv < 2; ++kv) {
      const W* s = cache + ((sb * 2 + kv) * block_size + so) * row_words;
      W* d = cache + ((db * 2 + kv) * block_size + dof) * row_words;
      for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) d[w] = s[w];
    }
  }
}

void check(cudaError_t e) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA: ") + cudaGetErrorString(e));
}

// Pointers arrive as integers (tensor.data_ptr()); shapes as ints; Python validates.
void append_kv_cuda(uintptr_t cache, uintptr_t bt, int64_t max_blocks, int64_t block_size,
                    int64_t row_bytes, uintptr_t start, uintptr_t k, uintptr_t v,
                    uintptr_t lens, int64_t B, int64_t T, uintptr_t stream) {
  if (B == 0 || T == 0) return;
  dim3 grid(T, B);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (row_bytes % 4 == 0) {
    int64_t words = row_bytes / 4;
    int threads = words >= 256 ? 256 : (words >= 32 ? 64 : 32);
    append_kv_kernel<uint32_t><<<grid, threads, 0, s>>>(
        reinterpret_cast<uint32_t*>(cache), reinterpret_cast<const int32_t*>(bt), max_blocks,
        block_size, words, reinterpret_cast<const int64_t*>(start),
        reinterpret_cast<const uint32_t*>(k), reinterpret_cast<const uint32_t*>(v),
        reinterpret_cast<const int64_t*>(lens), T);
  } else {
    append_kv_kernel<uint8_t><<<grid, 128, 0, s>>>(
        reinterpret_cast<uint8_t*>(cache), reinterpret_cast<const int32_t*>(bt), max_blocks,
        block_size, row_bytes, reinterpret_cast<const int64_t*>(start),
        reinterpret_cast<const uint8_t*>(k), reinterpret_cast<const uint8_t*>(v),
        reinterpret_cast<const int64_t*>(lens), T);
  }
  check(cudaGetLastError());
}

void commit_kv_cuda(uintptr_t cache, uintptr_t bt, int64_t max_blocks, int64_t block_size,
                    int64_t row_bytes, uintptr_t prefix, uintptr_t path, uintptr_t path_lens,
                    int64_t B, int64_t P, uintptr_t stream) {
  if (B == 0 || P == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (row_bytes % 4 == 0) {
    commit_kv_kernel<uint32_t><<<B, 128, 0, s>>>(
        reinterpret_cast<uint32_t*>(cache), reinterpret_cast<const int32_t*>(bt), max_blocks,
        block_size, row_bytes / 4, reinterpret_cast<const int64_t*>(prefix),
        reinterpret_cast<const int64_t*>(path), reinterpret_cast<const int64_t*>(path_lens), P);
  } else {
    commit_kv_kernel<uint8_t><<<B, 128, 0, s>>>(
        reinterpret_cast<uint8_t*>(cache), reinterpret_cast<const int32_t*>(bt), max_blocks,
        block_size, row_bytes, reinterpret_cast<const int64_t*>(prefix),
        reinterpret_cast<const int64_t*>(path), reinterpret_cast<const int64_t*>(path_lens), P);
  }
  check(cudaGetLastError());
}

}  // namespace

void bind_kv_cuda(py::module_& m) {
  m.def("append_kv_cuda", &append_kv_cuda);
  m.def("commit_kv_cuda", &commit_kv_cuda);
}

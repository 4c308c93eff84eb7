// CPU paged-KV movement: append_kv and commit_kv.
//
// The cache is seen as raw bytes: [num_blocks, 2, block_size, row_bytes] with
// row_bytes = H_kv * D * element_size, so one implementation serves every dtype.
// Python (specrt/ops.py) validates shapes and passes uint8 views.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

using u8arr = py::array_t<uint8_t, py::array::c_style>;
using i32arr = py::array_t<int32_t, py::array::c_style>;
using i64arr = py::array_t<int64_t, py::array::c_style>;

struct CacheView {
  uint8_t* data;
  int64_t num_blocks, block_size, row_bytes;
  uint8_t* row(int64_t block, int kv, int64_t off) const {
    return data + ((block * 2 + kv) * block_size + off) * row_bytes;
  }
};

CacheView view_cache(u8arr& cache) {
  if (cache.ndim() != 4 || cache.shape(1) != 2)
    throw std::invalid_argument("kv_cache must be [num_blocks, 2, block_size, row_bytes]");
  return {cache.mutable_data(), cache.shape(0), cache.shape(2), cache.shape(3)};
}

int64_t block_of(const int32_t* bt, int64_t max_blocks, int64_t b, int64_t pos,
                 const CacheView& c) {
  int64_t slot = pos / c.block_size;
  if (slot >= max_blocks)
    throw std::out_of_range("position " + std::to_string(pos) + " of sequence " +
                            std::to_string(b) + " lies beyond its block table");
  int64_t blk = bt[b * max_blocks + slot];
  if (blk < 0 || blk >= c.num_blocks)
    throw std::out_of_range("block id " + std::to_string(blk) + " out of range");
  return blk;
}

void append_kv(u8arr cache, i32arr block_tables, i64arr start_pos, u8arr k, u8arr v,
               i64arr lens) {
  CacheView c = view_cache(cache);
  const int64_t B = k.shape(0), T = k.shape(1);
  if (k.shape(2) != c.row_bytes || v.shape(2) != c.row_bytes)
    throw std::invalid_argument("k/v row size does not match the cache");
  const int64_t max_blocks = block_tables.shape(1);
  const int32_t* bt = block_tables.data();
  const int64_t* sp = start_pos.data();
  const int64_t* ln = lens.data();
  const uint8_t* kp = k.data();
  const uint8_t* vp = v.data();
  // validate first so that a bad call writes nothing
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < ln[b]; ++t) block_of(bt, max_blocks, b, sp[b] + t, c);
  py::gil_scoped_release nogil;
  // threads only when there is real volume to move (a fork/join costs more than a
  // few kilobytes of memcpy, and far more on a loaded machine)
  const bool par = B * T * c.row_bytes * 2 > (int64_t(1) << 22);
#pragma omp parallel for collapse(2) if (par)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      if (t >= ln[b]) continue;
      int64_t pos = sp[b] + t;
      int64_t blk = bt[b * max_blocks + pos / c.block_size];
      int64_t off = pos % c.block_size;
      std::memcpy(c.row(blk, 0, off), kp + (b * T + t) * c.row_bytes, c.row_bytes);
      std::memcpy(c.row(blk, 1, off), vp + (b * T + t) * c.row_bytes, c.row_bytes);
    }
  }
}

void commit_kv(u8arr cache, i32arr block_tables, i64arr prefix_lens, i64arr path,
               i64arr path_lens) {
  CacheView c = view_cache(cache);
  const int64_t B = path.shape(0), P = path.shape(1);
  const int64_t max_blocks = block_tables.shape(1);
  const int32_t* bt = block_tables.data();
  const int64_t* pl = prefix_lens.data();
  const int64_t* pa = path.data();
  const int64_t* ln = path_lens.data();
  for (int64_t b = 0; b < B; ++b) {
    if (ln[b] > P) throw std::invalid_argument("path_lens exceeds path width");
    for (int64_t i = 0; i < ln[b]; ++i) {
      if (pa[b * P + i] < i || (i > 0 && pa[b * P + i] <= pa[b * P + i - 1]))
        throw std::invalid_argument("path node indices must be increasing");
      block_of(bt, max_blocks, b, pl[b] + pa[b * P + i], c);
    }
  }
  py::gil_scoped_release nogil;
  const bool par = B * P * c.row_bytes * 2 > (int64_t(1) << 22);
#pragma omp parallel for if (par)
  for (int64_t b = 0; b < B; ++b) {
    // path[i] >= i and increasing: destination i is never a later source, so an
    // in-order copy reads every source before anything overwrites it.
    for (int64_t i = 0; i < ln[b]; ++i) {
      int64_t src = pl[b] + pa[b * P + i], dst = pl[b] + i;
      if (src == dst) continue;
      int64_t sb = bt[b * max_blocks + src / c.block_size], so = src % c.block_size;
      int64_t db = bt[b * max_blocks + dst / c.block_size], dof = dst % c.block_size;
      for (int kv = 0; kv < 2; ++kv)
        std::memcpy(c.row(db, kv, dof), c.row(sb, kv, so), c.row_bytes);
    }
  }
}

}  // namespace

void bind_kv(py::module_& m) {
  m.def("append_kv", &append_kv, "CPU append_kv over a uint8 view of the paged cache",
        py::arg("cache"), py::arg("block_tables"), py::arg("start_pos"), py::arg("k"),
        py::arg("v"), py::arg("lens"));
  m.def("commit_kv", &commit_kv, "CPU commit_kv over a uint8 view of the paged cache",
        py::arg("cache"), py::arg("block_tables"), py::arg("prefix_lens"), py::arg("path"),
        py::arg("path_lens"));
}

// specrt._C: one module, each op family registers itself.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_kv(py::module_& m);      // kv_cpu.cpp
void bind_verify(py::module_& m);  // verify_cpu.cpp
void bind_gemm(py::module_& m);    // gemm_cpu.cpp
void bind_gemm_bf16(py::module_& m);  // gemm_bf16_cpu.cpp
void bind_attention(py::module_& m);  // attention_cpu.cpp
void bind_decoder(py::module_& m);    // decoder_cpu.cpp
#ifdef SPECRT_WITH_CUDA
void bind_kv_cuda(py::module_& m);      // kv_cuda.cu
void bind_verify_cuda(py::module_& m);  // verify_cuda.cu
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "specrt native ops (CPU always; CUDA when built with nvcc)";
  bind_kv(m);
  bind_verify(m);
  bind_gemm(m);
  bind_gemm_bf16(m);
  bind_attention(m);
  bind_decoder(m);
#ifdef SPECRT_WITH_CUDA
  m.attr("with_cuda") = true;
  bind_kv_cuda(m);
  bind_verify_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
}

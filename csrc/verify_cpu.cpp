// CPU rejection sampling over draft trees (verify_tree / chain_verify).
// Filled in by the rejection-sampling work; registers nothing yet.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_verify(py::module_& m) { (void)m; }

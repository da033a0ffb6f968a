// fastinf._C: CPU hot loops for fastinf (pybind11, C++17, no torch linkage).
// Each entry point registers itself from its own translation unit via a register_* function.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastinf {
void register_aggregate(py::module_& m);  // csrc/aggregate.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastinf C++ hot loops (rank/vote accumulation, ...); numpy references live in fastinf/";
  m.attr("__version__") = "0.1.0";
  fastinf::register_aggregate(m);
}

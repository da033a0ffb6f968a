// Rank / vote accumulation over score blocks. Filled by the aggregation work (issue 4).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastinf {
void register_aggregate(py::module_& m) { (void)m; }
}  // namespace fastinf

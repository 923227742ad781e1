// fedcompress._C: the one PYBIND11_MODULE. Ops register themselves (registry.h).
#include <omp.h>

#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fedcompress C++ kernels (OpenMP)";
  m.def("max_threads", []() { return omp_get_max_threads(); }, "OpenMP threads a parallel region uses");
  m.def("set_threads", [](int n) {
    if (n < 1) throw pybind11::value_error("n must be >= 1");
    omp_set_num_threads(n);
  }, pybind11::arg("n"));
  for (auto& bind : fc::binders()) bind(m);
}

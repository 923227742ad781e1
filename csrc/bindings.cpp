// fedcompress._C: the one PYBIND11_MODULE. Ops register themselves (registry.h).
#include "pool.h"
#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fedcompress C++ kernels (threads: the extension's own pool, csrc/pool.h)";
  m.def("max_threads", []() { return fc::pool::max_threads(); },
        "threads a native op may use: set_threads(n) when set, else omp_get_max_threads() (torch.get_num_threads())");
  m.def("set_threads", [](int n) {
    if (n < 0) throw pybind11::value_error("n must be >= 0 (0: follow torch.get_num_threads())");
    fc::pool::override_threads().store(n);
  }, pybind11::arg("n"), "threads for native ops; 0 goes back to following torch.get_num_threads()");
  m.def("thread_override", []() { return fc::pool::override_threads().load(); }, "set_threads' value (0: none)");
  m.def("pool_jobs", []() { return fc::pool::jobs_dispatched().load(); },
        "how many parallel_for calls have gone to helper threads (tests: the single-thread path)");
  m.def("pool_free_cpus", []() { return fc::pool::free_cpus(); },
        "cores free right now by /proc/loadavg (the load gate's input; the caller counts as free)");
  m.def("pool_load_gate", [](bool on) {
    fc::pool::load_gate().store(on);
  }, pybind11::arg("on"), "tests: False lets ops use helpers however busy the machine is (default True)");
  for (auto& bind : fc::binders()) bind(m);
}

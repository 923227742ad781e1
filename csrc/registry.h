// Each csrc/<op>.cpp registers its Python bindings here with one static FC_BIND(...) line, so
// adding an op never touches bindings.cpp (which only walks the list).
#pragma once
#include <pybind11/pybind11.h>

#include <functional>
#include <vector>

namespace fc {
namespace py = pybind11;
using Binder = std::function<void(py::module_&)>;

inline std::vector<Binder>& binders() {
  static std::vector<Binder> list;  // function-local: safe against static init order
  return list;
}

struct RegisterBinder {
  explicit RegisterBinder(Binder b) { binders().push_back(std::move(b)); }
};
}  // namespace fc

#define FC_CONCAT_(a, b) a##b
#define FC_CONCAT(a, b) FC_CONCAT_(a, b)
#define FC_BIND(fn) static ::fc::RegisterBinder FC_CONCAT(fc_binder_, __LINE__)(fn)

// The buffers of a list of Python objects (bytes, memoryviews, numpy arrays: C-contiguous, read-only
// is fine), held for the life of the object and released on scope exit, so native code can read
// them with the GIL released while the list keeps the objects alive.
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

namespace fc {
struct Buffers {
  std::vector<Py_buffer> v;
  explicit Buffers(const pybind11::list& objs) {
    v.reserve(objs.size());
    for (pybind11::handle o : objs) {
      Py_buffer b;
      if (PyObject_GetBuffer(o.ptr(), &b, PyBUF_C_CONTIGUOUS) != 0) throw pybind11::error_already_set();
      v.push_back(b);
    }
  }
  ~Buffers() {
    for (auto& b : v) PyBuffer_Release(&b);
  }
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;
};
}  // namespace fc

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "packing.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_train's C++ host-side helpers";
  m.def(
      "plan_packing",
      [](py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths, int64_t max_tokens,
         bool split_long) {
        if (lengths.ndim() != 1) throw std::invalid_argument("lengths must be one-dimensional");
        const int64_t* data = lengths.data();
        const int64_t count = lengths.shape(0);
        py::gil_scoped_release release;
        return fused_train::plan_packing(data, count, max_tokens, split_long);
      },
      py::arg("lengths"), py::arg("max_tokens"), py::arg("split_long") = true,
      "Best-fit-decreasing packing; returns document indices per row.");
}

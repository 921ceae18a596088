#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <utility>

#include "packing.h"

namespace py = pybind11;

namespace {

// A numpy array that takes over the vector's buffer instead of copying it.
py::array_t<int64_t> as_numpy(std::vector<int64_t>&& values) {
  auto* owned = new std::vector<int64_t>(std::move(values));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>(static_cast<py::ssize_t>(owned->size()), owned->data(), owner);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_train's C++ host-side helpers";
  m.attr("DENSE_MAX_TOKENS") = fused_train::kDenseMaxTokens;
  m.def(
      "plan_packing",
      [](py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths, int64_t max_tokens,
         bool split_long) {
        if (lengths.ndim() != 1) throw std::invalid_argument("lengths must be one-dimensional");
        fused_train::PackingPlan plan;
        {
          py::gil_scoped_release release;
          plan = fused_train::plan_packing(lengths.data(), lengths.shape(0), max_tokens, split_long);
        }
        return py::make_tuple(as_numpy(std::move(plan.row_offsets)), as_numpy(std::move(plan.doc_ids)));
      },
      py::arg("lengths"), py::arg("max_tokens"), py::arg("split_long") = true,
      "Best-fit-decreasing packing; returns (row_offsets, doc_ids): row r holds "
      "doc_ids[row_offsets[r]:row_offsets[r + 1]].");
}

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <utility>

#include "packing.h"

namespace py = pybind11;

namespace {

using LengthsArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// A numpy array that takes over the vector's buffer instead of copying it.
py::array_t<int64_t> as_numpy(std::vector<int64_t>&& values) {
  auto* owned = new std::vector<int64_t>(std::move(values));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>(static_cast<py::ssize_t>(owned->size()), owned->data(), owner);
}

fused_train::PackingPlan plan_without_gil(const LengthsArray& lengths, int64_t max_tokens, bool split_long) {
  if (lengths.ndim() != 1) throw std::invalid_argument("lengths must be one-dimensional");
  py::gil_scoped_release release;
  return fused_train::plan_packing(lengths.data(), lengths.shape(0), max_tokens, split_long);
}

// Keeps Python's cyclic garbage collector off for its lifetime, then restores its previous state.
// On Python <= 3.11 any list allocated may start a collection: the ~10^5 row lists of a plan of
// 10^6 documents started ~145, and one swept the whole heap of a process that had imported
// transformers (0.16 s, ten times the planning). Holding the GIL from start to end and running no
// Python code in between, no other thread sees the collector off or turns it on or off meanwhile.
class GcPaused {
 public:
  GcPaused() : was_enabled_(PyGC_Disable()) {}
  ~GcPaused() {
    if (was_enabled_) PyGC_Enable();
  }
  GcPaused(const GcPaused&) = delete;
  GcPaused& operator=(const GcPaused&) = delete;

 private:
  int was_enabled_;
};

// The plan as a list of lists of Python ints, row r holding doc_ids[row_offsets[r]:row_offsets[r + 1]].
py::list as_lists(const fused_train::PackingPlan& plan) {
  const size_t num_rows = plan.row_offsets.size() - 1;
  GcPaused gc_paused;
  py::list rows(num_rows);
  for (size_t r = 0; r < num_rows; ++r) {
    const int64_t start = plan.row_offsets[r];
    const int64_t size = plan.row_offsets[r + 1] - start;
    py::list row(static_cast<size_t>(size));
    for (int64_t i = 0; i < size; ++i) {
      PyObject* doc = PyLong_FromLongLong(plan.doc_ids[static_cast<size_t>(start + i)]);
      if (doc == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(row.ptr(), i, doc);  // steals the reference
    }
    PyList_SET_ITEM(rows.ptr(), static_cast<py::ssize_t>(r), row.release().ptr());
  }
  return rows;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_train's C++ host-side helpers";
  m.attr("DENSE_MAX_TOKENS") = fused_train::kDenseMaxTokens;
  m.def(
      "plan_packing",
      [](const LengthsArray& lengths, int64_t max_tokens, bool split_long) {
        fused_train::PackingPlan plan = plan_without_gil(lengths, max_tokens, split_long);
        return py::make_tuple(as_numpy(std::move(plan.row_offsets)), as_numpy(std::move(plan.doc_ids)));
      },
      py::arg("lengths"), py::arg("max_tokens"), py::arg("split_long") = true,
      "Best-fit-decreasing packing; returns (row_offsets, doc_ids): row r holds "
      "doc_ids[row_offsets[r]:row_offsets[r + 1]].");
  m.def(
      "plan_packing_lists",
      [](const LengthsArray& lengths, int64_t max_tokens, bool split_long) {
        return as_lists(plan_without_gil(lengths, max_tokens, split_long));
      },
      py::arg("lengths"), py::arg("max_tokens"), py::arg("split_long") = true,
      "plan_packing's plan as a list of the document indices of each row.");
}

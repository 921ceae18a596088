"""Build: the Python packages plus the C++ packing planner `fused_train._C` (pybind11, ninja)."""

import glob

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension

# `kernels/` ships as `fused_train.kernels`: a top-level `kernels` package already exists on PyPI.
setup(
    packages=[
        "fused_train", "fused_train.hf", "fused_train.kernels", "fused_train.ops", "fused_train.serving",
        "fused_train.training",
    ],  # fmt: skip
    ext_modules=[
        Pybind11Extension(
            "fused_train._C",
            sorted(glob.glob("csrc/*.cpp")),
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

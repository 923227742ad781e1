"""Builds fedcompress._C (C++17, pybind11, OpenMP) and maps top-level kernels/ to fedcompress.kernels.

Portable by default: no -march=native (the mask kernel uses per-function target clones for
AVX2/AVX-512 instead). FEDCOMPRESS_NATIVE=1 adds -march=native for a local build.
FEDCOMPRESS_SANITIZE=1 builds with -fsanitize=address,undefined (for the sanitizer test job).
"""

import glob
import os
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

ParallelCompile("FEDCOMPRESS_BUILD_JOBS", default=0).install()

compile_args = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
link_args = ["-fopenmp"]
if os.environ.get("FEDCOMPRESS_NATIVE") == "1":
    compile_args.append("-march=native")
if os.environ.get("FEDCOMPRESS_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    compile_args = [a for a in compile_args if a != "-O3"] + ["-O1"] + san
    link_args += san
if sys.platform == "darwin":  # Apple clang has no -fopenmp without libomp; build single-threaded
    compile_args = [a for a in compile_args if a != "-fopenmp"]
    link_args = [a for a in link_args if a != "-fopenmp"]

ext = Pybind11Extension(
    "fedcompress._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    cxx_std=17,
)

packages = find_packages(include=["fedcompress", "fedcompress.*"]) + ["fedcompress.kernels"]

setup(
    packages=packages,
    package_dir={"fedcompress.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)

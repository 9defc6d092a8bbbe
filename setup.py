"""Build of lowbit's native kernels (``lowbit._native._kernels``); the project metadata lives in pyproject.toml.

The extension is optional: if the compiler cannot build it, installation
still succeeds and ``lowbit.runtime`` runs its numpy kernels
(``available_kernels()`` then reports only ``"numpy"``).
"""

import sys

from setuptools import Extension, setup

_UNIX = sys.platform != "win32"

kernels = Extension(
    "lowbit._native._kernels",
    sources=["src/lowbit/_native/kernels.cpp", "src/lowbit/_native/module.cpp"],
    depends=["src/lowbit/_native/kernels.h"],
    extra_compile_args=["-std=c++17", "-O3", "-fopenmp", "-ffp-contract=off"] if _UNIX else ["/std:c++17", "/O2", "/openmp"],
    extra_link_args=["-fopenmp"] if _UNIX else [],
    language="c++",
    optional=True,
)

setup(ext_modules=[kernels])

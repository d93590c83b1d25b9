"""Build script: the package plus the pybind11 index helpers (megatron_lsh.data._helpers)."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "megatron_lsh.data._helpers",
        ["megatron_lsh/data/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})

"""Build script: the package plus its pybind11 extensions.

megatron_lsh.data._helpers: the dataset index builders; megatron_lsh.moe.compressors._split:
the CPU split rounds of the target-rate LSH clustering. Both have pure-Python fallbacks.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "megatron_lsh.data._helpers",
        ["megatron_lsh/data/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
    Pybind11Extension(
        "megatron_lsh.moe.compressors._split",
        ["megatron_lsh/moe/compressors/split_rounds.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})

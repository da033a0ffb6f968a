"""Build script: only declares the C++ extension ``fastinf._C`` (CPU hot loops, see csrc/).

Everything else lives in pyproject.toml. The extension links no torch: it works on numpy buffers.
"""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "fastinf._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-pthread"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})

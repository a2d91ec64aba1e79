"""Find the CUDA toolkit and the CUDA headers that pip's torch wheels ship (used by setup.py and CMake)."""
import glob
import os
import shutil
import sysconfig


def _is_cuda_home(path):
    return bool(path) and os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.exists(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """CUDA_HOME/CUDA_PATH, else the toolkit that `nvcc` on PATH really runs, else /usr/local/cuda."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if _is_cuda_home(os.environ.get(env)):
            return os.environ[env]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if _is_cuda_home(home):
            return home
        # A launcher script (`exec /opt/cuda-X/bin/nvcc "$@"`): read the path it runs.
        try:
            with open(real, "r", errors="ignore") as f:
                for word in f.read(4096).split():
                    word = word.strip("'\"")
                    if word.endswith("/bin/nvcc"):
                        home = os.path.dirname(os.path.dirname(word))
                        if _is_cuda_home(home):
                            return home
        except OSError:
            pass
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_cuda_home(home):
            return home
    return None


def nvidia_pip_include_dirs():
    """nvidia/<pkg>/include folders of pip's CUDA packages (CUDAContext.h includes cublas/cusparse headers)."""
    site = sysconfig.get_paths()["purelib"]
    dirs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def cmake_args():
    """-D flags that let torch's CMake config find CUDA here (toolkit root; nvrtc from pip if the toolkit lacks it)."""
    import torch
    args = ["-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path]
    if torch.version.cuda is None:
        return args
    home = find_cuda_home()
    if home:
        args += ["-DCUDA_TOOLKIT_ROOT_DIR=" + home, "-DCUDAToolkit_ROOT=" + home,
                 "-DCMAKE_CUDA_COMPILER=" + os.path.join(home, "bin", "nvcc")]
        if not glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")):
            site = sysconfig.get_paths()["purelib"]
            found = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
            found = [f for f in found if "builtins" not in f and ".alt." not in f]
            if found:
                args.append("-DCUDA_nvrtc_LIBRARY=" + found[0])
    return args


if __name__ == "__main__":
    import sys
    what = sys.argv[1] if len(sys.argv) > 1 else "home"
    if what == "home":
        print(find_cuda_home() or "")
    elif what == "cmake":
        print(" ".join(cmake_args()))
    else:
        print(";".join(nvidia_pip_include_dirs()))

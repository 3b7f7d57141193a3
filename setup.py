"""Build of hybrid_accel and its extension hybrid_accel._C.

Environment switches (all optional):
  HYBRID_ACCEL_SKIP_EXT=1          build no extension at all (the package falls back to PyTorch ops)
  HYBRID_ACCEL_BUILD_CUDA=auto|1|0 CUDA kernels: auto (default) = when torch has CUDA and nvcc is found;
                                   1 = required (fail if impossible); 0 = CPU kernels only
  HYBRID_ACCEL_CUDA_ARCHS="8.0;9.0" target architectures (default Ampere and Hopper; +PTX is added to the last)
  HYBRID_ACCEL_DEBUG=1             -O0 -g (and -G -lineinfo for CUDA)
  CUDA_HOME=/usr/local/cuda        the CUDA toolkit (default: the nvcc on PATH if its folder has headers, else
                                   /usr/local/cuda)
  MAX_JOBS=N                       parallel compile jobs (ninja)

Build without isolation so the extension links the torch it will run with:
  pip install --no-build-isolation -e .
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env(name, default=""):
    return os.environ.get(name, default).strip().lower()


def _truthy(v):
    return v in ("1", "true", "yes", "on")


def _falsy(v):
    return v in ("0", "false", "no", "off")


def _cuda_include_dirs():
    """Extra CUDA headers shipped inside the pip `nvidia` packages (cusparse.h for torch's headers)."""
    dirs = []
    for sp in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cusparse/include"):
            d = os.path.join(sp, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _guess_cuda_home():
    """A CUDA_HOME with headers, when the user set none.

    torch guesses the parent of the `nvcc` on PATH, which is wrong where PATH holds a wrapper
    (/usr/local/bin/nvcc here): the link then fails. Prefer a folder that has the toolkit's headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + [
        "/usr/local/cuda", "/opt/cuda"]
    for c in candidates:
        if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(os.path.join(c, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = c
            return


def _extensions():
    if _truthy(_env("HYBRID_ACCEL_SKIP_EXT")):
        print("hybrid_accel: HYBRID_ACCEL_SKIP_EXT set, building no extension (PyTorch fallbacks only)")
        return [], {}
    _guess_cuda_home()  # before torch.utils.cpp_extension reads it at import
    import torch
    from torch.utils import cpp_extension

    debug = _truthy(_env("HYBRID_ACCEL_DEBUG"))
    want = _env("HYBRID_ACCEL_BUILD_CUDA", "auto") or "auto"
    if want not in ("auto", "1", "0", "true", "false", "on", "off", "yes", "no"):
        raise RuntimeError(f"HYBRID_ACCEL_BUILD_CUDA must be auto, 1 or 0, got {want!r}")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    have_nvcc = bool(nvcc and os.path.exists(nvcc)) or shutil.which("nvcc") is not None
    torch_cuda = torch.version.cuda is not None
    if _falsy(want):
        with_cuda = False
    elif _truthy(want):
        if not (torch_cuda and have_nvcc):
            raise RuntimeError(
                "HYBRID_ACCEL_BUILD_CUDA=1 but CUDA kernels cannot be built: "
                f"torch CUDA version = {torch.version.cuda}, CUDA_HOME = {cuda_home!r}, nvcc found = {have_nvcc}. "
                "Install a CUDA build of torch and point CUDA_HOME at the toolkit (e.g. CUDA_HOME=/usr/local/cuda)."
            )
        with_cuda = True
    else:
        with_cuda = torch_cuda and have_nvcc
    print(f"hybrid_accel: building CPU kernels{' and CUDA kernels' if with_cuda else ''} "
          f"(torch {torch.__version__}, CUDA_HOME={cuda_home})")

    opt = ["-O0", "-g"] if debug else ["-O3"]
    # no -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20)
    cxx = opt + ["-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        archs = os.environ.get("HYBRID_ACCEL_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        # torch reads TORCH_CUDA_ARCH_LIST to pick -gencode flags; PTX of the newest arch keeps newer GPUs working
        arch_list = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
        if not any(a.endswith("+PTX") for a in arch_list):
            arch_list[-1] += "+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arch_list)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        include_dirs += _cuda_include_dirs()
        nvcc_flags = (["-O0", "-g", "-G", "-lineinfo"] if debug else ["-O3", "-lineinfo"]) + [
            "--expt-relaxed-constexpr",
        ]
        define_macros.append(("HYBRID_ACCEL_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "hybrid_accel._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, py_limited_api=False, **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(
            "hybrid_accel._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, py_limited_api=False, **kwargs,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

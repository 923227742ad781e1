"""The C++ extension built with -fsanitize=address,undefined, running the C++ op tests under it.

Builds a private copy of the package (the installed extension is untouched), preloads libasan into a
child pytest, and fails on any sanitizer report. Set FEDCOMPRESS_SKIP_SANITIZERS=1 to skip locally.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the C++ tests to run under the sanitizers (each file's cpp-backend cases)
SANITIZED_TESTS = ["tests/test_ops.py", "tests/test_sz.py", "tests/test_mask.py", "tests/test_properties.py",
                   # the extension's CRC-32 (csrc/crc32.cpp) behind every payload's checksum
                   "tests/test_wire.py",
                   # the FedSynth C++ kernels (csrc/synth.cpp)
                   "tests/test_synth.py::test_conv_pool", "tests/test_synth.py::test_conv_at_and_bwd",
                   "tests/test_synth.py::test_col2im", "tests/test_synth.py::test_im2col",
                   # the extension's thread pool (csrc/pool.h): every op at 1, 2 and 4 threads, concurrent callers
                   "tests/test_threads.py"]
# the C++ decoders the fuzz pass under the sanitizers attacks
FUZZ_TARGETS = "sz,mask,sz-tensor:cpp,mask-tensor:cpp,mask-mean:cpp"


def _gcc_lib(name: str) -> str | None:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    p = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return p if os.path.isabs(p) and os.path.exists(p) else None


@pytest.mark.skipif(os.environ.get("FEDCOMPRESS_SKIP_SANITIZERS") == "1", reason="FEDCOMPRESS_SKIP_SANITIZERS=1")
def test_cpp_ops_under_asan_and_ubsan(tmp_path):
    asan, stdcxx = _gcc_lib("libasan.so"), _gcc_lib("libstdc++.so")
    if asan is None or stdcxx is None:
        pytest.skip("no g++ with libasan on this machine")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "fedcompress", src / "fedcompress", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "kernels", src / "fedcompress" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copy(ROOT / "setup.py", src / "setup.py")
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    shutil.copy(ROOT / "README.md", src / "README.md") if (ROOT / "README.md").exists() else None
    env = dict(os.environ, FEDCOMPRESS_SANITIZE="1")
    b = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env,
                       capture_output=True, text=True, timeout=900)
    assert b.returncode == 0, b.stderr[-3000:]
    tests = [str(ROOT / t) for t in SANITIZED_TESTS if (ROOT / t).exists()]
    env = dict(
        os.environ,
        PYTHONPATH=str(src),
        # libstdc++ too: python does not link it, and ASan's __cxa_throw interceptor must find it at
        # start-up (else the first C++ exception aborts with "real___cxa_throw != 0")
        LD_PRELOAD=f"{asan} {stdcxx}",
        # torch and CPython are not ASan-built: leaks and their own allocator quirks are not our reports
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allow_user_segv_handler=1:detect_odr_violation=0",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        FEDCOMPRESS_SKIP_SANITIZERS="1",
    )
    code = (
        "import fedcompress._C as C, sys; assert C.__file__.startswith(sys.argv[1]), C.__file__;"
        "import pytest; sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider',"
        " '-k', 'not triton and not cuda_source', '--rootdir', sys.argv[2]] + sys.argv[3:]))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(src), str(ROOT)] + tests, cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    out = r.stdout[-4000:] + r.stderr[-4000:]
    assert "runtime error" not in out and "AddressSanitizer" not in out, out
    assert r.returncode == 0, out
    # and a short fuzz pass of the C++ decoders under the same sanitizers
    r = subprocess.run([sys.executable, "-m", "fedcompress.fuzz", "--targets", FUZZ_TARGETS, "--cases", "20000",
                        "--chunk", "10000", "--seconds", "40", "--hang-seconds", "10"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout[-4000:] + r.stderr[-4000:]
    assert "runtime error" not in out and "AddressSanitizer" not in out, out
    assert r.returncode == 0 and "crashes 0, hangs 0, other errors 0, undetected corruptions 0" in out, out

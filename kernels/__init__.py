"""Triton kernels (installed as fedcompress.kernels). Each module: launcher beside its kernel; the torch
reference it must match lives in the fedcompress module named in fedcompress/_ops.py.

Under TRITON_INTERPRET=1 (set before import) these run on CPU tensors, for correctness tests only.
"""

# Elements per program of the elementwise kernels, shared by every module. On a GPU any power of two
# of this order saturates memory bandwidth; under the interpreter each program instance has a fixed
# cost (shared/notes/triton-interpreter.md), so blocks of >= 16K elements keep the tests fast.
BLOCK = 16384

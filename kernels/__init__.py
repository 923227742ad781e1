"""Triton kernels (installed as fedcompress.kernels). Each module: launcher beside its kernel; the torch
reference it must match lives in the fedcompress module named in fedcompress/_ops.py.

Under TRITON_INTERPRET=1 (set before import) these run on CPU tensors, for correctness tests only.
"""

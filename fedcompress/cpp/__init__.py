"""Python adapters of the C++ extension ``fedcompress._C``, one module per op family, named as kernels/
(Triton) and csrc/ (C++) are: ``cpp/mask.py``, ``cpp/sz.py`` and ``cpp/synth.py`` adapt csrc/mask.cpp,
csrc/sz.cpp and csrc/synth.cpp, as ``kernels/*.py`` are the Triton side of the same ops. Each adapter
turns CPU tensors into numpy views, calls ``_C`` and raises ``FormatError`` for what the kernel
reports as bad input; ``fedcompress._ops`` declares them.

Importing this package never imports ``_C``: an adapter reaches it through ``_ops.native()`` when
called, so a missing build says what to do only when asked for.
"""

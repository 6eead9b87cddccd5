"""oq-toolkit: the kernel-building toolkit shared by oqcore's scheme plugins.

Not a scheme and not a plugin (it registers nothing): plugins import it for the machinery their
quantizers and forward backends need, so the core names no kernel technology.

- :mod:`oq_toolkit.native`: C sources compiled once per machine with the system compiler, cached
  by content (source, included headers, compiler, flags, CPU) and loaded through ctypes
  (:class:`~oq_toolkit.native.NativeLibrary`); ``include/oq_kernels.h`` holds the C helpers every
  kernel shares (exact fp16/bf16 -> float32 loads, AVX-512 masked loads, prefetch).
- :mod:`oq_toolkit.compiled`: ``torch.compile`` (inductor) with an eager fallback (``OQ_COMPILE``).
- :mod:`oq_toolkit.triton_support`: whether Triton kernels can run on a device, and a guard that
  turns a missing Triton driver at run time into :class:`oqcore.NoBackendError` (``OQ_DISABLE_TRITON``).
- :mod:`oq_toolkit.quantizers`: the quantizer implementation records (``triton``, ``cpu``,
  ``compiled``) with their shared support rules and priorities.

Importing this package imports none of them (each is imported where it is used).
"""

__version__ = "0.1.0"

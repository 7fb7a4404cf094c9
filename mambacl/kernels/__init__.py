"""Selective-scan kernels: sequential references, a chunked PyTorch path and Triton kernels.

Imports only torch (and triton lazily, for CUDA tensors).

Non-finite inputs: ``selective_scan`` and ``longhorn_scan`` raise a ValueError naming every input that holds NaN or
inf. The check is one ``aminmax`` pass per input and one host read per call. That read is free on the CPU but on
CUDA it synchronises the stream (48 times per Vim-tiny forward), so there the check is opt-in:
``MAMBACL_CHECK_FINITE=1`` turns it on for every device, ``0`` off, unset means on except on CUDA. A flag reduced
on the device and read only later was not chosen: computing it reads every input once more (nearly the traffic of
the memory-bound scan forward itself) and the error would surface far from the call that caused it; NaN inputs
still reach the output (and the loss), where training loops look.
"""
from .longhorn_scan import longhorn_scan, longhorn_scan_ref
from .selective_scan import selective_scan, selective_scan_fn, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_ref", "longhorn_scan", "longhorn_scan_ref"]

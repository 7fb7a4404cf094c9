"""Selective-scan kernels: sequential references, a chunked PyTorch path and Triton kernels.

Imports only torch (and triton lazily, for CUDA tensors).
"""
from .longhorn_scan import longhorn_scan, longhorn_scan_ref
from .selective_scan import selective_scan, selective_scan_fn, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_fn", "selective_scan_ref", "longhorn_scan", "longhorn_scan_ref"]

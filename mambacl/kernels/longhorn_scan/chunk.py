"""TEMPORARY placeholder: the chunked CPU path is being written; forwards to the reference."""
from .ref import longhorn_scan_ref as longhorn_scan_chunk  # noqa: F401

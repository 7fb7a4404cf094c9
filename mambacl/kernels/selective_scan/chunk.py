"""TEMPORARY placeholder: the chunked CPU path is being written; forwards to the reference."""
from .ref import selective_scan_ref as selective_scan_chunk  # noqa: F401

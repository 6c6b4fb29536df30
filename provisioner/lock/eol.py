"""Line endings: text files provisioner hashes or compares are read as LF text.

Git on Windows checks text out with CRLF (``core.autocrlf=true``) unless
``.gitattributes`` says otherwise, and editors may save CRLF. A spec or a lock
means the same with either line ending, so every hash or byte comparison of a
text file provisioner wrote (a lock, the spec a seal covers) goes through
:func:`lf_bytes`: a CRLF checkout is then neither "stale" nor rewritten.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["lf_bytes", "read_lf_bytes"]


def lf_bytes(raw: bytes) -> bytes:
    """``raw`` with every CRLF turned into LF (a lone CR is content and stays)."""
    return raw.replace(b"\r\n", b"\n")


def read_lf_bytes(path: Path) -> bytes:
    """The bytes of the text file ``path``, line endings normalised to LF."""
    return lf_bytes(path.read_bytes())

"""Durable before declared: an env's files reach the disk before its fingerprint.

The fingerprint is what makes an env ready; after a power loss it must not
declare files that were still in the page cache.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from provisioner.fsops import fsync_dir
from provisioner.paths import os_path


def flush_tree(path: Path) -> None:
    """Put every file under ``path`` on disk before a fingerprint declares it complete.

    Linux: one ``syncfs(2)`` on the filesystem that holds ``path`` (one call, however
    many files); elsewhere, or if that fails, ``fsync`` of every file and directory.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for root, _dirs, files in os.walk(os_path(path)):
        for name in files:
            full = os.path.join(root, name)
            if os.path.islink(full):
                continue
            with contextlib.suppress(OSError):
                fd = os.open(full, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(root))

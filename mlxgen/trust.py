"""Is a file on disk ours alone? Checked before mlxgen imports or trusts what it finds in its cache.

A file that another user (or any process of another user) could have written must not be loaded
as code, nor used as a secret: it must be owned by this user (or root), not be a symlink, and
neither it nor its directory may be writable by group or others."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def untrusted_reason(path: str | os.PathLike, secret: bool = False) -> str | None:
    """None when path is safe to load (secret=True: also readable by this user only), else why not."""
    path = Path(path)
    try:
        st = os.lstat(path)
        parent = os.stat(path.parent)
    except OSError as e:
        return f"cannot stat it ({e})"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
        return f"it is owned by uid {st.st_uid}, not by this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "it is writable by group or others"
    if secret and st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        return "it is readable by group or others"
    if parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX:
        return f"its directory {path.parent} is writable by group or others"
    return None


def safe_to_load(path: str | os.PathLike) -> bool:
    """True when a library found on disk may be imported (see untrusted_reason)."""
    return untrusted_reason(path) is None


def check_private_file(path: str | os.PathLike) -> str | None:
    """untrusted_reason for a secret (a key file): also not readable by group or others."""
    return untrusted_reason(path, secret=True)

"""Crash-safe file replacement: the one way fedsync writes a file that must never be half there.

Every file a reader may open while (or after) it is written — a checkpoint, the device's
outbox, password and key files, the rendered broker setup — goes through
:func:`write_atomic`: the bytes go to a temporary file beside the target, are flushed to
disk (``fsync``), and the temporary file is renamed over the target (``os.replace``, atomic
on POSIX within one file system), after which the directory is synced so that the rename
itself survives a power cut. A crash at any point leaves either the old file or the new
one, never a mix.

Permissions: with ``mode`` the new file has exactly that mode (the umask does not apply),
set before a byte is written, so a secret is never readable by others even for an instant.
Without it the file gets the default ``0o666`` minus the umask, as ``open(path, "w")`` would.
The new file is a new inode owned by the writer: a previous owner or mode is not kept.

One writer per target at a time: the temporary name is fixed (``NAME.tmp``), so a crash
leaves at most one stale temporary file, which the next write replaces.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes | str, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8) so a crash leaves old or new.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> write_atomic(os.path.join(d, "secret.pw"), "s3cret\\n", mode=0o600)
    >>> oct(os.stat(os.path.join(d, "secret.pw")).st_mode & 0o777), open(os.path.join(d, "secret.pw")).read()
    ('0o600', 's3cret\\n')
    """
    target = Path(path)
    body = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = target.with_name(target.name + ".tmp")
    # O_NOFOLLOW: a symlink planted at the temporary name must not redirect the write.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666 if mode is None else 0o600)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask and ignored for an existing file
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)

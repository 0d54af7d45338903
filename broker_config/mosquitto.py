"""mosquitto 2.0 for fedsync: finding it, its config file, its password file, its account.

What both the production renderer (``fedsync.broker_config.render``, ``fedsync
broker-config``) and the managed test broker (``fedsync.broker_config.process``) need:

* :func:`find_program` and :func:`mosquitto_available` — mosquitto installs into sbin,
  which is often not on a normal user's ``PATH``;
* :func:`render_mosquitto_conf` — ``mosquitto.conf.template`` filled in (every setting
  and the measurement behind it is explained in the template);
* :func:`write_mosquitto_password_file` — hashed by ``mosquitto_passwd -U``;
* :func:`mosquitto_account` and :func:`can_traverse` — mosquitto started as root drops to
  the ``mosquitto`` user *before* it opens its password, ACL and persistence files
  (measured with 2.0.11), so whoever writes them must hand them to that account.

No state: every function reads or writes only what its arguments name.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import string
import subprocess
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from fedsync.atomic import write_atomic

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_program(name: str) -> str | None:
    """The path of ``name`` on ``PATH`` or in an sbin directory, or None.

    >>> find_program("no-such-program-here") is None
    True
    """
    # mosquitto installs into sbin, which is often not on a normal user's PATH.
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def mosquitto_available() -> bool:
    """True if the mosquitto broker and mosquitto_passwd can be run here."""
    return find_program("mosquitto") is not None and find_program("mosquitto_passwd") is not None


def render_mosquitto_conf(
    port: int,
    data_dir: str,
    password_file: str | None,
    acl_file: str | None,
    max_packet_size: int = 8 * 1024 * 1024,
    max_queued_messages: int = 100_000,
    *,
    max_queued_bytes: int = 0,
    memory_limit: int = 0,
    user: str | None = None,
    listeners: str | None = None,
    extra_settings: str = "",
) -> str:
    """Return a mosquitto 2.0 configuration listening on 127.0.0.1:``port``.

    ``password_file`` turns anonymous login off; ``acl_file`` restricts topics per user;
    ``user`` overrides the account mosquitto drops to when started as root;
    ``memory_limit`` caps the broker's heap in bytes (0: no cap). Every
    setting is explained in ``mosquitto.conf.template``. ``listeners`` replaces the
    loopback listener with the given block (``fedsync broker-config`` passes its TLS
    listeners); ``extra_settings`` is appended verbatim.

    >>> conf = render_mosquitto_conf(1883, "/var/lib/fedsync/mosquitto", "/etc/fedsync/passwd", None)
    >>> "listener 1883 127.0.0.1" in conf and "allow_anonymous false" in conf
    True
    """
    for name, value in (("port", port), ("max_packet_size", max_packet_size),
                        ("max_queued_messages", max_queued_messages)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("max_queued_bytes", max_queued_bytes), ("memory_limit", memory_limit)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = no limit), got {value!r}")
    for name, value in (("data_dir", data_dir), ("password_file", password_file),
                        ("acl_file", acl_file), ("user", user)):
        # mosquitto reads one option per line and takes the rest of the line as the value.
        if value is not None and ("\n" in value or "\r" in value):
            raise ValueError(f"{name} must not contain a line break: {value!r}")

    template = string.Template(
        resources.files("fedsync.broker_config").joinpath("mosquitto.conf.template").read_text(encoding="utf-8"))
    if listeners is None:
        listeners = (f"# Loopback only. A broker reachable from the network belongs behind TLS and a reviewed\n"
                     f"# ACL (`fedsync broker-config`); change this deliberately, never by default.\n"
                     f"listener {port} 127.0.0.1")
    return template.substitute(
        listeners=listeners.rstrip("\n"),
        extra_settings=extra_settings.rstrip("\n"),
        # mosquitto appends the file name to this path verbatim: it must end with "/".
        persistence_location=data_dir if data_dir.endswith("/") else data_dir + "/",
        allow_anonymous="false" if password_file else "true",
        password_file_line=f"password_file {password_file}" if password_file
        else "# no password_file: anonymous login",
        acl_file_line=f"acl_file {acl_file}" if acl_file else "# no acl_file: every user may use every topic",
        max_packet_size=max_packet_size,
        max_queued_messages=max_queued_messages,
        max_queued_bytes=max_queued_bytes,
        memory_limit_line=f"memory_limit {memory_limit}" if memory_limit else "# memory_limit: not set (no cap)",
        user_line=f"user {user}" if user else "# user: mosquitto's default (drops root to 'mosquitto')",
    )


def write_mosquitto_password_file(path: str | os.PathLike[str], users: Mapping[str, str]) -> None:
    """Write a mosquitto password file granting ``users`` (name -> password).

    Uses ``mosquitto_passwd -U`` on a plain-text file, which hashes all users in one
    run and keeps the passwords off the command line (``-b`` would show them in ps).
    """
    program = find_program("mosquitto_passwd")
    if program is None:
        raise RuntimeError("mosquitto_passwd not found; install the mosquitto package")
    lines = []
    for username, password in users.items():
        if not username or ":" in username or "\n" in username or "\n" in password:
            raise ValueError(f"user {username!r} cannot be stored in a mosquitto password file")
        lines.append(f"{username}:{password}\n")
    path = os.fspath(path)
    write_atomic(path, "".join(lines), mode=0o600)
    result = subprocess.run([program, "-U", path], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"mosquitto_passwd -U {path} failed: {result.stderr.strip() or result.stdout.strip()}")


def mosquitto_account() -> tuple[int, int, list[int]] | None:
    """(uid, gid, every group id) of the ``mosquitto`` user, or None where there is none."""
    try:
        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid, os.getgrouplist("mosquitto", entry.pw_gid)


def can_traverse(path: Path, uid: int, gids: list[int]) -> bool:
    """True if ``uid`` can reach entries inside ``path`` (search permission on every dir)."""
    for d in (path, *path.parents):
        st = d.stat()
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return False
    return True

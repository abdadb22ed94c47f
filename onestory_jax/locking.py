"""An exclusive lock on an output folder (sample.py --out, train.py --workdir).

The lock is the file `.lock` in the folder, created with O_CREAT | O_EXCL and holding the holder's
pid, host and start time. A second process stops with one line naming the holder. A lock left by a
process of this host that is no longer running (SIGKILL, power loss) is taken over with a note; a
lock from another host is never guessed dead: the error names the file to delete.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onestory_jax.errors import UserError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, name: str = LOCK_NAME) -> Iterator[Path]:
    """Create `folder` if needed and hold its lock (the file `name` in it) while the block runs; `what`
    names it in errors (e.g. '--out'). A folder that cannot be created or written is a `UserError`;
    one created here and left empty is removed at the end."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} '{folder}' exists and is not a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} '{folder}' cannot be created: {e.strerror or e}") from None
    lock = folder / name
    me = _acquire(lock, what, folder)
    try:
        yield lock
    finally:
        if _read(lock) == me:  # still ours
            lock.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):  # fails unless empty
                folder.rmdir()


def _acquire(lock: Path, what: str, folder: Path) -> dict[str, Any]:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    # The lock appears whole or not at all: written to a private file, then hard-linked to its name (which
    # fails if it exists). A full disk leaves no empty lock to block every later run.
    mine = lock.with_name(f"{lock.name}.{os.getpid()}.tmp")
    try:
        mine.write_text(json.dumps(me))
    except OSError as e:
        mine.unlink(missing_ok=True)
        raise UserError(f"{what} '{folder}' is not writable: {e.strerror or e}") from None
    try:
        return _link_lock(mine, lock, me, what, folder)
    finally:
        mine.unlink(missing_ok=True)


def _link_lock(mine: Path, lock: Path, me: dict[str, Any], what: str, folder: Path) -> dict[str, Any]:
    for _ in range(5):  # a few rounds: others may take over the same stale lock at the same time
        try:
            os.link(mine, lock)
        except FileExistsError:
            holder = _read(lock)
            if holder is None or not _stale(holder):
                raise UserError(_busy(what, folder, lock, holder)) from None
            if _take_over(lock, holder):
                print(
                    f"note: {what} '{folder}' was locked by pid {holder['pid']} on {holder['host']} "
                    f"(since {holder['since']}), which is no longer running: taking over its lock",
                    file=sys.stderr,
                )
            continue
        except OSError as e:
            raise UserError(f"{what} '{folder}' is not writable: {e.strerror or e}") from None
        return me
    raise UserError(_busy(what, folder, lock, _read(lock)))


def _busy(what: str, folder: Path, lock: Path, holder: dict[str, Any] | None) -> str:
    who = (
        f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
        if holder
        else "another run (its lock file is being written or unreadable)"
    )
    return f"{what} '{folder}' is in use by {who}; if that run is gone, delete '{lock}'"


def _read(lock: Path) -> dict[str, Any] | None:
    """The holder recorded in `lock`, or None if it is missing or not (yet) complete."""
    try:
        data = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("pid"), int) and isinstance(data.get("host"), str)
    return data if ok else None


def _stale(holder: dict[str, Any]) -> bool:
    """Whether the holder is a process of this host that no longer runs."""
    if holder["host"] != socket.gethostname():
        return False
    if holder["pid"] == os.getpid():  # a dead holder's pid, reused by this process
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _take_over(lock: Path, holder: dict[str, Any]) -> bool:
    """Move the stale lock aside and delete it; False if another process got there first."""
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    if _read(aside) != holder:  # someone's fresh lock replaced the stale one meanwhile: put it back
        os.rename(aside, lock)
        return False
    aside.unlink()
    return True

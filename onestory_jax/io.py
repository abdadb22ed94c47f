"""Host files: the one atomic write, and the names of a run folder's files.

Every file the project writes goes through `atomic_path`: a temp file in the target's directory,
renamed onto the target only when writing succeeded, so a reader never sees a half-written file.
A full disk, a read-only or unwritable folder, or a path under a file is one `UserError` naming the
file, and the temp file is gone. `require_writable` (a folder) and `require_writable_file` check
an output before any work (CLIs call them before building a model); `require_free_space` checks that a
large write (a checkpoint) can fit. A run folder (sample.py's output, read back by the evaluator) names
shot i's files `shot_NN.*` (1-based).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from onestory_jax.errors import UserError

# The OS's "this place cannot take the file" errors: full disk or quota, read-only, no permission,
# too large a file, a path through a file.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR, errno.EEXIST}
)


def cannot_write(path: Path, e: OSError) -> UserError:
    """The one line for a write the OS refused (`e.errno` in `WRITE_ERRNOS`)."""
    reason = "a part of its path is a file, not a folder" if e.errno in (errno.ENOTDIR, errno.EEXIST) else e.strerror or e
    return UserError(f"cannot write '{path}': {reason}")


def nearest_existing(path: str | Path) -> Path:
    """`path`, or the nearest folder above it that exists."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def require_writable(folder: str | Path, what: str) -> Path:
    """Check that files can be made in `folder`, creating nothing (a refused command leaves no empty
    folders behind): it, or the nearest folder above it that exists, must be a writable folder."""
    folder = Path(folder)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = "exists" if existing == folder else f"is under '{existing}', which exists"
        raise UserError(f"{what} '{folder}' {where} and is not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f"{what} '{folder}' is not writable: {e.strerror or e}") from None
    return folder


def require_writable_file(path: str | Path, what: str) -> Path:
    """Check `path` can be written as a file: not a folder, in a folder that is (or can be made) writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder: give a file name")
    require_writable(path.parent, f"the folder of {what}")
    return path


def require_free_space(folder: str | Path, nbytes: int, what: str) -> None:
    """Refuse to start writing `what` (`nbytes`) into `folder` when its disk has less free space."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < nbytes:
        raise UserError(f"'{folder}' has {human_bytes(free)} free but {what} needs {human_bytes(nbytes)}")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise cannot_write(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))


def save_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def shot_name(i: int, suffix: str) -> str:
    """The run-folder file of shot i (0-based): `shot_01.mp4` for i = 0."""
    return f"shot_{i + 1:02d}{suffix}"


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing aliases (*name): a few bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not supported, line {mark.line + 1}")
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """YAML (safe, no aliases: a story or config has no need of them, and they can expand without bound)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)

"""Atomic writes: a kill at any instant leaves either the old file (or directory) or the new one.

The content goes to a temporary `.<name>.<random>.tmp` beside the target, is flushed and fsynced,
then renamed over the target, and the directory is fsynced so that the rename survives a crash.
Temporaries left by a killed writer are never read; `remove_stale_temps` deletes them.
"""
import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

TEMP = re.compile(r'\..+\.tmp')  # .<name>.<random>.tmp
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write_fn, mode: str = 'wb'):
    """Write `path` through `write_fn(f)` on a temporary file that replaces it when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_text(path, text: str):
    atomic_write(path, lambda f: f.write(text), mode='w')


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory that becomes `path` when the block completes (removed on error).

    `path` must not exist yet (a directory cannot replace a non-empty one atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp'))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory):
    """Make the renames in `directory` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(directory) -> int:
    """Delete the temporary files that killed writes left in `directory`; call it only while no
    write to the directory can be in flight (e.g. holding the run's lock). Returns the bytes freed."""
    freed = 0
    for entry in Path(directory).glob('.*.tmp'):
        if TEMP.fullmatch(entry.name) and entry.is_file():
            freed += entry.stat().st_size
            entry.unlink(missing_ok=True)
    return freed

"""Lightning plugins the trainer config adds (``conf/trainer/default.yaml``: ``plugins``)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable: a checkpoint file is the old one or the
    new one, never a torn one, also after a crash or a power loss.

    The checkpoint is written to a hidden temporary file in the target's directory (``.<name>.tmp-<pid>-<id>``),
    flushed and ``fsync``-ed, renamed over the target (``os.replace``: atomic within one filesystem), and the
    directory is ``fsync``-ed so that the rename itself is on disk. Lightning's own ``TorchCheckpointIO``
    serialises into memory and moves a file from the system temporary directory, which is a copy (not atomic)
    when that directory is on another filesystem, and syncs nothing. A failed write removes its temporary file;
    a process killed while writing leaves it (hidden, never a ``*.ckpt``) next to the intact target, and the next
    run in that folder deletes it at start-up (:func:`remove_stale_temporaries`, called by ``train``).

    Remote paths (``s3://``, ...) go to Lightning's implementation unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(temporary_name(target.name))
        # O_EXCL: never another writer's file; mode 0o666 under the umask, as a plain open() would create it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)


TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
"""The writer's temporary files, ``.<name>.tmp-<pid>-<8 hex digits>``, and nothing else."""


def temporary_name(name: str) -> str:
    """The temporary file name :class:`AtomicCheckpointIO` writes ``name`` through.

    >>> bool(TEMPORARY.match(temporary_name("last.ckpt")))
    True
    """
    return f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed :class:`AtomicCheckpointIO` writer left in ``folder`` (names matching
    :data:`TEMPORARY` whose process is gone; this process's own are stale too, as nothing writes yet at start-up);
    returns them. Other files are never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = TEMPORARY.match(path.name)
        if match is None or not path.is_file():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _alive(pid):
            continue  # a writer still running (another process writing into this folder)
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["AtomicCheckpointIO", "TEMPORARY", "remove_stale_temporaries", "temporary_name"]

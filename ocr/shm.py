"""Files in /dev/shm named after the process that made them, and clearing the ones whose
process is gone (killed runs cannot clean up after themselves)."""

from __future__ import annotations

import os

SHM_DIR = "/dev/shm"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_files(directory: str, prefix: str) -> None:
    """Remove ``<prefix><pid>_...`` files in ``directory`` whose creating process is dead."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("_", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass

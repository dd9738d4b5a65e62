"""Fault injection for the tests of the atomic writers (disk cache entries, precomputed
maps, checkpoints, the run summary).

``OCR_FAULT=<action>@<point>`` makes :func:`inject` act when the writer named ``point``
reaches it; without the variable it does nothing. The writers call it

* ``<point>.publish``: between writing the temporary file(s) and renaming them into place,
* ``<point>.write``: after writing one file's bytes (disk cache entries only).

Actions: ``kill`` (SIGKILL this process: nothing of Python runs after it, as when a run
is killed) and ``enospc`` (raise ``OSError(ENOSPC)``, as a full disk does).
Points: ``tensors`` and ``maps`` (cache entries), ``checkpoint``, ``run_summary``.
Example: ``OCR_FAULT=kill@checkpoint.publish``.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "OCR_FAULT"
ACTIONS = ("kill", "enospc")


def inject(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    if where != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected: {ENV}={spec})")
    raise ValueError(f"{ENV}={spec}: action must be one of {', '.join(ACTIONS)}")

"""Shared runner wrapper: user errors (bad config, bad data) end with one clear line
and exit code 2 instead of a traceback; the result is printed as JSON on stdout."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("ocr")


def user_error_types() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import OmegaConfBaseException

    from ocr.data.annotations import AnnotationError
    from ocr.data.backends import BackendError
    from ocr.data.datamodule import DataConfigError
    from ocr.data.source import ImageReadError
    from ocr.data.transforms import ImageDecodeError
    from ocr.training.run import ConfigError

    return (AnnotationError, BackendError, DataConfigError, ImageReadError, ImageDecodeError, ConfigError, OmegaConfBaseException)


def run_safely(fn, cfg):
    try:
        result = fn(cfg)
    except user_error_types() as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, Path):
        print(json.dumps({"result": str(result)}))
    elif result is not None:
        print(json.dumps(result))
    return result

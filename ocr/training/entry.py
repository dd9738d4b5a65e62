"""Shared runner wrapper: user errors (bad config, bad data) end with one clear line
and exit code 2 instead of a traceback; the result is printed as JSON on stdout.

A runner's ``__main__`` calls :func:`main` with its ``@hydra.main`` function (a command line
Hydra cannot compose is a user error too), which calls :func:`run_safely` with the composed
config: every key is validated (``ocr/config_validation.py``) before any data is touched."""

from __future__ import annotations

import json
import logging
import os
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


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _message(exc: BaseException) -> str:
    """OmegaConf errors carry ``full_key: ...`` / ``object_type=...`` lines: the key and the
    first line of the message are what the user needs."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, OmegaConfBaseException) and getattr(exc, "msg", None):
        first = str(exc.msg).splitlines()[0]
        key = getattr(exc, "full_key", None)
        return f"{key}: {first}" if key and key not in first else first
    return one_line(str(exc))


def fail(message: str) -> None:
    """The one line on stderr (the run's log file gets it too), exit code 2."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:  # the console has the stderr line already
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _command_line_override(key: str) -> str:
    """The argument of this command that sets ``key`` (``key`` when none does)."""
    for arg in sys.argv[1:]:
        if arg.lstrip("~+").split("=", 1)[0] == key:
            return arg
    return key


def composition_message(exc: BaseException) -> str:
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        hint = " (every key: --cfg job)" if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) else ""
        return f"{_command_line_override(cause.full_key)}: {str(cause.msg).splitlines()[0]}{hint}"
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group = exc.missing_cfg_file.rsplit("/", 1)[0]
        return f"{_command_line_override(group)}: must be one of {', '.join(exc.options)} (configs/{group}/)"
    return one_line(str(exc))


def main(hydra_main) -> None:
    """Call a runner's ``@hydra.main`` function; a command line that does not compose
    (unknown key, wrong type, unknown config group option, override syntax) is one line and
    exit code 2, like every other user error."""
    from hydra.errors import HydraException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises instead of printing its own report
    try:
        hydra_main()
    except HydraException as exc:
        fail(composition_message(exc))


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_config(runner: str, cfg) -> None:
    """Validate every key before ``runner`` (train | test | predict) touches data; overrides
    the runner reads nothing from are one warning."""
    from ocr.config_validation import check_overrides, ignored_overrides, validate

    overrides = _overrides()
    check_overrides(overrides)
    validate(cfg)
    ignored = ignored_overrides(runner, cfg, overrides)
    if ignored:
        log.warning("runners/%s.py reads nothing from these overrides (ignored): %s", runner, " ".join(ignored))


def run_safely(runner: str, cfg):
    """Run ``ocr.training.run.<runner>`` on ``cfg``: the config is checked first, without
    importing torch or Lightning, so a refused value costs about a second, not ~10."""
    from ocr.config import ConfigError

    try:
        check_config(runner, cfg)
    except ConfigError as exc:
        fail(_message(exc))
    try:
        from ocr.training import run

        result = getattr(run, runner)(cfg)
    except user_error_types() as exc:
        fail(_message(exc))
    if isinstance(result, Path):
        print(json.dumps({"result": str(result)}))
    elif result is not None:
        print(json.dumps(result))
    return result

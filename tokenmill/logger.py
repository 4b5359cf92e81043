"""The `tokenmill` logger: INFO to stderr unless the application configured it already."""

from __future__ import annotations

import logging
import sys


def init_logger(level: str | int | None = None) -> logging.Logger:
    logger = logging.getLogger("tokenmill")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    if level is not None:
        logger.setLevel(level.upper() if isinstance(level, str) else level)
    return logger

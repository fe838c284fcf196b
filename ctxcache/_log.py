"""The library's logger, ``logging.getLogger("ctxcache")``, without importing :mod:`logging` on a hit.

``import logging`` (with threading, traceback, string) costs ~3 ms of the ~20 ms ``import ctxcache`` took,
and a hit logs only at INFO/DEBUG. Those records can reach no handler unless the application imported
:mod:`logging` itself (to configure it, or through any library that logs): until then they are dropped
without the import, exactly as logging would drop them (the last-resort handler takes WARNING and
above only). A WARNING or above imports logging and goes through it as before.
"""

from __future__ import annotations

import sys
from typing import Any

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40


class _Log:
    __slots__ = ()

    @staticmethod
    def _logger() -> Any:
        import logging

        return logging.getLogger("ctxcache")

    def isEnabledFor(self, level: int) -> bool:
        if "logging" not in sys.modules:
            return level >= WARNING
        return bool(self._logger().isEnabledFor(level))

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        if level >= WARNING or "logging" in sys.modules:
            kwargs.setdefault("stacklevel", 2)
            self._logger().log(level, msg, *args, **kwargs)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            kwargs.setdefault("stacklevel", 2)
            self._logger().debug(msg, *args, **kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            kwargs.setdefault("stacklevel", 2)
            self._logger().info(msg, *args, **kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stacklevel", 2)
        self._logger().warning(msg, *args, **kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stacklevel", 2)
        self._logger().error(msg, *args, **kwargs)

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stacklevel", 2)
        self._logger().exception(msg, *args, **kwargs)


#: use as ``log.info(...)``, as a ``logging.Logger``
log = _Log()

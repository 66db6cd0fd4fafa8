"""Logging: one line per record whatever a client sends, and a flood of client faults costs a few lines.

- Formatters (:class:`PlainFormatter`, :class:`JsonFormatter`) cap a record's message at
  ``MAX_MESSAGE_CHARS`` (then ``…(+N chars)``); the plain one escapes every control
  character (C0, DEL, C1, U+2028/U+2029, bidi overrides, lone surrogates), so a record is
  always one line. Tracebacks (``exc_info``: our own bugs) are kept as they are.
- :func:`clip` bounds and quotes a client-supplied value (client id, topic, an exception
  text quoting client input) *before* it goes into a log call's arguments: a 60 KB topic
  costs about 100 characters.
- :class:`RateLimitFilter`, on the handler :func:`setup_logging` installs: records marked
  ``extra=CLIENT`` or ``extra=STORE`` and every record of the third-party ``amqtt`` and ``websockets`` loggers
  pass ``burst`` times per ``interval_s`` per (logger, message template); the rest are
  counted, and one line per template and interval says how many were suppressed. The
  broker calls :func:`flush` periodically so that line comes out when a flood stops.
- :class:`HandshakeLog` is the logger given to ``websockets.serve``: a client's failed
  opening handshake is one rate-limited line naming the peer, not an ERROR with a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, Final

from bridge.config import LoggingConfig

__all__ = [
    "CLIENT",
    "MAX_MESSAGE_CHARS",
    "QUIET_LOGGERS",
    "STORE",
    "HandshakeLog",
    "JsonFormatter",
    "PlainFormatter",
    "RateLimitFilter",
    "clip",
    "flush",
    "handshake_failed",
    "log_handler",
    "safe_message",
    "setup_logging",
]

# ``log.info(..., extra=CLIENT)``: caused by a client, so a client can repeat it: rate-limited.
CLIENT: Final[Mapping[str, object]] = MappingProxyType({"client_fault": True})
# ``log.error(..., extra=STORE)``: a store fault, repeated by every call while it lasts (a
# full disk, a hung Redis): rate-limited the same way.
STORE: Final[Mapping[str, object]] = MappingProxyType({"store_fault": True})
# Longest message a record may have in the output (before ``…(+N chars)``).
MAX_MESSAGE_CHARS: Final = 2048

# Third-party loggers that narrate every packet at INFO; ours say what matters.
QUIET_LOGGERS = ("amqtt", "transitions", "websockets", "httpx", "httpcore")
# Third-party loggers whose records are all rate-limited: they quote client input freely, or
# repeat per client action (asyncio warns on every write to a socket a client has closed).
_LIMITED = ("amqtt", "websockets", "asyncio")
_ELLIPSIS = "\u2026"

# What would end, rewrite or reorder a line on a terminal or in a log viewer: C0 (also tab),
# DEL, C1, the Unicode line and paragraph separators, bidi embeddings/overrides/isolates, and
# lone surrogates (which a UTF-8 stream refuses to write).
_CONTROLS = "\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_CONTROL = re.compile(f"[{_CONTROLS}]")
# In a quoted clip() value the quote and the backslash are escaped as well.
_QUOTED_ESCAPE = re.compile(f"[{_CONTROLS}'\\\\]")
# A value made only of these is written bare: it cannot pass for spaces, quotes or other syntax.
_BARE = re.compile(r"[\w.:/@+#$%=~-]+")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "'": "\\'", "\\": "\\\\"}


def _escaped(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape(text: str, budget: int, pattern: re.Pattern[str]) -> tuple[str, int]:
    """``text`` with ``pattern``'s characters escaped, at most ``budget`` characters long,
    and how many characters of ``text`` that shows. Looks at no more than ``budget`` of them."""
    out: list[str] = []
    size = pos = 0
    for match in pattern.finditer(text, 0, budget):
        start = match.start()
        if start - pos >= budget - size:
            break  # the plain run before it fills what is left
        out.append(text[pos:start])
        size += start - pos
        escaped = _escaped(match.group())
        if size + len(escaped) > budget:
            return "".join(out), start
        out.append(escaped)
        size += len(escaped)
        pos = match.end()
    # No pattern character in text[pos:pos + take]: each shown character costs at least one
    # of output, so pos + take <= budget, inside the part searched.
    take = min(len(text) - pos, budget - size)
    out.append(text[pos : pos + take])
    return "".join(out), pos + take


def _more(total: int, shown: int) -> str:
    return f"{_ELLIPSIS}(+{total - shown:,} chars)" if shown < total else ""


def safe_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message for the plain log: control characters escaped, capped at ``limit``."""
    if len(text) <= limit and _CONTROL.search(text) is None:
        return text  # the usual case: nothing to do
    escaped, shown = _escape(text, limit, _CONTROL)
    return escaped + _more(len(text), shown)


def clip(value: object, limit: int = 80) -> str:
    """A client-supplied value for a log call's arguments, at most ``limit`` characters of it.

    Written bare when it is one plain token (``alice``, ``market/luno/BTC-ZAR``), otherwise
    in single quotes with quotes, backslashes and control characters escaped, so nothing in
    it can pass for the rest of the line. What is cut is counted: ``…(+59,920 chars)``.
    """
    text = value if isinstance(value, str) else str(value)
    head = text[:limit]
    if _BARE.fullmatch(head):
        return head + _more(len(text), len(head))
    escaped, shown = _escape(head, limit, _QUOTED_ESCAPE)
    return f"'{escaped}'" + _more(len(text), shown)


class PlainFormatter(logging.Formatter):
    """``time level logger: message``; the message escaped and capped, so one record is one line."""

    def __init__(self, tag: str | None = None) -> None:
        where = f"[{tag}] " if tag else ""
        super().__init__(f"%(asctime)s %(levelname)-7s {where}%(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # format() has just set record.message from getMessage(); every formatter sets it anew.
        record.message = safe_message(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line (JSON escapes control characters); the message capped."""

    def __init__(self, tag: str | None = None) -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + _more(len(message), MAX_MESSAGE_CHARS)
        event = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": message,
        }
        if self.tag:
            event["tag"] = self.tag
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        # JSON leaves DEL raw; \\u007f is the same string to a reader and no raw control byte.
        return json.dumps(event, separators=(",", ":")).replace("\x7f", "\\u007f")


class _Window:
    """One (logger, template)'s current interval: since when, how many passed, how many not."""

    __slots__ = ("level", "passed", "start", "suppressed")

    def __init__(self, start: float, level: int) -> None:
        self.start = start
        self.level = level
        self.passed = 0
        self.suppressed = 0


# (logger name, template cut to _KEY_CHARS): templates of third-party f-strings carry client input.
_Key = tuple[str, str]
_KEY_CHARS = 200
_OVERFLOW: _Key = ("bridge.logs", "(messages of more kinds than the rate limit tracks)")
_SUMMARY = "suppressed %s similar messages in %ss: %s"
_limiters: weakref.WeakSet[RateLimitFilter] = weakref.WeakSet()


class RateLimitFilter(logging.Filter):
    """Per (logger, message template), ``burst`` client-caused records per ``interval_s``.

    Limited: records logged with ``extra=CLIENT`` or ``extra=STORE`` and every record of the ``amqtt`` and
    ``websockets`` loggers; others always pass. Past ``burst`` in an interval a record is
    counted and dropped; when the interval ends (on the key's next record, or :meth:`flush`)
    one line says how many: ``suppressed 2,990 similar messages in 10s: <template>``.

    O(1) per record; at most ``max_keys`` templates are tracked, the rest share one key.
    Thread-safe (records come from any thread). :meth:`attach` it to a handler so its summary
    lines go to that handler; :func:`flush` flushes every live filter.
    """

    def __init__(
        self,
        *,
        burst: int = 10,
        interval_s: float = 10.0,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # Ordered by window start (a renewed key moves to the end), so the oldest is first.
        self._windows: dict[_Key, _Window] = {}
        self._next_scan = 0.0
        self._handler: logging.Handler | None = None
        _limiters.add(self)

    def attach(self, handler: logging.Handler) -> RateLimitFilter:
        """Filter ``handler``'s records and send the summary lines to it."""
        handler.addFilter(self)
        self._handler = handler
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        if not _limited(record):
            return True
        summaries: list[logging.LogRecord] = []
        with self._lock:
            allowed = self._admit(record, summaries)
        self._emit(summaries)
        return allowed

    def flush(self, *, force: bool = False) -> None:
        """Summaries for intervals that have ended (``force``: for every key, e.g. at shutdown).

        Cheap to call often: it looks at its keys at most once a second.
        """
        now = self._clock()
        if not force and now < self._next_scan:
            return
        summaries: list[logging.LogRecord] = []
        with self._lock:
            self._next_scan = now + 1.0
            windows = self._windows
            while windows:
                key = next(iter(windows))
                if not force and now - windows[key].start < self.interval_s:
                    break  # the rest started later
                self._summarize(key, windows.pop(key), now, summaries)
        self._emit(summaries)

    def _admit(self, record: logging.LogRecord, summaries: list[logging.LogRecord]) -> bool:
        now = self._clock()
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        key = (record.name, template[:_KEY_CHARS])
        windows = self._windows
        window = windows.get(key)
        if window is not None and now - window.start >= self.interval_s:
            del windows[key]
            self._summarize(key, window, now, summaries)
            window = None
        if window is None:
            if len(windows) >= self.max_keys:
                oldest = next(iter(windows))
                if now - windows[oldest].start >= self.interval_s:
                    self._summarize(oldest, windows.pop(oldest), now, summaries)
                else:
                    key = _OVERFLOW  # every tracked key is busy: share one budget
            window = windows.get(key)
            if window is None:
                window = windows[key] = _Window(now, record.levelno)
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.suppressed += 1
        window.level = max(window.level, record.levelno)
        return False

    def _summarize(self, key: _Key, window: _Window, now: float, out: list[logging.LogRecord]) -> None:
        if not window.suppressed:
            return
        seconds = max(1, round(min(now - window.start, self.interval_s)))  # never 'in 0s'
        summary = logging.LogRecord(
            key[0],
            window.level,
            __file__,
            0,
            _SUMMARY,
            (f"{window.suppressed:,}", f"{seconds:g}", clip(key[1], 120)),
            None,
        )
        summary.rate_limit_summary = True
        out.append(summary)

    def _emit(self, summaries: list[logging.LogRecord]) -> None:
        # Outside the lock: handling a record runs filters, this one included.
        for summary in summaries:
            if self._handler is not None:
                self._handler.handle(summary)
            else:
                logging.getLogger(summary.name).handle(summary)


def _limited(record: logging.LogRecord) -> bool:
    if getattr(record, "rate_limit_summary", False):
        return False
    if getattr(record, "client_fault", False) or getattr(record, "store_fault", False):
        return True
    name = record.name
    return any(name == prefix or name.startswith(prefix + ".") for prefix in _LIMITED)


def flush(*, force: bool = False) -> None:
    """:meth:`RateLimitFilter.flush` on every live filter (the broker calls this periodically)."""
    for limiter in list(_limiters):
        limiter.flush(force=force)


class OutageLog:
    """A background job's repeating failure, logged when it starts and when it ends: a store
    that stays down for an hour costs two lines, not one per retry (the retries in between
    are DEBUG records, and counted by the job)."""

    __slots__ = ("_failed", "_log", "_what")

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._failed = 0  # tries failed since the last success

    @property
    def failing(self) -> bool:
        return self._failed > 0

    def failed(self, message: str, *args: object) -> None:
        self._failed += 1
        level = logging.WARNING if self._failed == 1 else logging.DEBUG
        self._log.log(level, message, *args, extra=STORE)

    def succeeded(self) -> None:
        if self._failed:
            self._log.warning("%s: working again after %d failed tries", self._what, self._failed)
            self._failed = 0


class HandshakeLog(logging.LoggerAdapter[logging.Logger]):
    """The ``logger`` for ``websockets.serve``.

    websockets logs a failed opening handshake (junk bytes, a plain HTTP GET, a client gone
    before the answer) at ERROR with a traceback: 17 lines a time, for the client's fault. Here that
    is one line on ``log`` naming the peer, marked :data:`CLIENT` (rate-limited). Everything
    else goes to the ``websockets.server`` logger as websockets would send it, including a
    handshake that failed in our own code (a traceback is what we want then).
    """

    def __init__(self, log: logging.Logger, listener: str) -> None:
        super().__init__(logging.getLogger("websockets.server"), {})
        self._to = log
        self._listener = listener

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = sys.exc_info()[1]
        if msg == "opening handshake failed" and isinstance(exc, _client_handshake_errors()):
            extra = kwargs.get("extra")
            connection = extra.get("websocket") if isinstance(extra, Mapping) else None
            handshake_failed(self._to, self._listener, getattr(connection, "remote_address", None), exc)
            return
        # Straight to the logger: LoggerAdapter.process() would replace websockets' ``extra``.
        self.logger.log(level, msg, *args, **kwargs)


def handshake_failed(log: logging.Logger, listener: str, peer: object, exc: BaseException) -> None:
    """A client's failed WebSocket handshake (junk bytes, a plain HTTP GET, gone before the
    answer): one line naming the peer, marked :data:`CLIENT` (rate-limited), no traceback."""
    log.info(
        "bad WebSocket handshake from %s on %s: %s",
        peer,
        listener,
        clip(_exception_chain(exc), 200),
        extra=CLIENT,
    )


def _client_handshake_errors() -> tuple[type[BaseException], ...]:
    """What a client's bytes or its going away raise in a handshake; anything else is our code's.

    Imported here, not at the top: the core logs through this module and loads no websockets.
    """
    from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: PLC0415

    return (InvalidHandshake, ConnectionClosed, ConnectionError, EOFError)


def _exception_chain(exc: BaseException) -> str:
    """``exc``'s message and its causes', as websockets tells the client: ``a; b``."""
    parts = [str(exc) or type(exc).__name__]
    cause = exc.__cause__
    while cause is not None and len(parts) < 5:
        parts.append(str(cause) or type(cause).__name__)
        cause = cause.__cause__
    return "; ".join(parts)


def log_handler(
    config: LoggingConfig,
    *,
    stream: IO[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> logging.StreamHandler[IO[str]]:
    """What :func:`setup_logging` installs: a handler on ``stream`` (stderr) with the
    config's formatter and a :class:`RateLimitFilter` (on ``clock``) attached."""
    handler: logging.StreamHandler[IO[str]] = logging.StreamHandler(
        stream if stream is not None else sys.stderr
    )
    handler.setFormatter(JsonFormatter(config.tag) if config.json_format else PlainFormatter(config.tag))
    RateLimitFilter(clock=clock).attach(handler)
    return handler


def setup_logging(config: LoggingConfig) -> None:
    root = logging.getLogger()
    root.handlers[:] = [log_handler(config)]
    root.setLevel(config.level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(config.level)))

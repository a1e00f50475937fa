"""Quiet third parties: their load reports, warnings and progress bars go to the log, shown with -v.

`configure(verbose)` is called once by the CLI (spar/cli.py `main`, after it has set up logging;
library code never calls it). Without -v:

- a filter on the root logger's handlers drops records below ERROR from every logger outside
  `spar` (transformers, huggingface_hub, peft, ...; `warnings` too, routed into logging as
  `py.warnings`, as `logging.captureWarnings` does);
- transformers' own logger (which has its own handler) is set to ERROR, so its `LOAD REPORT`
  tables and advice stay out of the output;
- transformers' and huggingface_hub's progress bars ("Loading weights", "Writing model shards",
  downloads) are off.

transformers and huggingface_hub are not imported for this (that costs most of a second, and
`spar plan` never needs them): when already imported they are told directly, otherwise through the
environment variables they read when imported (set only where the user has not set them).

`captured(logger, what)` wraps a loader that writes to stdout/stderr itself (GGUF conversion's
tqdm bar, prints): what it writes is logged line by line at INFO on `logger` instead, so it shows
with -v and never interleaves with spar's own output. While any thread is capturing,
`sys.stdout`/`sys.stderr` are a router that sends each thread's writes to its own capture or, for
threads not capturing, where they went before; spar's own progress bars (sampling, judging,
training) and lines are untouched.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import TextIO

OWN = "spar"  # records from this logger and its children always pass the filter
# what the libraries read when imported; the value that quiets them
ENV_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_set_env: set[str] = set()  # the ENV_QUIET keys this process set (and may take back)
_quieted: set[str] = set()  # the imported libraries this process quieted (and may take back)


class ThirdPartyFilter(logging.Filter):
    """Pass spar's records, and other loggers' records at ERROR or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN or record.name.startswith(OWN + ".")
        return own or record.levelno >= logging.ERROR


def configure(verbose: bool) -> None:
    """Quiet third parties unless `verbose` (-v / --debug). Idempotent; a later call with the
    other setting undoes what this one did (so in-process callers, such as tests, may switch)."""
    warnings.showwarning = _log_warning  # re-armed on every call: a caller may have reset it
    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, ThirdPartyFilter)]:
            handler.removeFilter(f)
        if not verbose:
            handler.addFilter(ThirdPartyFilter())
    _environment(verbose)
    _transformers(verbose)
    _hub(verbose)


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning`: the warning as a WARNING record of `py.warnings`."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    logging.getLogger("py.warnings").warning("%s", text.rstrip())


def _environment(verbose: bool) -> None:
    for key, value in ENV_QUIET.items():
        if not verbose and key not in os.environ:
            os.environ[key] = value
            _set_env.add(key)
        elif verbose and key in _set_env:
            os.environ.pop(key, None)
            _set_env.discard(key)


def _transformers(verbose: bool) -> None:
    tlog = sys.modules.get("transformers.utils.logging")
    if tlog is None:  # not imported: TRANSFORMERS_VERBOSITY and the hub's variable apply
        return
    with warnings.catch_warnings():  # "cannot enable: environment variable has priority"
        warnings.simplefilter("ignore")
        if not verbose:
            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
            _quieted.add("transformers")
        elif "transformers" in _quieted:
            tlog.set_verbosity_warning()
            tlog.enable_progress_bar()
            _quieted.discard("transformers")


def _hub(verbose: bool) -> None:
    tqdm = sys.modules.get("huggingface_hub.utils.tqdm")
    if tqdm is None:  # not imported: HF_HUB_DISABLE_PROGRESS_BARS applies
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not verbose:
            tqdm.disable_progress_bars()
            _quieted.add("huggingface_hub")
        elif "huggingface_hub" in _quieted:
            tqdm.enable_progress_bars()
            _quieted.discard("huggingface_hub")


def output_lines(text: str) -> list[str]:
    """What a terminal would have kept of `text`: per line the last carriage-return segment
    (a progress bar's final state), without colour codes or blank lines."""
    out = []
    for line in _ANSI.sub("", text).split("\n"):
        segments = [s.rstrip() for s in line.split("\r") if s.strip()]
        if segments:
            out.append(segments[-1])
    return out


class _Router(io.TextIOBase):
    """Stands in for sys.stdout / sys.stderr while some thread is in `captured`: what a capturing
    thread writes goes to its buffer, what any other thread writes to the stream it replaced."""

    def __init__(self, original: TextIO) -> None:
        self.original = original
        self.buffers: dict[int, list[io.StringIO]] = {}

    def _target(self) -> TextIO:
        stack = self.buffers.get(threading.get_ident())
        return stack[-1] if stack else self.original

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", "utf-8")


_routing = threading.Lock()


def _enter(name: str, buffer: io.StringIO) -> _Router:
    with _routing:
        router = getattr(sys, name)
        if not isinstance(router, _Router):
            router = _Router(router)
            setattr(sys, name, router)
        router.buffers.setdefault(threading.get_ident(), []).append(buffer)
        return router


def _leave(name: str, router: _Router) -> None:
    with _routing:
        me = threading.get_ident()
        stack = router.buffers[me]
        stack.pop()
        if not stack:
            del router.buffers[me]
        if not router.buffers and getattr(sys, name) is router:  # the last capture: put it back
            setattr(sys, name, router.original)


@contextlib.contextmanager
def captured(logger: logging.Logger, what: str) -> Iterator[None]:
    """Run the block with what this thread writes to stdout and stderr captured; each line is
    logged at INFO on `logger` as `<what>: <line>` (also when the block raises). Other threads'
    output (spar's own, under `apply --jobs`) is untouched, and captures in several threads at
    once each keep their own lines and leave sys.stdout/sys.stderr as they found them."""
    buffer = io.StringIO()
    routers = [(name, _enter(name, buffer)) for name in ("stdout", "stderr")]
    try:
        yield
    finally:
        for name, router in routers:
            _leave(name, router)
        for line in output_lines(buffer.getvalue()):
            logger.info("%s: %s", what, line)

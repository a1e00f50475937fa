"""Progress-bar labels. Under `apply --jobs` the stages of several experiments (a sweep's points)
run at once, each with its own bar; `apply` names the experiment for the thread running a stage
(`labelled`), and every bar's description goes through `label`, so a sweep's six `train` bars
read `lr/training.seed=1 train`, `lr/training.seed=2 train`, ... instead of six `train`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_local = threading.local()


@contextlib.contextmanager
def labelled(prefix: str) -> Iterator[None]:
    """Bars made in this thread inside the block start with `prefix`."""
    before = getattr(_local, "prefix", "")
    _local.prefix = prefix
    try:
        yield
    finally:
        _local.prefix = before


def label(desc: str) -> str:
    """A bar's description, with this thread's prefix (if any)."""
    prefix = getattr(_local, "prefix", "")
    return f"{prefix} {desc}" if prefix else desc

"""The two kinds of failure the CLI distinguishes (exit 2 and exit 1)."""

from __future__ import annotations


class InputError(Exception):
    """Bad input found before any work: spec, docs, template, missing file. Exit code 2.

    The message is one line naming the file and the field or line.
    """


class RunError(Exception):
    """A failure while running a stage (service unreachable, engine crash). Exit code 1."""


class Stopped(RunError):
    """A stage left off because another stage of the same apply failed: what it finished is
    journaled, and the next apply continues it."""

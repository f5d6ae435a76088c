"""Download progress for `openbeepboop-node models pull`: a rich bar (bytes, rate, ETA) on a
terminal, a plain line every 10 % (or 10 s) otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import click


class ProgressSink(Protocol):
    """The `(bytes_done, total)` callback `pull_model` calls."""

    def __call__(self, done: int, total: int | None) -> None: ...


@contextmanager
def pull_progress(label: str) -> Iterator[ProgressSink]:
    """A progress callback for the `with` block, drawn on stderr."""
    if sys.stderr.isatty():
        with _bar(label) as sink:
            yield sink
    else:
        yield _Lines(label)


@contextmanager
def _bar(label: str) -> Iterator[ProgressSink]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=None)

        def sink(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield sink


class _Lines:
    def __init__(self, label: str) -> None:
        self.label = label
        self.last_step = -1
        self.last_time = 0.0
        self.started = 0.0
        self.first: int | None = None

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self.started = done, now
        step = done * 10 // total if total else -1
        if step == self.last_step and now - self.last_time < 10:
            return
        self.last_step, self.last_time = step, now
        rate = (done - self.first) / max(now - self.started, 1e-6)
        of = f" of {_size(total)} ({done * 100 // total} %)" if total else ""
        click.echo(f"{self.label}: {_size(done)}{of}, {_size(int(rate))}/s", err=True)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"

"""Stages that interrupt or watch a curation run, for the restart tests (``class_path: curate_faults.X``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage


class InjectedCrash(RuntimeError):
    pass


class CrashOnce(Stage):
    """Raise ``InjectedCrash`` (or, with ``kill``, die by SIGKILL) once this stage has seen ``after``
    documents, unless ``marker`` exists (which the crash creates, so the rerun goes through)."""

    name = "crash_once"

    def __init__(self, marker: str, after: int, kill: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.marker, self.after, self.kill, self.seen = marker, after, kill, 0

    def process(self, docs: list[Doc]) -> None:
        self.seen += len(docs)
        if self.seen >= self.after and not Path(self.marker).exists():
            Path(self.marker).touch()
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedCrash(f"injected crash after {self.seen} documents")


class CountDocuments(Stage):
    """Append the size of every batch this stage processes to ``log`` (one line per batch, any process)."""

    name = "count_documents"

    def __init__(self, log: str, **kw) -> None:
        super().__init__(**kw)
        self.log = log

    def process(self, docs: list[Doc]) -> None:
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{len(docs)}\n".encode())
        finally:
            os.close(fd)

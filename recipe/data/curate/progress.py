"""A progress display per pass: tqdm when it is installed, else a plain line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """Counts documents of one pass; ``enabled=False`` shows nothing."""

    def __init__(self, desc: str, total: int | None = None, enabled: bool = True, unit: str = "doc") -> None:
        self.desc, self.total, self.enabled, self.unit = desc, total, enabled, unit
        self.n = 0
        self._bar: Any = None
        self._t0 = self._last = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, leave=True,
                                 dynamic_ncols=True)  # fmt: skip
            except ImportError:
                self._bar = None

    def update(self, n: int) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= 5.0:
            self._last = now
            self._line()

    def _line(self) -> None:
        of = f"/{self.total:,}" if self.total else ""
        rate = self.n / max(time.perf_counter() - self._t0, 1e-9)
        print(f"{self.desc}: {self.n:,}{of} {self.unit}s ({rate:,.0f}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

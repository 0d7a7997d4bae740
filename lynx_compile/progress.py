"""A dependency-free progress bar on stderr (tqdm is not a dependency of the package)."""

from __future__ import annotations

import sys


class Progress:
    """``bar = Progress("sampling", total=20, unit="steps"); bar.update(); ...; bar.close()``."""

    def __init__(self, desc: str, total: int | None, enabled: bool = True, unit: str = "model calls"):
        self.desc, self.total, self.enabled, self.unit, self.count = desc, total, enabled, unit, 0
        self._draw()

    def update(self, *_) -> None:
        self.count += 1
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self.total:
            done = min(self.count, self.total)
            bar = "#" * (20 * done // self.total)
            sys.stderr.write(f"\r{self.desc}: [{bar:<20}] {done}/{self.total} {self.unit}")
        else:
            sys.stderr.write(f"\r{self.desc}: {self.count} {self.unit}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()

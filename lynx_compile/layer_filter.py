"""The ``include`` / ``exclude`` rule: which layers a user lets be sparse, by module path.

One rule for the backend's policy and for calibration, so that both select the same layers and
give the same reason for the ones they leave dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerFilter:
    include: tuple[str, ...] = ()   # regexes (``re.search``); empty: every path
    exclude: tuple[str, ...] = ()   # regexes; a match keeps the layer dense

    def reason(self, path: str) -> str:
        """Why the layer at ``path`` is filtered out ("" when the filters select it)."""
        if self.include and not any(re.search(pattern, path) for pattern in self.include):
            return "module path not matched by include"
        for pattern in self.exclude:
            if re.search(pattern, path):
                return f"module path matches exclude {pattern!r}"
        return ""

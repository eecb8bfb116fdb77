"""Report: the base of ckpt_attn.memory's result dataclasses (to_dict and a readable str)."""

from __future__ import annotations

import dataclasses

GIB = 2**30


def gib(nbytes: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{nbytes / GIB:.2f} GiB"


class Report:
    """Mixin for result dataclasses: to_dict(), and str() with byte fields in GiB."""

    def to_dict(self) -> dict:
        """The fields (nested reports and lists of them included) as plain Python."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                value = f"[{len(value)} entries]"
            elif field.name.endswith("bytes") and isinstance(value, (int, float)):
                value = gib(value)
            elif field.name.endswith("flops") and isinstance(value, (int, float)):
                value = f"{value:.3e}"
            parts.append(f"{field.name}={value}")
        return f"{type(self).__name__}({', '.join(parts)})"

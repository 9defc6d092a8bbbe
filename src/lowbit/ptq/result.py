"""What a post-training method reports for each layer it changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerResult:
    """One layer's outcome of one method: its reconstruction error before and after (mean squared error of the
    layer output against the float layer on the calibration inputs, when the method measures it), the seconds
    it took and method-specific details (scales, steps, shifts)."""

    method: str
    layer: str
    seconds: float
    error_before: float | None = None
    error_after: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "seconds": round(self.seconds, 4),
                "error_before": self.error_before, "error_after": self.error_after, **self.details}

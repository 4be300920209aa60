"""A metric's outcome: a number with its details, or "unavailable" with the reason, so that a
report prints what it could not measure and still runs the rest."""

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional


class MetricUnavailable(RuntimeError):
    """The metric cannot run here: a package or weight file is missing. The message names what
    is missing and how to provide it."""


@dataclass(frozen=True)
class MetricResult:
    """`value` is the metric (None when unavailable); `details` holds the numbers that qualify it
    (sample counts, detection rate, accuracy...); `reason` says why it is unavailable."""

    name: str
    value: Optional[float] = None
    details: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None

    def __post_init__(self):
        if (self.value is None) == (self.reason is None):
            raise ValueError(f"MetricResult {self.name!r} needs exactly one of value and reason")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"MetricResult {self.name!r} got a non-finite value {self.value}")

    @classmethod
    def unavailable(cls, name: str, reason: str) -> "MetricResult":
        return cls(name=name, reason=reason)

    @property
    def available(self) -> bool:
        return self.reason is None

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serializable dict."""
        out = {"name": self.name, "available": self.available, "value": self.value,
               "details": self.details}
        if self.reason is not None:
            out["reason"] = self.reason
        json.dumps(out)  # fail here, not in the report writer, if a detail is not serializable
        return out

    def __str__(self) -> str:
        if not self.available:
            return f"{self.name}: unavailable ({self.reason})"
        extra = ", ".join(f"{k} {_fmt(v)}" for k, v in self.details.items() if not isinstance(v, dict))
        return f"{self.name} = {self.value:.4f}" + (f" ({extra})" if extra else "")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def measure(name: str, fn: Callable[..., MetricResult], *args, **kwargs) -> MetricResult:
    """Runs `fn`; a MetricUnavailable becomes an unavailable result named `name`. Other errors
    propagate: they are bugs or bad input, not a missing dependency."""
    try:
        return fn(*args, **kwargs)
    except MetricUnavailable as exc:
        return MetricResult.unavailable(name, str(exc))

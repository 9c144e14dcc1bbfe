"""The allowed range of a numeric config field, declared beside the field (ground floor: every role's config uses it).

    bucket_mb: int = field(default=256, metadata=bounds(ge=1))
    \"\"\"Largest bucket of packed weights, in MiB.\"\"\"
    rule_weight: float = field(default=1.0, metadata=any_value("negative: the backend is a penalty; 0: off"))

``out_of_range`` walks a config tree and returns the first violation, naming the field, its value and the range;
oirl/config.py's validate() raises it at start-up, before any actor starts. Every int or float field must declare one or the
other (``any_value`` with the reason it may take any value): a field with neither is a programming error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

KEY = "oirl.range"


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field (None: unbounded on that side); ``why`` says why, or how to fix a bad value."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str = ""
    any_value: bool = False

    def contains(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def text(self, integral: bool = False) -> str:
        """'>= 1', '> 0', 'in [0, 1)', '1' (one allowed value), or for an int field a few values: '0, 1, 2 or 3'."""
        lo, hi = (self.ge if self.gt is None else self.gt), (self.le if self.lt is None else self.lt)
        if lo is not None and hi is not None:
            if lo == hi:
                return f"{lo:g}"
            if integral and self.gt is None and self.lt is None and hi - lo <= 3:
                values = [f"{v:g}" for v in range(int(lo), int(hi) + 1)]
                return f"{', '.join(values[:-1])} or {values[-1]}"
            return f"in {'[' if self.gt is None else '('}{lo:g}, {hi:g}{']' if self.lt is None else ')'}"
        if lo is not None:
            return f"{'>=' if self.gt is None else '>'} {lo:g}"
        assert hi is not None, "a Range without bounds must be declared with any_value()"
        return f"{'<=' if self.lt is None else '<'} {hi:g}"


def bounds(*, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           why: str = "") -> dict[str, Range]:
    """Field metadata: the value must satisfy every bound given (at least one)."""
    assert (ge, gt, le, lt) != (None, None, None, None), "bounds() needs a bound; use any_value(why) for none"
    assert ge is None or gt is None, "give ge or gt, not both"
    assert le is None or lt is None, "give le or lt, not both"
    return {KEY: Range(ge, gt, le, lt, why)}


def any_value(why: str) -> dict[str, Range]:
    """Field metadata: every finite value is meaningful; ``why`` says so (e.g. what a negative value does)."""
    assert why, "say why any value is allowed"
    return {KEY: Range(why=why, any_value=True)}


def is_numeric(f: dataclasses.Field) -> bool:
    """An int or float field (bools are not numbers here)."""
    return isinstance(f.default, (int, float)) and not isinstance(f.default, bool)


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get(KEY)


def out_of_range(node: Any, prefix: str = "") -> str | None:
    """The message for the first numeric field of the tree ``node`` outside its range; None when all are inside."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            error = out_of_range(value, f"{prefix}{f.name}.")
            if error:
                return error
            continue
        if not is_numeric(f):
            continue
        rng = field_range(f)
        assert rng is not None, (f"{type(node).__name__}.{f.name} has no range: declare it beside the field "
                                 "with metadata=bounds(...) or any_value(why) (oirl/bounds.py)")
        if not rng.any_value and not rng.contains(value):
            return f"{prefix}{f.name}={value!r} must be {rng.text(isinstance(value, int))}" + (f": {rng.why}" if rng.why else "")
    return None

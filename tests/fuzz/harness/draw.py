"""Drawing values: the :class:`Chooser` a fuzzer (hypothesis or atheris) draws from, the
shared constants and :class:`Finding`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

K = 4
MODALITIES = ("audio", "image")
#: Longest a single in-process call may take before it counts as a hang.
HANG_S = 5.0


class Finding(AssertionError):
    """A crash, hang, imprecise status or silently wrong answer."""


# --- drawing values -------------------------------------------------------------------------


class Chooser(Protocol):
    def int(self, lo: int, hi: int) -> int: ...
    def bool(self) -> bool: ...
    def float(self) -> float: ...
    def bytes(self, max_len: int) -> bytes: ...
    def text(self, max_len: int) -> str: ...


def choice(ch: Chooser, items: Sequence[Any]) -> Any:
    return items[ch.int(0, len(items) - 1)]


class HypothesisChooser:
    """Draws through hypothesis' ``st.data()``."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self._d = data
        self._st = st

    def int(self, lo: int, hi: int) -> int:
        return int(self._d.draw(self._st.integers(lo, hi)))

    def bool(self) -> bool:
        return bool(self._d.draw(self._st.booleans()))

    def float(self) -> float:
        return float(self._d.draw(self._st.floats(allow_nan=True, allow_infinity=True)))

    def bytes(self, max_len: int) -> bytes:
        return bytes(self._d.draw(self._st.binary(max_size=max_len)))

    def text(self, max_len: int) -> str:
        return str(self._d.draw(self._st.text(max_size=max_len)))


class FdpChooser:
    """Draws through atheris' ``FuzzedDataProvider``."""

    def __init__(self, fdp: Any) -> None:
        self._f = fdp

    def int(self, lo: int, hi: int) -> int:
        return int(self._f.ConsumeIntInRange(lo, hi))

    def bool(self) -> bool:
        return bool(self._f.ConsumeBool())

    def float(self) -> float:
        return float(
            self._f.ConsumeRegularFloat() if self._f.ConsumeBool() else self._f.ConsumeFloat()
        )

    def bytes(self, max_len: int) -> bytes:
        return bytes(self._f.ConsumeBytes(self._f.ConsumeIntInRange(0, max_len)))

    def text(self, max_len: int) -> str:
        return str(self._f.ConsumeUnicodeNoSurrogates(self._f.ConsumeIntInRange(0, max_len)))


SPECIAL_FLOATS = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-300,
    5e-324,
    1e300,
    -1e300,
    1.7976931348623157e308,
    math.nan,
    math.inf,
    -math.inf,
    1e-9,
    1 - 1e-16,
    1 + 1e-16,
    2.0,
    40.0,
    -40.0,
    745.0,
)


def a_float(ch: Chooser) -> float:
    return choice(ch, SPECIAL_FLOATS) if ch.bool() else ch.float()

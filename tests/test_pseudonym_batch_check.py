"""``first_non_pseudonym``'s fast paths agree with the one-by-one check (``is_pseudonym``)."""

from __future__ import annotations

import secrets

from hypothesis import given
from hypothesis import strategies as st

from jacfusion_fed.privacy.pseudonyms import first_non_pseudonym, is_pseudonym

HEX = secrets.token_hex(32)
BASE32 = "a" * 26 + "2" * 26

# 64-character near misses (the hex fast path must reject each), and other shapes.
NEAR = [
    HEX.upper(),
    HEX[:-1] + "g",
    HEX[:-1] + "\n",
    HEX[:-1] + "é",
    HEX[:-1] + " ",
    "z" * 64,
    HEX[:63],
    HEX + "0",
    BASE32,
    BASE32.upper(),
    "",
]


def _oracle(values: list[object]) -> int | None:
    return next((i for i, v in enumerate(values) if not is_pseudonym(v)), None)


def test_valid_batches_pass() -> None:
    assert first_non_pseudonym([secrets.token_hex(32) for _ in range(1024)]) is None
    assert first_non_pseudonym([HEX, BASE32, HEX]) is None


def test_each_near_miss_is_found_at_its_position() -> None:
    for bad in NEAR:
        values = [secrets.token_hex(32) for _ in range(5)]
        values.insert(3, bad)
        assert first_non_pseudonym(values) == _oracle(values), repr(bad)


@given(st.lists(st.sampled_from([HEX, BASE32, *NEAR, 7, None]), min_size=1, max_size=12))
def test_agrees_with_one_by_one(values: list[object]) -> None:
    assert first_non_pseudonym(values) == _oracle(values)

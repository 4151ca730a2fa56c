"""relay.control.phone: E.164 checks and normalization (examples and properties)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.control.phone import is_e164, normalize_e164

NANP_DIGIT = st.sampled_from("23456789")
DIGIT = st.sampled_from("0123456789")


@st.composite
def e164(draw: st.DrawFn) -> str:
    first = draw(st.sampled_from("123456789"))
    rest = draw(st.text(DIGIT, min_size=1, max_size=14))
    return "+" + first + rest


@st.composite
def nanp(draw: st.DrawFn) -> str:
    """Ten NANP digits: NXX NXX XXXX."""
    parts = [draw(NANP_DIGIT), *draw(st.lists(DIGIT, min_size=2, max_size=2))]
    parts += [draw(NANP_DIGIT), *draw(st.lists(DIGIT, min_size=6, max_size=6))]
    return "".join(parts)


@pytest.mark.parametrize(
    "raw",
    ["4155551234", "14155551234", "+14155551234", "+1 (415) 555-1234", "(415) 555-1234",
     "415.555.1234", " 1-415-555-1234 ", "+1 415 555 1234"],
)  # fmt: skip
def test_normalize_us_spellings(raw: str) -> None:
    assert normalize_e164(raw) == "+14155551234"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("+44 20 7946 0018", "+442079460018"), ("+61 (2) 9876-5432", "+61298765432"),
     ("+491701234567", "+491701234567")],
)  # fmt: skip
def test_normalize_international(raw: str, expected: str) -> None:
    assert normalize_e164(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "+", "++14155551234", "1+4155551234", "+0415555123", "415555123", "020 7946 0018",
     "1234567890",  # area code starts with 1: not NANP
     "4151234567",  # exchange starts with 1
     "24155551234",  # 11 digits not starting with the country code 1
     "+1234567890123456",  # 16 digits
     "415-555-1234 ext 5", "1-800-FLOWERS", "４１５５５５１２３４", "+١٤١٥٥٥٥١٢٣٤", "+1\n415"],
)  # fmt: skip
def test_normalize_refuses(raw: str) -> None:
    assert normalize_e164(raw) is None


@pytest.mark.parametrize(
    ("value", "ok"),
    [("+14155551234", True), ("+1", False), ("+12", True), ("+123456789012345", True),
     ("+1234567890123456", False), ("14155551234", False), ("+04155551234", False),
     ("+1 4155551234", False), (14155551234, False), (None, False), ("+１４１５", False)],
)  # fmt: skip
def test_is_e164(value: object, ok: bool) -> None:
    assert is_e164(value) is ok


def test_normalize_refuses_huge_and_non_strings() -> None:
    assert normalize_e164("+1" + " " * 100 + "4155551234") is None
    assert normalize_e164(None) is None  # type: ignore[arg-type]


@given(e164())
def test_e164_is_fixed_point(number: str) -> None:
    assert is_e164(number)
    assert normalize_e164(number) == number


@given(st.text(max_size=40))
def test_normalize_output_is_e164_and_idempotent(raw: str) -> None:
    out = normalize_e164(raw)
    if out is not None:
        assert is_e164(out)
        assert normalize_e164(out) == out


@given(e164(), st.lists(st.sampled_from([" ", "-", ".", "(", ")"]), max_size=20), st.randoms())
def test_separators_are_ignored(number: str, seps: list[str], rnd: object) -> None:
    chars = list(number[1:])
    for sep in seps:
        chars.insert(rnd.randint(0, len(chars)), sep)  # type: ignore[attr-defined]
    assert normalize_e164("+" + "".join(chars)) == number


@given(nanp(), st.booleans(), st.sampled_from(["{}", "({}) {}-{}", "{}.{}.{}", "{}-{}-{}"]))
def test_nanp_without_country_code(digits: str, with_one: bool, style: str) -> None:
    parts = (digits,) if style == "{}" else (digits[:3], digits[3:6], digits[6:])
    raw = ("1" if with_one else "") + style.format(*parts)
    assert normalize_e164(raw) == "+1" + digits


@given(st.text(DIGIT, min_size=1, max_size=20).filter(lambda d: len(d) not in (10, 11)))
def test_bare_digits_of_other_lengths_are_refused(digits: str) -> None:
    assert normalize_e164(digits) is None


@given(st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=3), e164())
def test_letters_are_refused(letters: str, number: str) -> None:
    assert normalize_e164(number + letters) is None

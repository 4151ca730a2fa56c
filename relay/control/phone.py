"""Phone numbers in E.164, the only form Twilio's REST API accepts for voice.

E.164 (ITU-T) is ``+``, a country code whose first digit is 1-9, then the subscriber
number: digits only, at most 15 digits in all. It is the form Twilio documents for the
``PhoneNumber`` filter of IncomingPhoneNumbers, the ``To``/``From`` of a Call, and the
``phone_number`` field it returns (https://www.twilio.com/docs/glossary/what-e164), so it is
the form the relay stores and compares. :func:`normalize_e164` turns what people type into
that form, refusing anything ambiguous instead of guessing: only a missing ``+1`` on a
North American (NANP) number is filled in, because that is the one omission US/Canadian
users make all the time and the result can be checked (area code and exchange both start
with 2-9). Other national formats (``020 7946 0018``, ``0044...``) need a country the
relay cannot know, so they are refused.
"""

from __future__ import annotations

import re

__all__ = ["is_e164", "normalize_e164"]

#: Twilio's own pattern for E.164 numbers.
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
#: A NANP subscriber number: NPA (area code) NXX (exchange) XXXX, N = 2-9.
_NANP = re.compile(r"[2-9][0-9]{2}[2-9][0-9]{6}")
#: What people put between digits: spaces, dashes, dots, brackets, slashes.
_SEPARATORS = frozenset(" \t-.()/")
_DIGITS = frozenset("0123456789")
#: Longer input is not a phone number, whatever it contains.
_MAX_INPUT = 64


def is_e164(s: object) -> bool:
    """True when ``s`` is a string in strict E.164 form (``+14155551234``): no spaces or
    punctuation, first digit 1-9, at most 15 digits."""
    return isinstance(s, str) and _E164.fullmatch(s) is not None


def normalize_e164(raw: str) -> str | None:
    """``raw`` as E.164, or None when it is not unambiguously a phone number.

    Accepted: E.164 with separators (``+1 (415) 555-1234``, ``+44 20 7946 0018``); ten
    NANP digits (``4155551234``, ``(415) 555-1234``) or eleven starting with the country
    code 1 (``14155551234``, ``1-415-555-1234``), both taken as ``+1``. Refused: letters,
    extensions, a ``+`` anywhere but first, national formats of other countries, and
    non-ASCII digits. ``normalize_e164(x) == x`` for every ``x`` that :func:`is_e164`.
    """
    if not isinstance(raw, str) or len(raw) > _MAX_INPUT:
        return None
    text = raw.strip()
    plus = text.startswith("+")
    if plus:
        text = text[1:]
    digits: list[str] = []
    for ch in text:
        if ch in _DIGITS:
            digits.append(ch)
        elif ch not in _SEPARATORS:
            return None
    number = "".join(digits)
    if plus:
        candidate = "+" + number
        return candidate if is_e164(candidate) else None
    # No country code given: only NANP is assumed, and only when it checks out.
    if len(number) == 11 and number.startswith("1"):
        number = number[1:]
    if len(number) == 10 and _NANP.fullmatch(number):
        return "+1" + number
    return None

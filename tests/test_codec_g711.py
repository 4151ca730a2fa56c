"""G.711 μ-law / A-law and the strict base64 decoder: compiled vs reference vs audioop.

Exhaustive where it is cheap (all 65,536 PCM inputs, all 256 codes), property-based
elsewhere.  Every test runs against both relay.media._codec and relay.media.codec_ref.
"""

from __future__ import annotations

import base64
import warnings
from array import array
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.media import _codec, codec_ref

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:  # Python >= 3.13
        audioop = None  # type: ignore[assignment]

needs_audioop = pytest.mark.skipif(audioop is None, reason="audioop removed (Python >= 3.13)")

IMPLS = [pytest.param(_codec, id="compiled"), pytest.param(codec_ref, id="ref")]
ALL_PCM = array("h", range(-32768, 32768)).tobytes()  # every int16, native order
if array("h", [1]).tobytes() != b"\x01\x00":  # big-endian host: make it LE
    _a = array("h", range(-32768, 32768))
    _a.byteswap()
    ALL_PCM = _a.tobytes()
ALL_CODES = bytes(range(256))


def _lin(pcm: bytes) -> list[int]:
    return [int.from_bytes(pcm[i : i + 2], "little", signed=True) for i in range(0, len(pcm), 2)]


# -- ITU-T G.191 (Software Tool Library) reference transcription, as an independent oracle --


def g191_ulaw_compress(x: int) -> int:
    absno = ((~x) >> 2) + 33 if x < 0 else (x >> 2) + 33  # one's complement for negatives
    absno = min(absno, 0x1FFF)
    i = absno >> 6
    segno = 1
    while i:
        segno += 1
        i >>= 1
    high = 8 - segno
    low = 0xF - ((absno >> segno) & 0xF)
    out = (high << 4) | low
    return out | 0x80 if x >= 0 else out


def g191_alaw_compress(x: int) -> int:
    ix = (~x) >> 4 if x < 0 else x >> 4
    if ix > 15:
        iexp = 1
        while ix > 16 + 15:
            ix >>= 1
            iexp += 1
        ix -= 16
        ix += iexp << 4
    if x >= 0:
        ix |= 0x80
    return ix ^ 0x55


def g191_expand(code: int, law: str) -> int:
    if law == "a":
        ix = (code ^ 0x55) & 0x7F
        iexp, mant = ix >> 4, ix & 0xF
        if iexp > 0:
            mant += 16
        mant = (mant << 4) + 8
        if iexp > 1:
            mant <<= iexp - 1
        return mant if code > 127 else -mant
    sign = -1 if code < 0x80 else 1
    mantissa = ~code
    exponent = (mantissa >> 4) & 7
    segment = exponent + 1
    mantissa &= 0xF
    step = 4 << segment
    return sign * ((0x80 << exponent) + step * mantissa + step // 2 - 4 * 33)


# -- exhaustive checks ------------------------------------------------------------------


@needs_audioop
@pytest.mark.parametrize("impl", IMPLS)
def test_all_inputs_match_audioop(impl: ModuleType) -> None:
    assert impl.ulaw_encode(ALL_PCM) == audioop.lin2ulaw(ALL_PCM, 2)
    assert impl.alaw_encode(ALL_PCM) == audioop.lin2alaw(ALL_PCM, 2)
    assert impl.ulaw_decode(ALL_CODES) == audioop.ulaw2lin(ALL_CODES, 2)
    assert impl.alaw_decode(ALL_CODES) == audioop.alaw2lin(ALL_CODES, 2)


def test_compiled_matches_reference_exhaustively() -> None:
    for name in ("ulaw_encode", "alaw_encode"):
        assert getattr(_codec, name)(ALL_PCM) == getattr(codec_ref, name)(ALL_PCM), name
    for name in ("ulaw_decode", "alaw_decode"):
        assert getattr(_codec, name)(ALL_CODES) == getattr(codec_ref, name)(ALL_CODES), name


def test_decode_tables_match_itu_g191() -> None:
    for impl in (_codec, codec_ref):
        assert _lin(impl.ulaw_decode(ALL_CODES)) == [g191_expand(c, "u") for c in range(256)]
        assert _lin(impl.alaw_decode(ALL_CODES)) == [g191_expand(c, "a") for c in range(256)]


def test_alaw_encode_matches_itu_g191() -> None:
    expected = bytes(g191_alaw_compress(x) for x in range(-32768, 32768))
    assert _codec.alaw_encode(ALL_PCM) == expected


def test_ulaw_encode_vs_itu_g191_sign_convention() -> None:
    """Documented difference: G.191 reads negative inputs with one's complement, audioop
    (and we) with two's complement.  Non-negative inputs agree exactly; negative ones
    differ at most by one code step (one quantisation interval), never in sign/segment
    beyond a boundary step."""
    ours = _codec.ulaw_encode(ALL_PCM)
    g191 = [g191_ulaw_compress(x) for x in range(-32768, 32768)]
    for i, x in enumerate(range(-32768, 32768)):
        if x >= 0:
            assert ours[i] == g191[i], x
        elif ours[i] != g191[i]:
            # codes are bit-inverted magnitudes: adjacent codes differ by 1
            assert abs(ours[i] - g191[i]) == 1, x


@pytest.mark.parametrize("impl", IMPLS)
def test_every_code_round_trips(impl: ModuleType) -> None:
    """encode(decode(c)) == c: each reconstruction level lies inside its own decision
    interval (G.711 tables 1a/2a).  μ-law has two zeros (0x7F, 0xFF): both decode to 0,
    which encodes to 0xFF (positive zero)."""
    for law in ("ulaw", "alaw"):
        back = getattr(impl, f"{law}_encode")(getattr(impl, f"{law}_decode")(ALL_CODES))
        for c in range(256):
            if law == "ulaw" and c == 0x7F:
                assert back[c] == 0xFF
            else:
                assert back[c] == c, (law, c)


@pytest.mark.parametrize("impl", IMPLS)
def test_quantisation_error_is_within_half_a_step(impl: ModuleType) -> None:
    """|decode(encode(x)) - x| never exceeds the segment's half step (plus the 2/3-bit
    truncation to 14/13 bits); checks the encoder picks the nearest level."""
    pcm = b"".join(ALL_PCM[i : i + 2] for i in range(0, len(ALL_PCM), 2 * 109))
    xs = _lin(pcm)
    for law, top in (("ulaw", 32124), ("alaw", 32256)):
        ys = _lin(getattr(impl, f"{law}_decode")(getattr(impl, f"{law}_encode")(pcm)))
        for x, y in zip(xs, ys, strict=True):
            step = max(8, 2 ** (max(abs(x), 1).bit_length() - 4))  # coarse upper bound
            if abs(x) <= top:
                assert abs(x - y) <= step, (law, x, y)


# -- input types, lengths ---------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bytes_like_inputs(impl: ModuleType) -> None:
    pcm = ALL_PCM[:640]
    want = impl.ulaw_encode(pcm)
    assert impl.ulaw_encode(bytearray(pcm)) == want
    assert impl.ulaw_encode(memoryview(pcm)) == want
    assert impl.ulaw_encode(memoryview(bytearray(pcm))[0:640]) == want
    codes = ALL_CODES
    assert impl.ulaw_decode(bytearray(codes)) == impl.ulaw_decode(codes)
    assert impl.alaw_decode(memoryview(codes)) == impl.alaw_decode(codes)
    assert impl.ulaw_encode(b"") == b""
    assert impl.ulaw_decode(b"") == b""


@pytest.mark.parametrize("impl", IMPLS)
def test_odd_pcm_length_is_an_error(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.ulaw_encode(b"\x00\x01\x02")
    with pytest.raises(ValueError):
        impl.alaw_encode(b"\x00")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_buffer_is_a_type_error(impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        impl.ulaw_encode("not bytes")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2000))
def test_random_buffers_compiled_equals_reference(data: bytes) -> None:
    pcm = data[: len(data) & ~1]
    assert _codec.ulaw_encode(pcm) == codec_ref.ulaw_encode(pcm)
    assert _codec.alaw_encode(pcm) == codec_ref.alaw_encode(pcm)
    assert _codec.ulaw_decode(data) == codec_ref.ulaw_decode(data)
    assert _codec.alaw_decode(data) == codec_ref.alaw_decode(data)


# -- base64 -----------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=700), st.booleans(), st.booleans())
def test_b64_round_trip(data: bytes, as_str: bool, strip_padding: bool) -> None:
    text = base64.b64encode(data)
    if strip_padding:
        text = text.rstrip(b"=")
    payload: str | bytes = text.decode() if as_str else text
    for impl in (_codec, codec_ref):
        assert impl.b64decode(payload) == data


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="AZaz09+/=-_ \n\x00é", max_size=24))
def test_b64_validation_compiled_equals_reference(text: str) -> None:
    def run(impl: ModuleType) -> bytes | str:
        try:
            return impl.b64decode(text)
        except ValueError:
            return "ValueError"

    assert run(_codec) == run(codec_ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", ["A", "AB=C", "ABC==", "A===", "AB CD", "ABCD\n", "é" * 4, "AB-_"])
def test_b64_rejects(impl: ModuleType, bad: str) -> None:
    with pytest.raises(ValueError):
        impl.b64decode(bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_b64_accepts_bytes_like(impl: ModuleType) -> None:
    assert impl.b64decode(bytearray(b"AAEC")) == b"\x00\x01\x02"
    assert impl.b64decode(memoryview(b"AAE=")) == b"\x00\x01"
    assert impl.b64decode("") == b""

"""Twilio signatures (checked against twilio-python's validator) and stream tokens."""

from __future__ import annotations

from twilio.request_validator import RequestValidator

from relay.protocol.signature import StreamTokens, compute_signature, validate_signature

PARAMS = {"CallSid": "CA123", "From": "+15550100001", "To": "+15550100000", "Digits": "1"}


def test_matches_twilio_python() -> None:
    url = "https://relay.example.com/twilio/voice?x=1"
    expected = RequestValidator("secret-token").compute_signature(url, PARAMS)
    assert compute_signature("secret-token", url, PARAMS) == expected
    assert validate_signature("secret-token", url, PARAMS, expected)


def test_rejects_tampering_and_wrong_token() -> None:
    url = "https://relay.example.com/twilio/voice"
    sig = compute_signature("secret-token", url, PARAMS)
    assert not validate_signature("other-token", url, PARAMS, sig)
    assert not validate_signature("secret-token", url, {**PARAMS, "To": "+1999"}, sig)
    assert not validate_signature("secret-token", url + "x", PARAMS, sig)
    assert not validate_signature("secret-token", url, PARAMS, None)
    assert not validate_signature("", url, PARAMS, sig)


def test_default_port_variants() -> None:
    sig = compute_signature("t", "wss://relay.example.com/twilio/stream")
    assert validate_signature("t", "wss://relay.example.com:443/twilio/stream", None, sig)
    sig443 = compute_signature("t", "https://relay.example.com:443/twilio/voice")
    assert validate_signature("t", "https://relay.example.com/twilio/voice", None, sig443)


def test_stream_tokens_bind_call_and_expire() -> None:
    tokens = StreamTokens(b"k" * 32, ttl_s=60)
    tok = tokens.issue("CA1|parrot", now=1000)
    assert tokens.verify("CA1|parrot", tok, now=1030)
    assert not tokens.verify("CA2|parrot", tok, now=1030)
    assert not tokens.verify("CA1|gpt", tok, now=1030)
    assert not tokens.verify("CA1|parrot", tok, now=1061)
    assert not tokens.verify("CA1|parrot", tok.replace(".", ".x"), now=1030)
    assert not tokens.verify("CA1|parrot", "", now=1030)
    other = StreamTokens(b"z" * 32, ttl_s=60)
    assert not other.verify("CA1|parrot", tok, now=1030)

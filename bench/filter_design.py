"""Design-time generator of the resampler's FIR coefficients (needs numpy + scipy).

Run ``python -m bench.filter_design`` to redesign the three anti-alias / anti-image filters,
print their measured response and the ``_FILTERS`` literal that is baked into both
``relay/_codec.pyx`` and ``relay/codec_ref.py`` (``--check`` compares instead of printing).
Neither runtime module imports scipy: the coefficients are constants.

Why linear-phase equiripple (Parks-McClellan) and not Kaiser or minimum-phase: the spec is
a 0.1 dB passband ripple up to 3.4 kHz and >= 70 dB rejection from 4.0 kHz.  A Kaiser window
spends taps on a stopband that keeps falling; an equiripple design meets the same spec with
87 taps at 16 kHz (Kaiser needs ~115 for 70 dB), i.e. a group delay of 43 samples =
2.69 ms, inside the 3 ms budget, with a delay that is *exactly* constant over the band.
That constant delay is what lets the streaming resampler trim it and emit time-aligned
output (so ``flush()`` can return exactly round(n * out / in) samples), and it makes
``delay_ms`` a single honest number instead of a frequency-dependent one.

Each filter runs at the "high" rate of its pair: 16 kHz for 8<->16, 24 kHz for 8<->24 and
48 kHz for 16<->24 (rational 3/2 via the common 48 kHz grid).  For 16<->24 the band edge is
the 16 kHz Nyquist: pass to 7 kHz, stop from 8 kHz.
Coefficients are rounded to float32 (the C loops run in float32 SIMD) and the response is
verified *after* that rounding.
"""

from __future__ import annotations

import argparse
import re
import sys

import numpy as np
from scipy import signal

# (high_rate, pass_edge_hz, stop_edge_hz): one filter per pair of rates
SPECS = {
    16000: (16000, 3400.0, 4000.0),
    24000: (24000, 3400.0, 4000.0),
    48000: (48000, 7000.0, 8000.0),
}
# Design targets carry margin over the requirement (0.1 dB ripple, 70 dB stopband) so the
# sine-sweep tests, which include int16 rounding of the output, pass with room to spare.
RIPPLE_DB = 0.08
STOP_DB = 71.5


def response(h: np.ndarray, fs: float, fp: float, fst: float) -> tuple[float, float]:
    """(passband ripple peak-to-peak dB over 0..fp, worst stopband level dB re DC gain)."""
    w, resp = signal.freqz(h, worN=1 << 16, fs=fs)
    mag = 20 * np.log10(np.abs(resp) + 1e-300)
    ref = 20 * np.log10(abs(h.sum()))
    pb = w <= fp
    return float(mag[pb].max() - mag[pb].min()), float(mag[w >= fst].max() - ref)


def design(fs: float, fp: float, fst: float) -> np.ndarray:
    for n in range(41, 401, 2):  # odd lengths: integer group delay (n - 1) / 2
        best = None
        for weight in np.geomspace(2, 200, 60):
            h = signal.remez(
                n, [0, fp, fst, fs / 2], [1, 0], weight=[1, weight], fs=fs, maxiter=500
            )
            h = (h / h.sum()).astype(np.float32)  # unity DC gain, then float32 as used at runtime
            ripple, stop = response(h.astype(np.float64), fs, fp, fst)
            if ripple <= RIPPLE_DB and stop <= -STOP_DB:
                margin = min(RIPPLE_DB - ripple, (-STOP_DB - stop) / 100)
                if best is None or margin > best[0]:
                    best = (margin, h)
        if best is not None:
            return best[1]
    raise RuntimeError(f"no design found for {fs} {fp} {fst}")


def _hex(v: float) -> str:
    """float.hex() without the trailing zero digits (float32 values need only 6 of 13)."""
    return re.sub(r"\.?0+p", "p", v.hex())


def literal(filters: dict[int, np.ndarray]) -> str:
    """The ``FILTER_HEX`` block of relay/_filters.py: per rate a ``@rate`` line, then
    float.hex() values (exact, compact, and untouched by ruff format)."""
    lines = ['FILTER_HEX = """']
    for rate, h in filters.items():
        lines.append(f"@{rate}")
        vals = [_hex(float(v)) for v in h]
        for i in range(0, len(vals), 6):
            lines.append(" ".join(vals[i : i + 6]))
    lines.append('"""')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with relay.media._filters")
    args = ap.parse_args(argv)
    filters = {}
    for rate, (fs, fp, fst) in SPECS.items():
        h = design(fs, fp, fst)
        ripple, stop = response(h.astype(np.float64), fs, fp, fst)
        delay = (len(h) - 1) / 2
        print(
            f"# {rate} Hz: {len(h)} taps, pass 0-{fp:.0f} Hz ripple {ripple:.4f} dB, "
            f"stop >= {fst:.0f} Hz {stop:.2f} dB, delay {delay:.0f} samples = "
            f"{delay / fs * 1000:.4f} ms",
            file=sys.stderr,
        )
        filters[rate] = h
    if args.check:
        from relay.media import codec_ref

        for rate, h in filters.items():
            baked = np.array(codec_ref._filter_taps(rate), dtype=np.float32)
            ok = len(baked) == len(h) and np.array_equal(baked, h)
            r, s = response(baked.astype(np.float64), *SPECS[rate])
            print(
                f"{rate}: baked {len(baked)} taps ripple {r:.4f} dB stop {s:.2f} dB "
                f"{'identical to' if ok else 'differs from'} this scipy's design"
            )
        return 0
    print(literal(filters))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

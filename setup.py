"""Build the Cython hot path (relay/media/_codec.pyx) with -O2.

A machine without a C compiler or without Cython gets one clear sentence instead of a
compiler traceback: the extension is not optional, the relay's per-frame budget relies on it.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            sys.exit(
                "relay: could not compile the Cython extension relay.media._codec "
                f"({exc.__class__.__name__}: {exc}); install a C compiler (gcc or clang) "
                "and the Python development headers (python3-dev), then reinstall."
            )

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            sys.exit(
                f"relay: compiling {ext.name} failed ({exc.__class__.__name__}: {exc}); "
                "a working C compiler and python3-dev headers are required."
            )


def extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.exit("relay: Cython is required to build relay.media._codec; run `pip install cython`.")
    exts = [
        Extension(
            "relay.media._codec",
            ["relay/media/_codec.pyx"],
            # -ffp-contract=off: no fused multiply-add, so the float32 resampler rounds
            # exactly like relay.media.codec_ref (GCC contracts by default where FMA exists).
            extra_compile_args=["-O2", "-ffp-contract=off"],
        ),
    ]
    return cythonize(exts, language_level=3, compiler_directives={"embedsignature": True})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})

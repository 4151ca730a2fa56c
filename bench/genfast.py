"""The load generator's compiled fast paths (``bench/_genfast.pyx``), built on first use.

The bench is a tool that runs from the source tree, not part of the installed ``relay``
package, so its extension is not built by ``setup.py``: the first run compiles it in
place (Cython + the C compiler the relay's own build needs, ~10 s), later runs reuse it
until the ``.pyx`` changes. Without a compiler the generator runs on its pure-Python
reference code, prints why, and says so in its results; ``BENCH_PURE_PYTHON=1`` forces that.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import io
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
PYX = HERE / "_genfast.pyx"
NAME = "bench._genfast"

_cached: tuple[ModuleType | None, str] | None = None


def _so_path() -> Path:
    return HERE / ("_genfast" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def _build() -> None:
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    build_tmp = HERE.parent / "build" / "bench-genfast"
    ext = Extension(NAME, [str(PYX)], extra_compile_args=["-O2"])
    dist = Distribution(
        {
            "ext_modules": cythonize([ext], quiet=True, language_level=3, build_dir=str(build_tmp)),
            "script_name": "setup.py",
        }
    )
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = str(HERE.parent)  # -> bench/_genfast.<abi>.so
    cmd.build_temp = str(build_tmp)
    cmd.ensure_finalized()
    # distutils prints every compiler command line; keep the bench's output readable
    with contextlib.redirect_stdout(io.StringIO()):
        cmd.run()


def load(build: bool = True) -> tuple[ModuleType | None, str]:
    """``(module, description)``: the compiled engine, or ``(None, why not)``."""
    global _cached
    if _cached is not None:
        return _cached
    if os.environ.get("BENCH_PURE_PYTHON"):
        _cached = (None, "pure Python (BENCH_PURE_PYTHON set)")
        return _cached
    so = _so_path()
    try:
        stale = not so.exists() or so.stat().st_mtime < PYX.stat().st_mtime
        if stale:
            if not build:
                _cached = (None, "pure Python (compiled fast path not built)")
                return _cached
            lock_path = HERE.parent / "build" / "bench-genfast.lock"
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (tests, subprocesses)
                if not so.exists() or so.stat().st_mtime < PYX.stat().st_mtime:
                    _build()
        spec = importlib.util.spec_from_file_location(NAME, so)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {so}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[NAME] = mod
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        print(
            f"bench: compiled load-generator fast path unavailable ({why}); "
            "running the pure-Python generator, which saturates at fewer calls",
            file=sys.stderr,
        )
        _cached = (None, f"pure Python ({why})")
        return _cached
    _cached = (mod, "compiled (bench/_genfast.pyx)")
    return _cached

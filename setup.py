"""Builds ext/*.pyx into protocols/ when Cython and a C compiler are there.

Without them the package still installs and runs on its pure-Python twin
(protocols/_pyframing.py); this is said once, on stderr.
"""

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_warned = []


def _say_pure(reason):
    if not _warned:
        _warned.append(reason)
        sys.stderr.write("meter-gateway: building without the compiled frame parser (%s); "
                         "the pure-Python twin will be used\n" % reason)


class OptionalBuildExt(build_ext):
    """A failed compile is not a failed install: the pure-Python twin takes over."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, missing headers
            _say_pure(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            _say_pure(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def extensions():
    if os.environ.get("MGW_PURE_PYTHON", "") not in ("", "0"):
        _say_pure("MGW_PURE_PYTHON is set")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _say_pure("Cython is not installed")
        return []
    sources = sorted(glob.glob(os.path.join("ext", "*.pyx")))
    exts = [Extension("protocols." + os.path.splitext(os.path.basename(src))[0], [src],
                      extra_compile_args=["-O2"]) for src in sources]
    return cythonize(exts, language_level=3, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})

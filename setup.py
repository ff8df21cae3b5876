"""Builds ext/*.pyx into protocols/ when Cython and a C compiler are there.

Without them the package still installs and runs on its pure-Python twin
(protocols/_pyframing.py); this is said once, on stderr. The command line's message
catalogues (gateway/locale/*/LC_MESSAGES/mgw.po) are compiled to .mo beside their source by
Babel (setup.cfg [compile_catalog]); without Babel the command line speaks English only.
"""

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

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


class BuildPyWithCatalogues(build_py):
    """.po -> .mo beside the source (so editable installs have them too), then the usual."""

    def run(self):
        if glob.glob(os.path.join("gateway", "locale", "*", "LC_MESSAGES", "*.po")):
            try:
                import babel  # noqa: F401
            except ImportError:
                sys.stderr.write("meter-gateway: Babel is not installed: the command line's "
                                 "translations are not compiled (English only)\n")
            else:
                self.run_command("compile_catalog")
        super().run()


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


setup(ext_modules=extensions(),
      cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithCatalogues})

"""Build the typed core ``pkvm._core`` (Cython 3).

Build switches (environment variables, see docs/profiling.md):

- ``PKVM_CYTHON_DEBUG=1`` turns bounds and initialization checks on and writes the annotated
  HTML next to the source.
- ``PKVM_CYTHON_PROFILE=1`` builds for profilers: ``#line`` directives make the debug info
  (perf, gdb, py-spy ``--native``) name ``.pyx`` lines instead of ``_core.c`` lines, and
  Cython's ``profile``/``linetrace`` let ``cProfile`` and line tracers see the core's
  functions. Its generated C is kept in ``build/cython-profile/pkvm/_core.c``. It is slower
  (the tracing hooks); never ship it. Switching between the two builds needs
  ``build_ext --force`` (setuptools compares only file times).
"""
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PKVM_CYTHON_DEBUG") == "1"
PROFILE = os.environ.get("PKVM_CYTHON_PROFILE") == "1"
DIRECTIVES = {
    "language_level": 3,
    "embedsignature": True,
    "wraparound": False,
    "cdivision": True,
    "boundscheck": DEBUG,
    "initializedcheck": DEBUG,
    "profile": PROFILE,
    "linetrace": PROFILE,
}
# -g costs nothing at run time and lets perf resolve symbols; frame pointers keep stacks whole.
FLAGS = ["-O2", "-g", "-fno-omit-frame-pointer"]
MACROS = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if PROFILE:
    # Functions that run without the GIL stay untraced: tracing them would take the GIL for
    # every call and line, which makes a profiled run hundreds of times slower.
    MACROS += [("CYTHON_TRACE", "1")]

setup(
    ext_modules=cythonize(
        [
            Extension(
                "pkvm._core",
                ["pkvm/_core.pyx"],
                include_dirs=[np.get_include()],
                define_macros=MACROS,
                extra_compile_args=FLAGS,
            )
        ],
        compiler_directives=DIRECTIVES,
        annotate=DEBUG,
        emit_linenums=PROFILE,
        # The profiling build generates its own C file, kept there for the tools that read it.
        build_dir="build/cython-profile" if PROFILE else None,
    )
)

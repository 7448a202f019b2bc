"""Build the typed core ``pkvm._core`` (Cython 3).

``PKVM_CYTHON_DEBUG=1`` turns bounds and initialization checks on and writes the annotated
HTML next to the source.
"""
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PKVM_CYTHON_DEBUG") == "1"
DIRECTIVES = {
    "language_level": 3,
    "embedsignature": True,
    "wraparound": False,
    "cdivision": True,
    "boundscheck": DEBUG,
    "initializedcheck": DEBUG,
}
# -g costs nothing at run time and lets perf resolve symbols; frame pointers keep stacks whole.
FLAGS = ["-O2", "-g", "-fno-omit-frame-pointer"]

setup(
    ext_modules=cythonize(
        [
            Extension(
                "pkvm._core",
                ["pkvm/_core.pyx"],
                include_dirs=[np.get_include()],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=FLAGS,
            )
        ],
        compiler_directives=DIRECTIVES,
        annotate=DEBUG,
    )
)

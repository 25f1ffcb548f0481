"""The optional C extension scratchlm._kernels (AVX2 products with quantized blocks; see scratchlm/_kernels.c).

Everything else is in pyproject.toml. When the extension does not compile (no compiler, another CPU
family), the install goes on without it and scratchlm uses its numba kernels (scratchlm/kernels.py).
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the extension if possible; a failure is a warning, never a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all
            print(f"scratchlm: C kernels not built ({e}); the numba kernels will be used", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"scratchlm: C kernels not built ({e}); the numba kernels will be used", file=sys.stderr)


setup(
    ext_modules=[Extension("scratchlm._kernels", ["scratchlm/_kernels.c"],
                           extra_compile_args=["-O3", "-std=gnu11", "-pthread"], extra_link_args=["-pthread"])],
    cmdclass={"build_ext": OptionalBuildExt},
)

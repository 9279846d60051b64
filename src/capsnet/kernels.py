"""The EM vote kernels' old path: the module object of :mod:`capsnet.ops.kernels` itself.

``routing/em.py`` imports ``capsnet.kernels``; this goes when it names ``capsnet.ops.kernels``.
"""

import sys

from .ops import kernels

sys.modules[__name__] = kernels

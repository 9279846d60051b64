"""The schedules' old path: the module object of :mod:`capsnet.train.schedules` itself.

``train/config.py`` imports ``capsnet.schedules``; this goes when it names ``capsnet.train.schedules``.
"""

import sys

from .train import schedules

sys.modules[__name__] = schedules

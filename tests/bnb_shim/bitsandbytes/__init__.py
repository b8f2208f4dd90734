"""A stand-in `bitsandbytes` package that maps the names fourbit claims to be compatible with onto
fourbit, so bitsandbytes' own test files can run against fourbit unchanged (see run_bnb_tests.py).

Only for that reviewer-run: it is never on sys.path in the normal test suite. Module objects are
aliased (not copied), so `bitsandbytes.nn.Linear4bit is fourbit.nn.Linear4bit`.
"""

import sys

from fourbit import functional, nn, optim
from fourbit.functional import matmul_4bit

from . import cextension

sys.modules[__name__ + ".functional"] = functional
sys.modules[__name__ + ".nn"] = nn
sys.modules[__name__ + ".optim"] = optim

__version__ = "0.50.2+fourbit"
__all__ = ["cextension", "functional", "matmul_4bit", "nn", "optim"]

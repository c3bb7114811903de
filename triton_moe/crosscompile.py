"""Alias of :mod:`triton_moe.tools.crosscompile` (the compile check lives outside the kernels' import path):
``python -m triton_moe.crosscompile`` and ``from triton_moe.crosscompile import ...`` keep working."""
import sys

if __name__ == "__main__":
    from triton_moe.tools.crosscompile import main

    sys.exit(main())
else:
    from .tools import crosscompile as _impl

    sys.modules[__name__] = _impl

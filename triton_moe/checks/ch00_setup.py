"""Chapter 0 checker: a ten-line Triton kernel, y = a * x + b."""
from __future__ import annotations

import torch

from ..checking import CheckFailure, compare, exercise, expect_tensor, poisoned, ranges
from ..mode import device


@exercise("00", "axpb", points=1, kernels=("axpb_kernel",),
          hint="mask = offsets < n; x = tl.load(x_ptr + offsets, mask=mask); "
               "tl.store(y_ptr + offsets, a * x + b, mask=mask)")
def check_axpb(fn, seed):
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for n in (1, 1000, 4099):  # none is a multiple of a power-of-two block
        x = torch.randn(n, generator=gen).to(device())
        a, b = float(torch.randn(1, generator=gen)), float(torch.randn(1, generator=gen))
        # Guard elements past the end (a full block of any size up to 4096) catch an unmasked store without
        # letting it corrupt the heap: the interpreter does not check bounds.
        out = poisoned((n + 4096,), torch.float32, device())
        y = fn(x, a, b, out[:n])
        expect_tensor("y", y, (n,), torch.float32, device())
        if not torch.isnan(out[n:]).all():
            raise CheckFailure(f"n={n}: wrote past the end of the output (elements >= {n})",
                               hint="mask the store: tl.store(ptr, value, mask=offsets < n)")
        ref = a * x.double() + b
        nan = torch.isnan(y).nonzero().flatten()
        if len(nan):
            raise CheckFailure(f"n={n}: elements {ranges(nan.tolist())} were never written (still NaN)",
                               hint="every program must store its block, and the grid must cover all n elements")
        compare("y", y[:, None], ref[:, None], torch.float32, lambda i: f"element {i}")
        cases.append(f"n={n}")
    return cases

"""Chapter 0 checker: a ten-line Triton kernel, y = a * x + b."""
from __future__ import annotations

import torch

from ..checking import CheckFailure, Guarded, compare, exercise, expect_tensor, fitted_tolerance, ranges
from ..mode import device
from .memcheck import watch

MASK_HINT = "mask the load and the store: mask = offsets < n; tl.load(x_ptr + offsets, mask=mask)"


@exercise("00", "axpb", points=1, kernels=("axpb_kernel",),
          hint="mask = offsets < n; x = tl.load(x_ptr + offsets, mask=mask); "
               "tl.store(y_ptr + offsets, a * x + b, mask=mask)")
def check_axpb(fn, seed):
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for n in (1, 1000, 4099):  # none is a multiple of a power-of-two block
        # NaN guard elements around x and y (a full block of any size up to 4096): an unmasked load reads NaN
        # into y, an unmasked store lands in y's guard instead of the heap (the CPU run also checks bounds).
        x = Guarded("x", (n,), torch.float32, device(), before=64, after=4096,
                    init=torch.randn(n, generator=gen).to(device()))
        out = Guarded("y", (n,), torch.float32, device(), before=64, after=4096)
        a, b = float(torch.randn(1, generator=gen)), float(torch.randn(1, generator=gen))
        try:
            with watch() as rec:
                y = fn(x.view, a, b, out.view)
        except CheckFailure as exc:
            raise CheckFailure(f"n={n}: {exc.message}", MASK_HINT) from None
        expect_tensor("y", y, (n,), torch.float32, device())
        out.check(f"n={n}", hint="mask the store: tl.store(ptr, value, mask=offsets < n)")
        x.check(f"n={n}")
        ref = a * x.view.double() + b
        nan = torch.isnan(y).nonzero().flatten()
        if len(nan):
            raise CheckFailure(f"n={n}: elements {ranges(nan.tolist())} are NaN: never written, or computed from "
                               "reads past the end of x (its guard memory is NaN)",
                               hint="every program must store its block, the grid must cover all n elements, and "
                                    "the load must be masked (offsets < n)")
        compare("y", y[:, None], ref[:, None], torch.float32, lambda i: f"element {i}",
                tol=fitted_tolerance(torch.float32))
        rec.require(fn, ("axpb_kernel",), "y")
        cases.append(f"n={n}")
    return cases

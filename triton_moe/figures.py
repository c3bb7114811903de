"""Pictures shared by the notebooks (matplotlib only)."""
from __future__ import annotations

import torch

from .shapes import MoEShape

# Datasheet values, used only where no measurement exists and always labelled as such.
DATASHEET = {
    "H100 SXM (datasheet)": {"bytes_per_s": 3.35e12, "bf16_flops": 989e12},
    "MI300X (datasheet)": {"bytes_per_s": 5.3e12, "bf16_flops": 1307e12},
}


def routing_picture(topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: int, ax=None, title=""):
    """Tokens on the left, experts on the right, one line per (token, chosen expert), width ~ weight."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    M, k = topk_ids.shape
    colors = plt.cm.tab10.colors
    ty = lambda t: 1 - t / max(M - 1, 1)  # noqa: E731
    ey = lambda e: 1 - e / max(experts - 1, 1)  # noqa: E731
    for t in range(M):
        for j in range(k):
            e = int(topk_ids[t, j])
            w = float(topk_weights[t, j])
            ax.plot([0, 1], [ty(t), ey(e)], color=colors[e % 10], lw=0.5 + 4 * w, alpha=0.7)
    counts = torch.bincount(topk_ids.flatten().long().cpu(), minlength=experts)
    for t in range(M):
        ax.text(-0.03, ty(t), f"token {t}", ha="right", va="center", fontsize=8)
    for e in range(experts):
        ax.text(1.03, ey(e), f"expert {e} ({int(counts[e])} tokens)", ha="left", va="center", fontsize=8,
                color=colors[e % 10])
    ax.set_xlim(-0.4, 1.5)
    ax.axis("off")
    ax.set_title(title or f"{M} tokens, top-{k} of {experts} experts (line width = routing weight)")
    return ax


def roofline(shapes: list[MoEShape], bytes_per_s: float, flops_per_s: float, label: str, ax=None,
             tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)):
    """Arithmetic intensity (FLOP per byte moved) of each model's MoE layer against M, on the roofline
    of one device: attainable FLOP/s = min(peak, intensity * bandwidth)."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    ridge = flops_per_s / bytes_per_s
    xs = np.logspace(-0.5, 4, 200)
    ax.plot(xs, np.minimum(flops_per_s, xs * bytes_per_s) / 1e12, "k-", lw=2, label=f"roofline: {label}")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    ax.text(ridge * 1.1, flops_per_s / 1e12 * 0.05, f"ridge {ridge:.0f} FLOP/B", fontsize=8, color="gray")
    for n, s in enumerate(shapes):
        inten = [s.flops(m) / (s.weight_bytes(m) + s.activation_bytes(m)) for m in tokens]
        attain = [min(flops_per_s, i * bytes_per_s) / 1e12 for i in inten]
        ax.plot(inten, attain, "o-", ms=3, label=s.name)
        for m, i, a in zip(tokens, inten, attain):
            if n == 0 and m in (1, 16, 256, 4096):
                ax.annotate(f"M={m}", (i, a), fontsize=7, xytext=(3, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("attainable TFLOP/s")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return ax

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


def roofline(shapes: list[MoEShape], bytes_per_s: float, flops_per_s: float, label: str, axes=None,
             tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)):
    """Two panels. Left: each model's arithmetic intensity (FLOP per byte moved) against M, with the device's
    ridge point: where a model's curve crosses it, the layer turns from memory-bound to compute-bound. Right:
    those intensities placed on the roofline of the device, attainable FLOP/s = min(peak, intensity *
    bandwidth). (On the roofline itself every model lies on the same line, so the left panel is what tells
    them apart.) Returns the two axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    left, right = axes
    ridge = flops_per_s / bytes_per_s
    markers = "osD^v"
    for n, s in enumerate(shapes):
        inten = [s.flops(m) / (s.weight_bytes(m) + s.activation_bytes(m)) for m in tokens]
        color, marker = f"C{n}", markers[n % len(markers)]
        left.plot(tokens, inten, marker=marker, ms=4, color=color, label=f"{s.name} (E={s.experts}, top-{s.top_k})")
        crossing = next((m for m, i in zip(tokens, inten) if i >= ridge), None)
        if crossing:
            left.annotate(f"M={crossing}", (crossing, ridge), xytext=(4, -12 - 10 * n), textcoords="offset points",
                          fontsize=7, color=color)
        attain = [min(flops_per_s, i * bytes_per_s) / 1e12 for i in inten]
        right.plot(inten, attain, linestyle="none", marker=marker, ms=7 - 1.5 * n, color=color,
                   markerfacecolor="none" if n else color, label=s.name)
    left.axhline(ridge, color="gray", ls=":", lw=1)
    left.text(tokens[0], ridge * 1.15, f"ridge of {label.split(' (')[0]}: {ridge:.0f} FLOP/B", fontsize=8,
              color="gray")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("tokens M")
    left.set_ylabel("FLOP per byte moved")
    left.set_title("arithmetic intensity of the MoE layer (bf16, uniform routing)", fontsize=9)
    left.legend(fontsize=8)
    left.grid(True, which="both", alpha=0.3)

    xs = np.logspace(-0.5, 4, 200)
    right.plot(xs, np.minimum(flops_per_s, xs * bytes_per_s) / 1e12, "k-", lw=1.5, label="roofline", zorder=0)
    right.axvline(ridge, color="gray", ls=":", lw=1)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    right.set_ylabel("attainable TFLOP/s")
    right.set_title(f"roofline: {label}", fontsize=9)
    right.legend(fontsize=8, loc="lower right")
    right.grid(True, which="both", alpha=0.3)
    plt.tight_layout()
    return axes

"""Model shapes and the napkin math every chapter starts from.

An expert is a SwiGLU MLP: ``W2 @ (silu(W1 @ x) * (W3 @ x))`` with W1, W3 of shape [ffn, hidden] and W2 of
shape [hidden, ffn]. Stacked over experts they are ``w1, w3: [E, ffn, hidden]`` and ``w2: [E, hidden, ffn]``
(the ``[E, N, K]`` layout every kernel in the course reads).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int        # K of the gate/up projections, N of the down projection
    ffn: int           # intermediate size of one expert
    experts: int       # E
    top_k: int         # experts per token
    router: str = "mixtral"  # "mixtral", "qwen3" or "deepseek_v3" (see chapter 2)

    def weight_bytes_per_expert(self, bytes_per_elem: int = 2) -> int:
        """Gate, up and down matrices of one expert."""
        return 3 * self.hidden * self.ffn * bytes_per_elem

    def expected_active_experts(self, tokens: int) -> float:
        """Experts that receive at least one token, with uniform independent routing:
        each expert is missed by one token with probability (1 - k/E)."""
        if tokens <= 0:
            return 0.0
        return self.experts * (1.0 - (1.0 - self.top_k / self.experts) ** tokens)

    def weight_bytes(self, tokens: int, bytes_per_elem: int = 2) -> float:
        """Expert-weight bytes that must be read from memory at least once for ``tokens`` tokens."""
        return self.expected_active_experts(tokens) * self.weight_bytes_per_expert(bytes_per_elem)

    def activation_bytes(self, tokens: int, bytes_per_elem: int = 2) -> float:
        """Input read once and output written once (the least any implementation moves)."""
        return 2 * tokens * self.hidden * bytes_per_elem

    def flops(self, tokens: int) -> float:
        """Multiply-adds of the three projections for every (token, chosen expert) pair, times 2."""
        return 2.0 * tokens * self.top_k * 3 * self.hidden * self.ffn

    def floor_seconds(self, tokens: int, bytes_per_s: float, flops_per_s: float) -> float:
        """The roofline floor: no kernel can beat the slower of moving the bytes and doing the math."""
        moved = self.weight_bytes(tokens) + self.activation_bytes(tokens)
        return max(moved / bytes_per_s, self.flops(tokens) / flops_per_s)

    def scaled(self, hidden: int, ffn: int, experts: int | None = None, top_k: int | None = None) -> "MoEShape":
        """A small copy with the same routing structure, for CPU runs."""
        return MoEShape(f"{self.name} (small)", hidden, ffn, experts or self.experts,
                        top_k or self.top_k, self.router)


MIXTRAL_8X7B = MoEShape("Mixtral-8x7B", 4096, 14336, 8, 2, "mixtral")
QWEN3_30B_A3B = MoEShape("Qwen3-30B-A3B", 2048, 768, 128, 8, "qwen3")
DEEPSEEK_V3 = MoEShape("DeepSeek-V3 (routed)", 7168, 2048, 256, 8, "deepseek_v3")

MODELS: dict[str, MoEShape] = {
    "mixtral": MIXTRAL_8X7B,
    "qwen3": QWEN3_30B_A3B,
    "deepseek_v3": DEEPSEEK_V3,
}

# Small shapes for the CPU interpreter: about 7 ms per (program x K-iteration), so keep K, N <= 512.
CPU_SHAPES: dict[str, MoEShape] = {
    "mixtral": MIXTRAL_8X7B.scaled(hidden=128, ffn=256),
    "qwen3": QWEN3_30B_A3B.scaled(hidden=128, ffn=64, experts=16, top_k=4),
    "deepseek_v3": DEEPSEEK_V3.scaled(hidden=128, ffn=64, experts=32, top_k=8),
}

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def shape_for_mode(key: str = "mixtral") -> MoEShape:
    """Full model shape on a GPU, the small copy on the CPU."""
    from .mode import ON_GPU

    return MODELS[key] if ON_GPU else CPU_SHAPES[key]

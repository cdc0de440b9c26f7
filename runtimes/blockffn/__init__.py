"""CPU kernels for BlockFFN sparse FFNs: one token (decoding) or a chunk of tokens sharing the union
of their active experts, fp32 or int8 weights, multi-threaded (C + OpenMP, compiled at first use).

    ffn = SparseFFN(up, down, router_w=..., norm_w=..., activation="silu", dtype="fp32")
    y = ffn(x)                           # = ffn.experts(x, ffn.route(x))

``reference_router`` / ``reference_experts`` are the float64 torch oracle.
"""

from edgekit.runtimes.blockffn.kernel import SparseFFN, kernel_info, quantize_rows
from edgekit.runtimes.blockffn.reference import reference_experts, reference_router

__all__ = ["SparseFFN", "kernel_info", "quantize_rows", "reference_experts", "reference_router"]

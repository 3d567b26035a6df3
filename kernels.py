"""
The GPU-specific pieces of the MoE layer, kept out of model.py so that it reads like the math:
grouped_mm with its CUDA rules, the gather with a gather backward, and fused-AdamW support.
model.py's GroupedExperts.forward_loop is the readable reference these must equal
(tests/test_model.py, and tests/test_cuda_rules.py emulates CUDA's rules on a CPU).
"""

import torch
import torch.nn.functional as F

HAS_GROUPED_MM = hasattr(F, 'grouped_mm')


def use_grouped_mm(expert_impl, device_type, dtype, aligned=True):
    """Whether the experts run as grouped_mm (else the per-expert slice loop). 'auto' takes grouped_mm
    only where it is one kernel that torch.compile can trace: CUDA, bf16 (grouped_mm's meta function,
    what compile traces, accepts bf16 only), 16-byte-aligned row strides. The rest takes the loop: CPU
    (measured faster there, docs/performance.md), and fp32 / fp16 on CUDA, where compiled grouped_mm
    would crash."""
    if not HAS_GROUPED_MM or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # old torch, or float64 (tests): grouped_mm has no kernel for it
    if expert_impl != 'auto':
        return expert_impl == 'grouped'
    return device_type == 'cuda' and dtype == torch.bfloat16 and aligned


@torch.compiler.disable
def grouped_mm_eager(a, b, offs):
    """grouped_mm outside torch.compile's graph: its meta function accepts bf16 only, while the eager
    kernels also run fp32 / fp16. expert_impl='grouped' in those dtypes compiles with a graph break."""
    return F.grouped_mm(a, b, offs=offs)


def append_ones(a_NX):
    """(N, X) -> (N, X+8): [a, 1, 0 x 7]. Eight columns, not one: row strides stay multiples of 16 bytes."""
    N = a_NX.shape[0]
    return torch.cat([a_NX, a_NX.new_ones(N, 1), a_NX.new_zeros(N, 7)], dim=1)


def append_bias(w_EXY, b_EY):
    """(E, X, Y) -> (E, X+8, Y): [w; b; 0 x 7], so that append_ones(a) @ append_bias(w, b) = a @ w + b."""
    E, _, Y = w_EXY.shape
    return torch.cat([w_EXY, b_EY.to(w_EXY.dtype).unsqueeze(1), w_EXY.new_zeros(E, 7, Y)], dim=1)


def grouped_mlp(x_ND, w1_EDF, b1_EF, w2_EHD, b2_ED, counts_E, kept_N1, act):
    """Every expert's MLP on its contiguous rows of x_ND in two grouped_mm calls: act(x w1 + b1) w2 + b2.
    CUDA's grouped_mm allocates its output uninitialised and writes only the rows up to offs[-1], in
    forward and in the input gradient of backward: those rows hold garbage (NaN, Inf), and 0 * NaN is
    NaN. So with dropped rows (kept_N1) every grouped_mm output is masked at once, and the activation's
    output too (its backward input is the next grouped_mm's input gradient).
    Biases ride inside the grouped_mm ([x 1] @ [w; b]): their gradient then comes out of grouped_mm's
    weight gradient, each expert's rows summed with fp32 accumulation like a dense Linear's bias,
    instead of atomic adds over a gathered b[expert of each row]."""
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    mm_fn = F.grouped_mm if x_ND.dtype == torch.bfloat16 else grouped_mm_eager

    def mm(a, b):
        y = mm_fn(a, b, offs=offs_E)
        return y if kept_N1 is None else torch.where(kept_N1, y, 0)

    if b1_EF is not None:
        x_ND, w1_EDF = append_ones(x_ND), append_bias(w1_EDF, b1_EF)
    h_NH = act(mm(x_ND, w1_EDF))
    if kept_N1 is not None:
        h_NH = torch.where(kept_N1, h_NH, 0)
    if b2_ED is not None:
        h_NH, w2_EHD = append_ones(h_NH), append_bias(w2_EHD, b2_ED)
    return mm(h_NH, w2_EHD)


class GatherRows(torch.autograd.Function):
    """x[idx] where every row of x is taken exactly k times: the dispatch (k rows per token) and the
    combine (k = 1, a permutation back to token order). Given inv_idx, the rows of the output holding
    row i's copies at inv_idx[i*k : (i+1)*k], the backward is a gather and a sum over the k copies.
    index_select's own backward is an index_add_: atomic adds (slow on GPUs)."""

    @staticmethod
    def forward(ctx, x, idx, inv_idx, k):
        ctx.save_for_backward(inv_idx)
        ctx.k = k
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        inv_idx, = ctx.saved_tensors
        g = grad.index_select(0, inv_idx)
        return (g if ctx.k == 1 else g.view(-1, ctx.k, g.shape[1]).sum(1)), None, None, None


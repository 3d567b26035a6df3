"""
The GPU-specific pieces of the MoE layer, kept out of model.py so that it reads like the math:
grouped_mm with its CUDA rules, expert biases as a pointwise add, and the dispatch permutation whose
backward needs no atomic adds.
model.py's GroupedExperts.forward_loop is the readable reference these must equal
(tests/test_model.py, and tests/test_cuda_rules.py emulates CUDA's rules on a CPU).
"""

import torch
import torch.nn.functional as F

HAS_GROUPED_MM = hasattr(F, 'grouped_mm')


def chunked_lm_head(device):
    """Whether training's LM head + CE run in chunks (torch >= 2.13's linear_cross_entropy): on CUDA,
    where the whole fp32 logits cost GBs a step. On a CPU torch's default chunking for fp32 measured
    up to 4x slower than the plain path (docs/performance.md), and memory is rarely the limit there."""
    return hasattr(F, 'linear_cross_entropy') and device.type == 'cuda'


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


@torch.compiler.assume_constant_result
def empty_expert_grads_unreliable(device):
    """Whether grouped_mm may give experts with no rows a non-zero weight gradient: reported on sm100
    (B200) in pytorch/pytorch#172439, open in December 2026 (sm90 is correct); docs/performance.md."""
    return device.type == 'cuda' and torch.cuda.get_device_capability(device)[0] >= 10


class ZeroEmptyExpertGrads(torch.autograd.Function):
    """Identity in forward; in backward the gradient of every expert with no rows is set to exactly 0."""

    @staticmethod
    def forward(ctx, w_EXY, counts_E):
        ctx.save_for_backward(counts_E)
        return w_EXY.view_as(w_EXY)

    @staticmethod
    def backward(ctx, grad_EXY):
        counts_E, = ctx.saved_tensors
        return torch.where(counts_E.view(-1, 1, 1) > 0, grad_EXY, 0), None


class ExpertBias(torch.autograd.Function):
    """h_NF + b_EF[expert of each row] for rows sorted by expert: a pointwise add (torch.compile fuses it
    with the activation) instead of widening the GEMMs by bias columns. The gradient of b is each
    expert's rows summed, one segmented reduction in fp32 (a dense Linear's bias gradient accumulates in
    fp32 too), not index_select's backward of atomic adds. Rows past sum(counts_E) (dropped by capacity)
    are left out of every sum."""

    @staticmethod
    def forward(ctx, h_NF, b_EF, expert_N, counts_E):
        ctx.save_for_backward(counts_E)
        ctx.b_dtype = b_EF.dtype
        return h_NF + b_EF.to(h_NF.dtype).index_select(0, expert_N)

    @staticmethod
    def backward(ctx, grad_NF):
        counts_E, = ctx.saved_tensors
        # unsafe: the check that the lengths are non-negative would read them on the host (a sync)
        acc = torch.promote_types(grad_NF.dtype, torch.float32)
        grad_EF = torch.segment_reduce(grad_NF.to(acc), 'sum', lengths=counts_E, unsafe=True)
        return grad_NF, grad_EF.to(ctx.b_dtype), None, None


def grouped_mlp(x_ND, w1_EDF, b1_EF, w2_EHD, b2_ED, counts_E, expert_N, kept_N1, act):
    """Every expert's MLP on its contiguous rows of x_ND in two grouped_mm calls: act(x w1 + b1) w2 + b2;
    expert_N: each sorted row's expert (E on dropped rows). CUDA's grouped_mm allocates its output
    uninitialised and writes only the rows up to offs[-1], in forward and in the input gradient of
    backward: those rows hold garbage (NaN, Inf), and 0 * NaN is NaN. So with dropped rows (kept_N1)
    every grouped_mm output is masked at once, and the activation's output too (its backward input is
    the next grouped_mm's input gradient); the caller masks the output."""
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    mm_fn = F.grouped_mm if x_ND.dtype == torch.bfloat16 else grouped_mm_eager

    def mm(a, b):
        y = mm_fn(a, b, offs=offs_E)
        return y if kept_N1 is None else torch.where(kept_N1, y, 0)

    if kept_N1 is not None and (b1_EF is not None or b2_ED is not None):
        expert_N = expert_N.clamp(max=counts_E.shape[0] - 1)  # a dropped row's bias is masked out anyway
    if empty_expert_grads_unreliable(x_ND.device):
        w1_EDF, w2_EHD = ZeroEmptyExpertGrads.apply(w1_EDF, counts_E), ZeroEmptyExpertGrads.apply(w2_EHD, counts_E)
    h_NH = mm(x_ND, w1_EDF)
    if b1_EF is not None:
        h_NH = ExpertBias.apply(h_NH, b1_EF, expert_N, counts_E)
    h_NH = act(h_NH)
    if kept_N1 is not None:
        h_NH = torch.where(kept_N1, h_NH, 0)
    y_ND = mm(h_NH, w2_EHD)
    return y_ND if b2_ED is None else ExpertBias.apply(y_ND, b2_ED, expert_N, counts_E)


class SortRows(torch.autograd.Function):
    """The dispatch: token rows in expert order, row n = x_TD[order_N[n] // k] (assignment a = t*k + j
    is token t's j-th). Its backward puts the gradient rows back in assignment order with one
    index_copy (order_N is a permutation: no two rows collide) and sums each token's k rows, where
    index_select's own backward would be an index_add_ of atomic adds (slow on GPUs)."""

    @staticmethod
    def forward(ctx, x_TD, order_N, k):
        ctx.save_for_backward(order_N)
        ctx.k = k
        return x_TD.index_select(0, order_N // k if k > 1 else order_N)

    @staticmethod
    def backward(ctx, grad_ND):
        order_N, = ctx.saved_tensors
        grad_AD = torch.empty_like(grad_ND).index_copy_(0, order_N, grad_ND)
        return (grad_AD if ctx.k == 1 else grad_AD.view(-1, ctx.k, grad_AD.shape[1]).sum(1)), None, None


class UnsortRows(torch.autograd.Function):
    """The combine's inverse permutation: expert-sorted rows back in assignment order, row order_N[n]
    <- y_ND[n], one index_copy; the backward is the gather y[order_N]. No inverse permutation is built."""

    @staticmethod
    def forward(ctx, y_ND, order_N):
        ctx.save_for_backward(order_N)
        return torch.empty_like(y_ND).index_copy_(0, order_N, y_ND)

    @staticmethod
    def backward(ctx, grad_AD):
        order_N, = ctx.saved_tensors
        return grad_AD.index_select(0, order_N), None

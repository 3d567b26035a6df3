"""
The GPU-specific pieces of the MoE layer, kept out of model.py so that it reads like the math: the
softmax router's backward in one node, grouped_mm with its CUDA rules, expert biases as a pointwise add,
and the dispatch permutation whose backward needs no atomic adds.
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


class SoftmaxTopK(torch.autograd.Function):
    """Mixtral's router after its logits, as one autograd node: probs = softmax(logits), the ids of the
    top-k logits, gates = softmax(top-k logits) (= the renormalised top-k probabilities), and lse =
    logsumexp(logits) (the z-loss's). Forward is the four ops it would be anyway. Backward writes the
    logits' gradient once: the softmax backward of probs, the top-k's scatter added in place, and lse's
    gradient as probs * d/dlse (d lse / d logits = probs, already here), added in place. Autograd's own
    would build a zero tensor for the scatter, recompute exp(logits - lse) and add up four gradients."""

    @staticmethod
    def forward(ctx, logits_TE, k):
        probs_TE = F.softmax(logits_TE, dim=-1)
        best_TK, ids_TK = torch.topk(logits_TE, k, dim=-1)
        gates_TK = F.softmax(best_TK, dim=-1)
        lse_T = torch.logsumexp(logits_TE, dim=-1)
        ctx.save_for_backward(probs_TE, gates_TK, ids_TK)
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # an output without a gradient costs no zeros
        ctx.logits_dtype, ctx.logits_shape = logits_TE.dtype, logits_TE.shape
        return probs_TE, ids_TK, gates_TK, lse_T

    @staticmethod
    def backward(ctx, grad_probs_TE, _, grad_gates_TK, grad_lse_T):
        probs_TE, gates_TK, ids_TK = ctx.saved_tensors
        dt = ctx.logits_dtype
        grad_TE = (torch._softmax_backward_data(grad_probs_TE, probs_TE, -1, dt) if grad_probs_TE is not None
                   else probs_TE.new_zeros(ctx.logits_shape, dtype=dt))
        if grad_gates_TK is not None:
            grad_TE.scatter_add_(1, ids_TK, torch._softmax_backward_data(grad_gates_TK, gates_TK, -1, dt))
        if grad_lse_T is not None:
            grad_TE.addcmul_(probs_TE.to(dt), grad_lse_T.to(dt).unsqueeze(1))
        return grad_TE, None


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


class CastOnce(torch.autograd.Function):
    """w in the matmul dtype, taken from w_cast, a copy cast before (MoEGPT.train_step: once per
    optimizer step, not at every micro-step); backward: the gradient cast to w's dtype, as for w.to()."""

    @staticmethod
    def forward(ctx, w, w_cast):
        ctx.w_dtype = w.dtype
        return w_cast.view_as(w_cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.w_dtype), None


class ZeroEmptyExpertGrads(torch.autograd.Function):
    """Identity in forward; in backward the gradient of every expert with no rows is set to exactly 0."""

    @staticmethod
    def forward(ctx, w_EXY, offs_E1):
        ctx.save_for_backward(offs_E1)
        return w_EXY.view_as(w_EXY)

    @staticmethod
    def backward(ctx, grad_EXY):
        offs_E1, = ctx.saved_tensors
        return torch.where(offs_E1.diff().view(-1, 1, 1) > 0, grad_EXY, 0), None


class ExpertBias(torch.autograd.Function):
    """h_NF += b_EF[expert of each row] for rows sorted by expert: a pointwise add in place (torch.compile
    fuses it with the activation) instead of widening the GEMMs by bias columns. b stays in its own dtype:
    the add runs in the wider one and rounds once into h's, with no separate cast of b. The gradient of b
    is each expert's rows summed, one segmented reduction in fp32 (a dense Linear's bias gradient
    accumulates in fp32 too), not index_select's backward of atomic adds. offs_E1 (E+1,): the first row
    of each expert, then the end of the kept rows; rows past it (dropped by capacity) are in no sum."""

    @staticmethod
    def forward(ctx, h_NF, b_EF, expert_N, offs_E1):
        ctx.save_for_backward(offs_E1)
        ctx.b_dtype = b_EF.dtype
        ctx.mark_dirty(h_NF)  # h is a grouped_mm output: its backward needs the inputs, not h
        h_NF.add_(b_EF.index_select(0, expert_N))
        return h_NF  # the input itself, which dynamo needs to see for mark_dirty (else a graph break)

    @staticmethod
    def backward(ctx, grad_NF):
        offs_E1, = ctx.saved_tensors
        # unsafe: the check that the offsets increase would read them on the host (a sync)
        acc = torch.promote_types(grad_NF.dtype, torch.float32)
        grad_EF = torch.segment_reduce(grad_NF.to(acc), 'sum', offsets=offs_E1, unsafe=True)
        return grad_NF, grad_EF.to(ctx.b_dtype), None, None


def grouped_mlp(x_ND, w1_EDF, b1_EF, w2_EHD, b2_ED, offs_E1, expert_N, kept_N1, act):
    """Every expert's MLP on its contiguous rows of x_ND in two grouped_mm calls: act(x w1 + b1) w2 + b2;
    offs_E1 (E+1,) int32: each expert's first row, then the end of the kept rows (offs_E1[1:] are
    grouped_mm's offs); expert_N: each sorted row's expert (E on dropped rows). CUDA's grouped_mm
    allocates its output uninitialised and writes only the rows up to offs[-1], in forward and in the
    input gradient of backward: those rows hold garbage (NaN, Inf), and 0 * NaN is NaN. So with dropped
    rows (kept_N1) every grouped_mm output is masked at once, and the activation's output too (its backward input is
    the next grouped_mm's input gradient); the caller masks the output."""
    offs_E = offs_E1[1:]
    mm_fn = F.grouped_mm if x_ND.dtype == torch.bfloat16 else grouped_mm_eager

    def mm(a, b):
        y = mm_fn(a, b, offs=offs_E)
        return y if kept_N1 is None else torch.where(kept_N1, y, 0)

    if kept_N1 is not None and (b1_EF is not None or b2_ED is not None):
        expert_N = expert_N.clamp(max=offs_E.shape[0] - 1)  # a dropped row's bias is masked out anyway
    if empty_expert_grads_unreliable(x_ND.device):
        w1_EDF, w2_EHD = ZeroEmptyExpertGrads.apply(w1_EDF, offs_E1), ZeroEmptyExpertGrads.apply(w2_EHD, offs_E1)
    h_NH = mm(x_ND, w1_EDF)
    if b1_EF is not None:
        h_NH = ExpertBias.apply(h_NH, b1_EF, expert_N, offs_E1)
    h_NH = act(h_NH)
    if kept_N1 is not None:
        h_NH = torch.where(kept_N1, h_NH, 0)
    y_ND = mm(h_NH, w2_EHD)
    return y_ND if b2_ED is None else ExpertBias.apply(y_ND, b2_ED, expert_N, offs_E1)


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

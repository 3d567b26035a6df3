"""
bench.py: measure MoEGPT's MoE layer and training step against well-known designs, side by side.

Everything is measured in ONE process, on the SAME inputs and the SAME weights, with the variants'
repeats interleaved (A B C, B C A, ...) and the median taken, and everything is reported as RATIOS:
absolute times drift on a shared machine, ratios taken this way mostly don't.

  python bench.py                        # CPU fp32, sizes scaled down for a CPU (about 5-7 minutes)
  python bench.py --threads 1            # docs/performance.md's CPU tables (small CPU shared with other jobs)
  python bench.py --quick                # CI smoke: tiny sizes, seconds, correctness checks included
  python bench.py --device cuda --compile   # GPU: bf16, GPT-2-small sized model step, torch.compile
  python bench.py --balanced --json      # uniform routing (kernel speed without load skew), JSON out
  python bench.py --baseline OLD.py      # another model.py (git show REV:model.py), timed beside ours
  python bench.py --profile --kernels-out kernels.txt   # + the top-30 kernel table of section 2's steps

Every run first prints the aten ops per MoE layer and per dense MLP of equal FLOPs, forward and backward
(layer_op_counts: the grouped path, bf16 autocast, on the CPU, biases on and off): the regression number
for "less work per layer".

Sections
 1. MoE layer forward+backward. Ours (model.MoELayer, expert_impl grouped | loop | auto) against
    baselines re-implemented below with the same router and expert weights:
      tutorial: per expert, boolean-mask the tokens (topk_ids == e).any(-1), run it, add (makeMoE style)
      onehot:   GShard / nanoMoE capacity dispatch+combine tensors [tokens, experts, capacity] with
                einsum/bmm, capacity factor 1.25 (overflow dropped)
      dense:    one MLP of hidden top_k*expert_hidden: the same active FLOPs; the target to reach
      baseline: (--baseline FILE) the MoELayer of another model.py, same weights: did a change help?
 2. Whole-model training step (fwd+bwd+AdamW), steady state: --steps steps back to back per timed
    call, synced only before the first and after the last (as a training loop runs); tokens/s, MFU on
    active params, MoE step / dense step, peak memory, for MoE and the dense model of equal active
    FLOPs (n_experts=1, expert_hidden = top_k*4*n_embd), built side by side in one run.
    2p (--profile): torch.profiler over a few such steps of each: top 30 CUDA kernels (CPU: aten ops).
    2b (CPU): the same at nanoGPT's CPU recipe (config/moe_8e_cpu.py sizes), experts 4D/top_k wide
    against nanoGPT's dense model: the routing overhead of a small model, where it weighs most; and
    the floor under it, the same MoE with its routing made free (skip_routing).
 3. Peak memory of a training step for the same pairs.
 4. Sampling tokens/s with and without the KV cache (once MoEGPT.generate has use_cache).
 5. torch.compile: graph breaks of the MoE layer (torch._dynamo.explain), dropless and capacity.
Before any timing, every variant's output is checked against ours (section "checks").
"""
import argparse
import collections
import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import hardware
import optim
from model import MLP, MoEGPT, MoEGPTConfig, MoELayer, activation_fn

# ----------------------------------------------------------------------------- sizes
# (n_experts, top_k, expert_hidden as a function of n_embd). Fine-grained is issue 7's definition
# with m=8: expert_hidden = 4*n_embd/8, 8x the experts, 8x the top_k of an 8-expert top-1 layer
# (OLMoE's 64e top-8 shape); its active hidden width is 8 * n_embd/2 = 4*n_embd.
MOE_SHAPES = {
    '8e-top2': (8, 2, lambda d: 4 * d),
    '64e-top8': (64, 8, lambda d: 4 * d // 8),
}
PRESETS = {
    # n_embd list, tokens list, repeats, model-step config
    # steps: back-to-back training steps per timed call of section 2 (a sync at its ends only)
    'cuda': dict(n_embd=[384, 768], tokens=[4096, 16384, 65536], repeats=7, steps=20,
                 model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8,
                            vocab_size=50304)),
    'cpu': dict(n_embd=[384], tokens=[4096, 8192, 16384], repeats=3, steps=3,
                model=dict(n_layer=4, n_head=6, n_embd=384, block_size=256, batch_size=4,
                           vocab_size=50304),
                # nanoGPT's CPU recipe (config/moe_8e_cpu.py's sizes), equal active FLOPs
                recipe=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65,
                            narrow=True)),
    'quick': dict(n_embd=[64], tokens=[256], repeats=2, steps=2,
                  model=dict(n_layer=2, n_head=2, n_embd=64, block_size=32, batch_size=4,
                             vocab_size=256)),
}
CAPACITY_FACTOR = 1.25
FLOOR = 'moe, routing free (floor)'  # section 2b: skip_routing
# Per-variant time budget (seconds) for one size: a variant slower than budget/repeats gets fewer
# repeats (at least one timed call), so the quadratic one-hot baseline can't eat the whole run.
VARIANT_BUDGET_S = 40.0


# ----------------------------------------------------------------------------- timing helpers

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_interleaved(fns, device, repeats, warmup=1, budget_s=VARIANT_BUDGET_S):
    """fns: {name: zero-arg callable}. Returns {name: median seconds}. Repeats are interleaved and
    their order rotated, so drift on a shared machine hits every variant alike."""
    first = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            first[name] = time.perf_counter() - t0
    # Slow variants (seconds per call) get fewer repeats; their warmup call counts as a sample,
    # since at that size every call pays the same first-touch page faults anyway.
    want = {n: max(1, min(repeats, int(budget_s / max(first[n], 1e-9)))) for n in fns}
    times = {n: ([first[n]] if want[n] < repeats and first[n] > 1.0 else []) for n in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if len(times[name]) >= want[name]:
                continue
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def free_memory_bytes(device):
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    with open('/proc/meminfo') as f:
        info = {line.split(':')[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get('MemAvailable', info.get('MemFree', 0))


def peak_matmul_flops(device, dtype):
    """Peak FLOP/s for MFU. CUDA: the datasheet dense number for known GPUs (bf16). CPU: there is
    no datasheet number that means anything here, so we measure a large matmul and use that."""
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        peak = hardware.gpu_peak_flops(name, dtype)  # the table train.py's MFU uses too
        if peak is not None:
            return peak, f'{name} datasheet'
        n = 8192
    else:
        n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float('inf')
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best, f'measured {n}x{n} matmul'


# ----------------------------------------------------------------------------- routing override

def force_balanced_routing(router):
    """--balanced: token t goes to experts (t*K + j) % E, j < K (round robin, K distinct experts,
    exactly T*K/E rows per expert when E divides T*K). Gates stay the router's probabilities of
    those experts (renormalised like the router does), so the router still gets gradients and the
    arithmetic is unchanged: only the load skew is gone."""
    original = router.forward

    def forward(x_TD):
        r = original(x_TD)
        T, K, E = x_TD.shape[0], r.k, r.probs_TE.shape[-1]
        ar = torch.arange(T, device=x_TD.device)
        ids_TK = (ar[:, None] * K + torch.arange(K, device=x_TD.device)) % E
        p_TK = r.probs_TE.gather(1, ids_TK)
        gates_TK = p_TK / p_TK.sum(-1, keepdim=True) if router.norm_topk_prob else p_TK
        return r._replace(expert_N=ids_TK.reshape(-1), gate_N=gates_TK.reshape(-1))

    router.forward = forward


def skip_routing(layer):
    """Section 2b's floor: the MoE layer with routing made free. Its experts run on a fixed, balanced
    assignment (the K copies of the tokens, stacked, cut into E equal slices: T*K/E rows per expert)
    and their outputs are averaged back; no router, no sort, no gather index, no aux / z losses, no
    statistics. The step of such a model is what the MoE would cost if routing cost nothing."""
    def forward(x_BSD, return_intermediate=False):
        B, S, D = x_BSD.shape
        T, E, K = B * S, layer.n_experts, layer.top_k
        counts_E = torch.full((E,), T * K // E, device=x_BSD.device)
        offs_E1 = torch.arange(0, T * K + 1, T * K // E, dtype=torch.int32, device=x_BSD.device)  # (E+1,)
        expert_N = torch.arange(E, device=x_BSD.device).repeat_interleave(T * K // E)
        y_ND = layer.experts(x_BSD.reshape(T, D).repeat(K, 1), offs_E1, expert_N)  # (T*K, D), K copies
        zero = x_BSD.new_zeros(())
        aux = dict(losses={}, expert_counts=counts_E.float(), drop_frac=zero, router_entropy=zero)
        return y_ND.view(K, T, D).mean(0).view(B, S, D), aux
    layer.forward = forward


# ----------------------------------------------------------------------------- the layers

def make_layer(D, E, K, H, device, dtype, capacity_factor=0.0, balanced=False, seed=0, module=None):
    """Our MoELayer with the model's init, plus small random biases (so the baselines are checked
    with biases too) and a router std of 0.02 (the model's 0.01 is near-uniform on purpose).
    module: another model.py (--baseline), whose MoELayer gets the same weights."""
    mod = module or sys.modules[MoELayer.__module__]
    cfg = mod.MoEGPTConfig(n_embd=D, n_head=1, n_experts=E, top_k=K, expert_hidden=H, dropout=0.0,
                           capacity_factor=capacity_factor, expert_impl='auto',
                           capacity_priority='choice')  # GShard's, as the one-hot baseline drops
    g = torch.Generator().manual_seed(seed)
    layer = mod.MoELayer(cfg)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.randn(E, D, generator=g) * 0.02)
        layer.experts.w1_EDF.copy_(torch.randn(layer.experts.w1_EDF.shape, generator=g) * 0.02)
        layer.experts.w2_EHD.copy_(torch.randn(layer.experts.w2_EHD.shape, generator=g) * 0.02)
        layer.experts.b1_EF.copy_(torch.randn(layer.experts.b1_EF.shape, generator=g) * 0.02)
        layer.experts.b2_ED.copy_(torch.randn(layer.experts.b2_ED.shape, generator=g) * 0.02)
    layer = layer.to(device=device, dtype=dtype)
    if balanced:
        force_balanced_routing(layer.router)
    return layer


def ours(layer, impl):
    """Our layer with the chosen expert_impl (the attribute is read on every forward)."""
    def fn(x_BSD):
        layer.experts.expert_impl = impl
        return layer(x_BSD)[0]
    return fn


def tutorial_loop_moe(layer, x_BSD):
    """(a) The tutorial layer (makeMoE / 'MoE from scratch'): a sparse gate matrix (T, E), then for
    each expert a boolean mask of the tokens that picked it, the expert on those rows, and an
    in-place add of the gate-weighted output."""
    B, S, D = x_BSD.shape
    ex = layer.experts
    x_TD = x_BSD.reshape(-1, D)
    r = layer.router(x_TD)
    probs_TE, (topk_ids_TK, gates_TK) = r.probs_TE, r.topk()
    sparse_gates_TE = torch.zeros_like(probs_TE).scatter(1, topk_ids_TK, gates_TK)
    out_TD = torch.zeros_like(x_TD)
    for e in range(ex.w1_EDF.shape[0]):
        mask_T = (topk_ids_TK == e).any(dim=-1)
        if mask_T.any():
            h = x_TD[mask_T] @ ex.w1_EDF[e] + ex.b1_EF[e]
            y = activation_fn(ex.activation, h) @ ex.w2_EHD[e] + ex.b2_ED[e]
            out_TD[mask_T] += y * sparse_gates_TE[mask_T, e].unsqueeze(1).to(y.dtype)
    return out_TD.view(B, S, D)


def onehot_capacity(T, E, K, capacity_factor):
    return math.ceil(capacity_factor * T * K / E)


def onehot_bytes(T, E, K, capacity_factor, itemsize):
    """Peak bytes the one-hot baseline needs beyond ours, dominated by its (T, E, C) tensors:
    combine (float), dispatch (float), the gradient of combine (float), the bool mask, and the
    einsum temporaries. Checked against peak RSS on CPU: 18 bytes/element measured in fp32."""
    C = onehot_capacity(T, E, K, capacity_factor)
    return T * E * C * (4 * itemsize + 2)


def onehot_dispatch_moe(layer, x_BSD, capacity_factor=CAPACITY_FACTOR):
    """(b) GShard / nanoMoE: capacity C = ceil(cf*T*K/E); position of each assignment inside its
    expert by a cumsum over one-hot masks (first choices of all tokens before second choices);
    combine (T, E, C) = gate x onehot(expert) x onehot(position); dispatch = combine > 0; expert
    inputs by einsum 'tec,td->ecd', experts by bmm, outputs by einsum 'tec,ecd->td'."""
    B, S, D = x_BSD.shape
    ex = layer.experts
    x_TD = x_BSD.reshape(-1, D)
    T = x_TD.shape[0]
    r = layer.router(x_TD)
    probs_TE, (topk_ids_TK, gates_TK) = r.probs_TE, r.topk()
    E, K = probs_TE.shape[-1], topk_ids_TK.shape[-1]
    C = onehot_capacity(T, E, K, capacity_factor)
    mask_TKE = F.one_hot(topk_ids_TK, E)
    rank_KTE = torch.cumsum(mask_TKE.transpose(0, 1).reshape(K * T, E), dim=0).view(K, T, E) - 1
    pos_TK = (rank_KTE.transpose(0, 1) * mask_TKE).sum(-1)                 # slot inside its expert
    keep_TK = pos_TK < C
    dt = x_TD.dtype
    gates_TK = gates_TK.to(dt) * keep_TK
    slot_TKC = F.one_hot(pos_TK.clamp(max=C - 1), C).to(dt) * keep_TK.unsqueeze(-1)
    combine_TEC = torch.einsum('tk,tke,tkc->tec', gates_TK, mask_TKE.to(dt), slot_TKC)
    dispatch_TEC = (combine_TEC > 0).to(dt)
    x_ECD = torch.einsum('tec,td->ecd', dispatch_TEC, x_TD)
    h_ECF = torch.bmm(x_ECD, ex.w1_EDF) + ex.b1_EF.unsqueeze(1)
    y_ECD = torch.bmm(activation_fn(ex.activation, h_ECF), ex.w2_EHD) + ex.b2_ED.unsqueeze(1)
    out_TD = torch.einsum('tec,ecd->td', combine_TEC, y_ECD)
    return out_TD.view(B, S, D)


class DenseMLP(torch.nn.Module):
    """(c) One MLP of hidden top_k * expert_hidden: the FLOPs one token spends in our layer's
    experts, without any routing. Initialised from experts 0..K-1 concatenated, so that
    dense(x) == sum of those K experts (that is what the correctness check verifies)."""

    def __init__(self, layer):
        super().__init__()
        ex, K = layer.experts, layer.top_k
        with torch.no_grad():
            self.w1 = torch.nn.Parameter(torch.cat(list(ex.w1_EDF[:K]), dim=1).clone())
            self.b1 = torch.nn.Parameter(ex.b1_EF[:K].reshape(-1).clone())
            self.w2 = torch.nn.Parameter(torch.cat(list(ex.w2_EHD[:K]), dim=0).clone())
            self.b2 = torch.nn.Parameter(ex.b2_ED[:K].sum(0).clone())
        self.activation = ex.activation

    def forward(self, x):
        return activation_fn(self.activation, x @ self.w1 + self.b1) @ self.w2 + self.b2


def is_alias(func):
    """Ops that launch no kernel on any device and pass over no memory: views of the same memory (view,
    t, expand, slice, detach, ...; _unsafe_view, matmul's reshape of a fresh result) and ops that return
    no tensor (promote_types)."""
    return func.is_view or func._schema.name == 'aten::_unsafe_view' or not any(
        'Tensor' in str(r.type) for r in func._schema.returns)  # promote_types & co: a host-side answer


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it: on a GPU, eager, each is a kernel launch. n: all of
    them; kernels: those that are not views (is_alias); by_op: each op's count, for reading."""

    def __init__(self):
        super().__init__()
        self.n = self.kernels = 0
        self.by_op = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        self.kernels += not is_alias(func)
        self.by_op[func._schema.name.removeprefix('aten::')] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, x, grad_out):
    """(forward, backward) aten op counts of one call of fn(x) and its backward with grad_out."""
    x = x.detach().requires_grad_(True)
    with OpCounter() as fwd:
        y = fn(x)
    with OpCounter() as bwd:
        y.backward(grad_out)
    return fwd.n, bwd.n


# The issue-21 setting for per-layer op counts: the layer the GPU runs (grouped_mm, bf16 autocast), tiny,
# since the count does not depend on sizes. Biases on (GPT-2's default) unless overridden.
OP_COUNT_CONFIG = dict(n_layer=1, n_head=1, n_embd=64, block_size=128, vocab_size=64, n_experts=8, top_k=2,
                       expert_impl='grouped', dropout=0.0, bias=True)
OP_COUNT_SHAPE = (2, 128)  # (B, S): 256 tokens


def count_layer_ops(layer, x_BSD, autocast_dtype=torch.bfloat16):
    """Aten ops of one training call of a layer, as train.py makes it: forward under autocast, then
    backward (outside autocast) of the output and of every loss term the layer returns, the input
    needing a gradient (as inside a network) and the parameters' grads None (zero_grad(set_to_none)).
    Returns dict(fwd=, bwd=: ops that are not views (kernels on a GPU, eager), fwd_all=, bwd_all=: every
    aten op, fwd_ops=, bwd_ops=: {op name: count})."""
    layer.zero_grad(set_to_none=True)
    x_BSD = x_BSD.detach().requires_grad_(True)
    ctx = (torch.autocast(x_BSD.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else torch.autocast(x_BSD.device.type, enabled=False))
    with ctx, OpCounter() as fwd:
        out = layer(x_BSD)
    out_BSD, aux = out if isinstance(out, tuple) else (out, {})
    outs = [out_BSD, *aux.get('losses', {}).values()]
    grads = [torch.randn_like(out_BSD)] + [torch.ones_like(t) for t in outs[1:]]  # made outside the counter
    with OpCounter() as bwd:
        torch.autograd.backward(outs, grads)
    layer.zero_grad(set_to_none=True)
    return dict(fwd=fwd.kernels, bwd=bwd.kernels, fwd_all=fwd.n, bwd_all=bwd.n,
                fwd_ops=dict(fwd.by_op), bwd_ops=dict(bwd.by_op))


def layer_op_counts(config_overrides=None, dense=False, autocast_dtype=torch.bfloat16):
    """Op counts (count_layer_ops) of one MoE layer (MoELayer) built from OP_COUNT_CONFIG updated with
    config_overrides, on the CPU; dense=True: instead the dense MLP of equal active FLOPs (the dense
    model's block MLP, model.MLP of hidden top_k * expert_hidden), same bias setting. Seeded: the
    routing, and so the count, is the same on every call."""
    cfg = MoEGPTConfig(**{**OP_COUNT_CONFIG, **(config_overrides or {})})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = MLP(cfg, cfg.top_k * cfg.expert_hidden) if dense else MoELayer(cfg)
        layer.train()
        x_BSD = torch.randn(*OP_COUNT_SHAPE, cfg.n_embd)
        return count_layer_ops(layer, x_BSD, autocast_dtype)


def op_count_report():
    """The op-count lines of every run: MoE layer and dense MLP, biases on and off. Counted on the CPU
    whatever --device is (the count is the regression number, not a timing); an error is reported."""
    res = {}
    for name, over in (('bias', dict(bias=True)), ('no bias', dict(bias=False))):
        try:
            res[name] = dict(moe=layer_op_counts(over), dense=layer_op_counts(over, dense=True))
        except Exception as e:  # e.g. an older torch without a CPU grouped_mm kernel
            res[name] = dict(error=f'{type(e).__name__}: {str(e).splitlines()[0][:120]}')
    return res


def fwd_bwd(fn, x, grad_out, params):
    """One forward+backward with a fixed output gradient; grads of the input and weights are
    computed (as inside a network) and dropped before the next call."""
    for p in params:
        p.grad = None
    x.grad = None
    fn(x).backward(grad_out)


# ----------------------------------------------------------------------------- checks

def load_baseline(path):
    """Another version of model.py (e.g. `git show REV:model.py > OLD.py`), imported from its path.
    Exits with one line (no traceback) when it is missing, does not import, or has no MoELayer."""
    try:
        spec = importlib.util.spec_from_file_location('baseline_model', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # missing file, SyntaxError, an import it needs
        cli.fail('bench.py', f'--baseline {path}: cannot import it: {type(e).__name__}: {e}')
    missing = [n for n in ('MoEGPTConfig', 'MoELayer') if not hasattr(module, n)]
    if missing:
        cli.fail('bench.py', f'--baseline {path}: not a model.py (no {" or ".join(missing)}); '
                 'save one with `git show REV:model.py > OLD.py`')
    return module


def check_layer_variants(D, E, K, H, T, device, dtype, balanced, baseline=None):
    """Every variant against ours on the same input: returns a list of check dicts."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    layer = make_layer(D, E, K, H, device, dtype, balanced=balanced)
    x = torch.randn(1, T, D, device=device, dtype=dtype, generator=None)
    checks = []

    def compare(name, got, ref):
        scale = ref.abs().max().item() + 1e-12
        err = (got.float() - ref.float()).abs().max().item() / scale
        checks.append(dict(shape=f'D{D} E{E} K{K} H{H} T{T}', variant=name, max_rel_err=err,
                           ok=bool(err <= tol)))

    with torch.no_grad():
        ref = ours(layer, 'grouped')(x)
        compare('ours-loop vs ours-grouped', ours(layer, 'loop')(x), ref)
        compare('ours-auto vs ours-grouped', ours(layer, 'auto')(x), ref)
        compare('tutorial vs ours', tutorial_loop_moe(layer, x), ref)
        # one-hot with a capacity that drops nothing equals dropless ours ...
        compare('onehot(cf=E/K, no drop) vs ours', onehot_dispatch_moe(layer, x, E / K), ref)
        # ... and with cf=1.25 it drops exactly what ours does in capacity mode (same priority)
        layer.router.capacity_factor = layer.router.eval_capacity_factor = CAPACITY_FACTOR
        layer.train()
        for impl in ('grouped', 'loop'):
            compare(f'onehot(cf=1.25) vs ours-{impl}(cf=1.25)',
                    onehot_dispatch_moe(layer, x, CAPACITY_FACTOR), ours(layer, impl)(x))
        layer.router.capacity_factor = layer.router.eval_capacity_factor = 0.0
        dense = DenseMLP(layer).to(device)
        ex = layer.experts
        ref_dense = sum(activation_fn(ex.activation, x @ ex.w1_EDF[e] + ex.b1_EF[e]) @ ex.w2_EHD[e]
                        + ex.b2_ED[e] for e in range(K))
        compare('dense vs sum of experts 0..K-1', dense(x), ref_dense)
        if baseline is not None:
            compare('baseline vs ours', make_layer(D, E, K, H, device, dtype, balanced=balanced,
                                                   module=baseline)(x)[0], ref)
    # gradients too: input grad of each dropless variant against ours
    g = torch.randn_like(x)
    grads = {}
    for name, fn in [('ours-grouped', ours(layer, 'grouped')), ('ours-loop', ours(layer, 'loop')),
                     ('tutorial', lambda v: tutorial_loop_moe(layer, v)),
                     ('onehot(no drop)', lambda v: onehot_dispatch_moe(layer, v, E / K))]:
        xg = x.clone().requires_grad_(True)
        fn(xg).backward(g)
        grads[name] = (xg.grad, layer.experts.w1_EDF.grad.clone())
        layer.zero_grad(set_to_none=True)
    for name in ('ours-loop', 'tutorial', 'onehot(no drop)'):
        compare(f'{name} dx vs ours', grads[name][0], grads['ours-grouped'][0])
        compare(f'{name} dW1 vs ours', grads[name][1], grads['ours-grouped'][1])
    return checks


# ----------------------------------------------------------------------------- 1. layer bench

def bench_layer(D, shape_name, T, device, dtype, repeats, balanced, compile_, budget_gib=None, baseline=None):
    E, K, hidden_fn = MOE_SHAPES[shape_name]
    H = hidden_fn(D)
    layer = make_layer(D, E, K, H, device, dtype, balanced=balanced)
    layer.train()
    dense = DenseMLP(layer).to(device)
    x = torch.randn(1, T, D, device=device, dtype=dtype).requires_grad_(True)
    g = torch.randn_like(x)
    lp, dp = list(layer.parameters()), list(dense.parameters())
    probe = x.detach()[:, :8].reshape(-1, D)
    layer.experts.expert_impl = 'auto'
    auto_impl = 'grouped' if layer.experts.use_grouped(probe) else 'loop'

    fns = {
        'grouped': lambda: fwd_bwd(ours(layer, 'grouped'), x, g, lp),
        'loop': lambda: fwd_bwd(ours(layer, 'loop'), x, g, lp),
        'tutorial': lambda: fwd_bwd(lambda v: tutorial_loop_moe(layer, v), x, g, lp),
        'dense': lambda: fwd_bwd(dense, x, g, dp),
    }
    need = onehot_bytes(T, E, K, CAPACITY_FACTOR, x.element_size())
    budget = budget_gib * 2**30 if budget_gib else free_memory_bytes(device) / 2
    onehot_note = None
    if need <= budget:
        fns['onehot'] = lambda: fwd_bwd(lambda v: onehot_dispatch_moe(layer, v), x, g, lp)
    else:
        onehot_note = f'OOM (would need {need / 2**30:.1f} GiB)'
    if compile_:
        layer_c = torch.compile(layer)
        dense_c = torch.compile(dense)
        fns['ours+compile'] = lambda: fwd_bwd(lambda v: (setattr(layer.experts, 'expert_impl', 'auto'),
                                                         layer_c(v)[0])[1], x, g, lp)
        fns['dense+compile'] = lambda: fwd_bwd(dense_c, x, g, dp)
    if baseline is not None:
        base = make_layer(D, E, K, H, device, dtype, balanced=balanced, module=baseline)
        base.train()
        bp = list(base.parameters())
        fns['baseline'] = lambda: fwd_bwd(lambda v: base(v)[0], x, g, bp)
        if compile_:
            base_c = torch.compile(base)
            fns['baseline+compile'] = lambda: fwd_bwd(lambda v: base_c(v)[0], x, g, bp)
    t = time_interleaved(fns, device, repeats)
    ops = {'ours': count_ops(ours(layer, auto_impl), x, g), 'dense': count_ops(dense, x, g)}
    if baseline is not None:
        ops['baseline'] = count_ops(lambda v: base(v)[0], x, g)
    layer.zero_grad(set_to_none=True)
    t['ours'] = t[auto_impl]  # 'auto' runs exactly the impl it resolves to: same code, same time
    row = dict(n_embd=D, moe=shape_name, n_experts=E, top_k=K, expert_hidden=H,
               dense_hidden=K * H, tokens=T, auto_impl=auto_impl,
               onehot_capacity=onehot_capacity(T, E, K, CAPACITY_FACTOR),
               onehot_gib=need / 2**30, onehot_note=onehot_note,
               ms={k: v * 1e3 for k, v in t.items()}, ops=ops)
    row['speedup_vs_tutorial'] = t['tutorial'] / t['ours']
    row['speedup_vs_onehot'] = t['onehot'] / t['ours'] if 'onehot' in t else None
    row['ours_vs_dense'] = t['dense'] / t['ours']  # >= 0.85 is the goal; 1.0 = as fast as dense
    row['tflops_ours'] = 6 * T * K * D * H * 2 / t['ours'] / 1e12  # expert matmul FLOPs, fwd+bwd
    if compile_:
        row['compiled_vs_dense_compiled'] = t['dense+compile'] / t['ours+compile']
    if baseline is not None:  # > 1: ours is faster than the baseline
        row['vs_baseline'] = t['baseline'] / t['ours']
        if compile_:
            row['compiled_vs_baseline_compiled'] = t['baseline+compile'] / t['ours+compile']
    return row


# ----------------------------------------------------------------------------- 2. model step

def model_configs(mcfg, E=8, K=2):
    base = dict(n_layer=mcfg['n_layer'], n_head=mcfg['n_head'], n_embd=mcfg['n_embd'],
                block_size=mcfg['block_size'], vocab_size=mcfg['vocab_size'], dropout=0.0,
                bias=False)  # train.py's default (and Mixtral's, DeepSeek's, Qwen's, OLMoE's)
    D = mcfg['n_embd']
    if mcfg.get('narrow'):  # the dense model stays nanoGPT's (hidden 4D); experts 4D/K wide
        moe = MoEGPTConfig(**base, n_experts=E, top_k=K, expert_hidden=4 * D // K)
        return {
            f'moe {E}e top-{K} (H=4D/{K})': moe,
            FLOOR: moe,  # the same model; bench_model makes its routing free (skip_routing)
            'dense (hidden 4D)': MoEGPTConfig(**base, n_experts=1, expert_hidden=4 * D),
        }
    return {
        f'moe {E}e top-{K}': MoEGPTConfig(**base, n_experts=E, top_k=K, expert_hidden=4 * D),
        f'dense (hidden {K}x4D)': MoEGPTConfig(**base, n_experts=1, expert_hidden=K * 4 * D),
    }


def build_model(cfg, device, balanced, compile_):
    torch.manual_seed(0)
    model = MoEGPT(cfg).to(device)
    if balanced:
        for moe in model.moe_layers():
            force_balanced_routing(moe.router)
    opt = optim.configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), device.type)
    step_model = torch.compile(model) if compile_ else model
    return model, step_model, opt


FULL_LOGITS = [False]  # --full-logits: the training step returns the whole logits (the plain LM head + CE)


def train_step(step_model, opt, xb, yb, device, dtype):
    ctx = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
           else torch.autocast(device.type, enabled=False))
    with ctx, step_model.train_step(statistics=False):  # as train.py's steps that do not log
        _, loss, _ = step_model(xb, yb, return_logits=FULL_LOGITS[0])  # train.py's: the chunked LM head + CE
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def get_batch(mcfg, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, S, V = mcfg['batch_size'], mcfg['block_size'], mcfg['vocab_size']
    x = torch.randint(0, V, (B, S), generator=g)
    y = torch.randint(0, V, (B, S), generator=g)
    return x.to(device), y.to(device)


def steady_steps(step, n):
    """n training steps back to back: the block time_interleaved times, with a sync only before the first
    and after the last step, as a training loop runs (no per-step host wait)."""
    def fn():
        for _ in range(n):
            step()
    return fn


def static_bytes(model, opt):
    """Bytes of a model's parameters, buffers and optimizer state: what stays allocated between steps."""
    ts = [*model.parameters(), *model.buffers()]
    ts += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in ts)


def cuda_peak_bytes(model, opt, step, n):
    """Peak memory of one model's training step on CUDA, though other models are resident too: its own
    static bytes + the peak above what was allocated before its steps (grads are None there)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    steady_steps(step, n)()
    torch.cuda.synchronize()
    return static_bytes(model, opt) + torch.cuda.max_memory_allocated() - before


def bench_model(mcfg, device, dtype, repeats, balanced, compile_, peak_flops, steps=1, profile_steps=0,
                kernels_out=None, timed=True):
    """Section 2: the steady-state training step of the MoE model and the dense model of equal active
    FLOPs, built side by side. Each timed call is `steps` back-to-back steps (steady_steps), the calls
    interleaved across models, the median per step reported. profile_steps > 0: first a torch.profiler
    kernel table of that many steps of each model (profile_kernels), printed and written to kernels_out.
    timed=False: the profile only."""
    xb, yb = get_batch(mcfg, device)
    built = {name: build_model(cfg, device, balanced, compile_)
             for name, cfg in model_configs(mcfg).items()}
    for layer in (built[FLOOR][0].moe_layers() if FLOOR in built else []):
        skip_routing(layer)
    step_fns = {name: (lambda m=m, o=o: train_step(m, o, xb, yb, device, dtype))
                for name, (_, m, o) in built.items()}
    if profile_steps:
        for fn in step_fns.values():  # compile and AdamW state first: the profile is of steady steps
            for _ in range(2):
                fn()
        prof = {name: profile_kernels(fn, device, profile_steps) for name, fn in step_fns.items()}
        table = format_kernel_tables(prof, device, compile_, mcfg)
        print(table, file=early_out(), flush=True)
        if kernels_out:
            with open(kernels_out, 'w') as f:
                f.write(table + '\n')
    if not timed:
        return []
    fns = {name: steady_steps(fn, steps) for name, fn in step_fns.items()}
    t = {n: v / steps for n, v in time_interleaved(fns, device, repeats, warmup=2 if compile_ else 1).items()}
    tokens = mcfg['batch_size'] * mcfg['block_size']
    rows = []
    for name, (model, _, opt) in built.items():
        pc = model.get_num_params()
        row = dict(model=name, params_total=pc.total, params_active=pc.active, steps=steps,
                   ms=t[name] * 1e3, tokens_per_s=tokens / t[name],
                   mfu=model.estimate_mfu(mcfg['batch_size'], t[name], peak_flops))
        if device.type == 'cuda':
            row.update(peak_mib=cuda_peak_bytes(model, opt, step_fns[name], steps) / 2**20,
                       peak_how='torch.cuda.max_memory_allocated over the steps above what was allocated '
                                'before them, + its own params, buffers and AdamW state')
        rows.append(row)
    for r in rows[:-1]:  # the dense model comes last
        r['vs_dense'] = rows[-1]['ms'] / r['ms']  # speed: > 1 is faster than dense
        r['step_vs_dense'] = r['ms'] / rows[-1]['ms']  # issue 21's ratio: MoE step / dense step (goal <= 1.3)
    return rows


# ----------------------------------------------------------------------------- 2p. kernel table

def profile_kernels(step, device, steps):
    """torch.profiler over `steps` back-to-back calls of step (a sync at the ends only). Returns
    dict(rows=[dict(name, calls, total_ms)] sorted by time, busy_ms: all of them, wall_ms, steps).
    CUDA: the device's kernels (and memcpy / memset), by their time on the GPU. CPU: the aten ops by
    self CPU time (the CPU's kernels, more or less): the same code path, so that a CPU run tests it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        steady_steps(step, steps)()
        sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    agg = collections.defaultdict(lambda: [0, 0.0])
    events = prof.events()
    for e in events:
        if device.type == 'cuda':
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()
        else:
            if e.device_type != DeviceType.CPU or not e.name.startswith('aten::'):
                continue  # autograd's and Python's own events: overhead around the ops, not ops
            us = e.self_cpu_time_total
        agg[e.name][0] += 1
        agg[e.name][1] += us / 1e3
    if device.type == 'cuda' and not agg:  # older profilers: kernels only attached to their launching op
        for e in events:
            for k in getattr(e, 'kernels', []):
                agg[k.name][0] += 1
                agg[k.name][1] += k.duration / 1e3
    rows = [dict(name=n, calls=c, total_ms=ms) for n, (c, ms) in sorted(agg.items(), key=lambda kv: -kv[1][1])]
    return dict(rows=rows, busy_ms=sum(r['total_ms'] for r in rows), wall_ms=wall_ms, steps=steps)


def format_kernel_tables(prof, device, compile_, mcfg, top=30):
    """One table per model: the top kernels by total time, with calls, total ms over the profiled steps,
    ms per step and % of the step's wall time (measured under the profiler: slightly inflated)."""
    what = 'CUDA kernels by GPU time' if device.type == 'cuda' else 'CPU aten ops by self CPU time'
    out = [f"## 2p. kernel table: top {top} {what}, {'compiled' if compile_ else 'eager'}, "
           + ', '.join(f'{k}={v}' for k, v in mcfg.items())]
    for name, p in prof.items():
        n = p['steps']
        out.append(f"\n### {name}: {p['wall_ms'] / n:.2f} ms/step under the profiler ({n} steps), kernels busy "
                   f"{p['busy_ms'] / n:.2f} ms/step ({100 * p['busy_ms'] / p['wall_ms']:.1f}%), "
                   f"{len(p['rows'])} distinct, {sum(r['calls'] for r in p['rows']) / n:.0f} calls/step")
        rows = [[r['name'][:90], str(r['calls']), f"{r['total_ms']:.3f}", f"{r['total_ms'] / n:.3f}",
                 f"{100 * r['total_ms'] / p['wall_ms']:.1f}%"] for r in p['rows'][:top]]
        out.append(table_text(['kernel', 'calls', 'total ms', 'ms/step', '% of step'], rows))
    return '\n'.join(out)


# ----------------------------------------------------------------------------- 3. memory

def read_proc_status_kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


def memory_child(args):
    """Runs in a fresh subprocess (--_mem-child NAME): a few training steps of one model, then
    prints the peak RSS growth. Why a subprocess: the CPU allocator (glibc) keeps freed pages and
    VmHWM only ever grows, so in a long-lived process one model's peak hides the next one's. A
    fresh process's VmHWM minus its RSS right after `import torch` is the peak of params + grads +
    AdamW state + activations, the CPU analogue of CUDA's max_memory_allocated."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    mcfg = json.loads(args.mcfg)
    base_kb = read_proc_status_kb('VmRSS')
    cfg = model_configs(mcfg)[args._mem_child]
    _, m, o = build_model(cfg, device, args.balanced, False)
    xb, yb = get_batch(mcfg, device)
    for _ in range(2):
        train_step(m, o, xb, yb, device, dtype)
    print(json.dumps(dict(peak_bytes=(read_proc_status_kb('VmHWM') - base_kb) * 1024)))


def bench_memory(mcfg, device, dtype, balanced):
    rows = []
    for name, cfg in model_configs(mcfg).items():
        if device.type == 'cuda':
            xb, yb = get_batch(mcfg, device)
            model, m, o = build_model(cfg, device, balanced, False)
            train_step(m, o, xb, yb, device, dtype)  # creates AdamW state
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            train_step(m, o, xb, yb, device, dtype)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device)
            del model, m, o
            torch.cuda.empty_cache()
            how = 'torch.cuda.max_memory_allocated'
        else:
            cmd = [sys.executable, os.path.abspath(__file__), '--_mem-child', name,
                   '--mcfg', json.dumps(mcfg), '--device', device.type,
                   '--dtype', [k for k, v in DTYPES.items() if v == dtype][0]]
            cmd += ['--threads', str(torch.get_num_threads())] + (['--balanced'] if balanced else [])
            cmd += ['--full-logits'] if FULL_LOGITS[0] else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peak = json.loads(out.stdout.strip().splitlines()[-1])['peak_bytes']
            how = 'peak RSS growth of a fresh subprocess (VmHWM - RSS after import torch)'
        rows.append(dict(model=name, peak_mib=peak / 2**20, method=how))
    rows[0]['vs_dense'] = rows[0]['peak_mib'] / rows[1]['peak_mib']
    return rows


# ----------------------------------------------------------------------------- 4. sampling

def bench_sampling(device, dtype, balanced, quick):
    """Tokens/s of MoEGPT.generate with and without the KV cache, on nanoGPT's shakespeare_char baby
    model with 8 experts top-2 (6 layers, 384 wide, block 256, vocab 65; --quick: a tiny one), 500
    new tokens from a 1-token prompt: past block_size the uncached path reruns 256 tokens per step."""
    if 'use_cache' not in inspect.signature(MoEGPT.generate).parameters:
        return dict(note='n/a (no KV cache yet)')
    size = dict(n_layer=2, n_head=2, n_embd=64, block_size=32) if quick else \
        dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
    new_tokens = 40 if quick else 500
    cfg = MoEGPTConfig(**size, vocab_size=65, dropout=0.0, bias=False, n_experts=8, top_k=2)
    model, _, _ = build_model(cfg, device, balanced, False)
    model.eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    ctx = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
           else torch.autocast(device.type, enabled=False))

    def gen(use_cache):
        torch.manual_seed(0)
        with ctx:
            return model.generate(prompt, new_tokens, use_cache=use_cache)

    fns = {'no cache': lambda: gen(False), 'kv cache': lambda: gen(True)}
    t = time_interleaved(fns, device, 2)  # the uncached 500 tokens take about a minute on a CPU core
    res = {k: dict(tokens_per_s=new_tokens / v) for k, v in t.items()}
    res['speedup'] = t['no cache'] / t['kv cache']
    res['new_tokens'] = new_tokens
    return res


# ----------------------------------------------------------------------------- 5. compile check

def compile_check(device, dtype, real_compile=False):
    """torch._dynamo.explain on the MoE layer: graphs and graph breaks per impl, mode and dtype.
    Tracing only (no code generation), so it is cheap. The loop impl needs counts.tolist()
    (data-dependent Python ints), which dynamo cannot keep in one graph: its breaks are expected.
    grouped_mm's meta function (used for tracing) accepts only bf16 in torch 2.13, although the
    eager CPU kernel also runs fp32: so fp32 is checked too and bf16 is always added.
    real_compile (--compile): also torch.compile(fullgraph=True) the grouped layer, run fwd+bwd,
    and compare with eager."""
    import logging
    import torch._dynamo
    fake_log = logging.getLogger('torch._subclasses.fake_tensor')
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a failed meta call logs a long traceback; we report it
    res = []
    D, E, K = 64, 8, 2
    dtypes = [dtype] + ([torch.bfloat16] if dtype != torch.bfloat16 else [])
    for dt in dtypes:
        for impl in ('grouped', 'loop'):
            for cf in (0.0, CAPACITY_FACTOR):
                layer = make_layer(D, E, K, 4 * D, device, dt, capacity_factor=cf)
                layer.experts.expert_impl = impl
                layer.train()
                x = torch.randn(2, 32, D, device=device, dtype=dt)
                row = dict(impl=impl, mode='dropless' if cf == 0 else f'capacity {cf}',
                           dtype=str(dt).replace('torch.', ''))
                torch._dynamo.reset()
                try:
                    ex = torch._dynamo.explain(layer)(x)
                    reasons = sorted({str(getattr(b, 'reason', b)).splitlines()[0][:100]
                                      for b in ex.break_reasons})
                    row.update(graphs=ex.graph_count, graph_breaks=ex.graph_break_count,
                               fullgraph=ex.graph_break_count == 0, reasons=reasons[:2])
                except Exception as e:  # report, don't crash the bench
                    import re
                    inner = re.search(r"got (\w+\('[^']*'\))", str(e))  # the fake-tensor error inside
                    row.update(fullgraph=False, error=f'{type(e).__name__}: ' + (
                        inner.group(1) if inner else str(e).strip().splitlines()[0])[:110])
                if real_compile and impl == 'grouped' and row.get('fullgraph'):
                    try:
                        torch._dynamo.reset()
                        xg = x.clone().requires_grad_(True)
                        out = torch.compile(layer, fullgraph=True)(xg)[0]
                        out.float().sum().backward()
                        ref = layer(x)[0]
                        row['compiled_fwd_bwd'] = f'ok (max err {(out - ref).abs().max().item():.1e})'
                    except Exception as e:
                        row['compiled_fwd_bwd'] = f'{type(e).__name__}: {str(e).splitlines()[0][:100]}'
                res.append(row)
    torch._dynamo.reset()
    fake_log.setLevel(level)
    return res


# ----------------------------------------------------------------------------- report

def fmt(v, spec='.2f', none='-'):
    return none if v is None else format(v, spec)


def op_count_line(counts):
    if 'error' in counts:
        return f'n/a ({counts["error"]})'
    mo, de = counts['moe'], counts['dense']
    return (f"moe fwd {mo['fwd']} bwd {mo['bwd']} | dense mlp fwd {de['fwd']} bwd {de['bwd']}"
            f"   (all aten ops, views too: moe {mo['fwd_all']} + {mo['bwd_all']}, dense {de['fwd_all']} + {de['bwd_all']})")


def print_op_counts(op_counts):
    """The per-layer op counts (bench.layer_op_counts): stdout, or stderr under --json (stdout is the JSON)."""
    c = OP_COUNT_CONFIG
    print(f"# ops/layer, aten ops that are not views (a GPU kernel each, eager), forward | backward of out + loss terms; "
          f"CPU, bf16 autocast, expert_impl={c['expert_impl']}, {c['n_experts']}e top-{c['top_k']}, "
          f"dense mlp = hidden top_k*expert_hidden", file=early_out())
    for name, counts in op_counts.items():
        print(f"ops/layer {name + ':':8} {op_count_line(counts)}", file=early_out(), flush=True)


JSON_OUT = [False]  # --json: stdout is the JSON, so what is printed as it is measured goes to stderr


def early_out():
    return sys.stderr if JSON_OUT[0] else sys.stdout


def print_report(res):
    m = res['meta']
    print(f"# bench.py  device={m['device']} ({m['device_name']})  dtype={m['dtype']}  torch={m['torch']}  "
          f"threads={m['threads']}  balanced={m['balanced']}  compile={m['compile']}")
    print(f"# peak for MFU: {m['peak_flops'] / 1e12:.2f} TFLOP/s ({m['peak_how']})")
    bad = [c for c in res['checks'] if not c['ok']]
    print(f"\n## checks: {len(res['checks']) - len(bad)}/{len(res['checks'])} variants match ours"
          + ('' if not bad else '  FAILED: ' + '; '.join(f"{c['variant']} ({c['max_rel_err']:.1e})" for c in bad)))

    print('\n## 1. MoE layer forward+backward (ms, median of interleaved repeats; ratios = their time / ours)')
    hdr = ['D', 'experts', 'H', 'dense H', 'tokens', 'ours(auto)', 'grouped', 'loop', 'tutorial',
           'onehot', 'dense', 'x tutorial', 'x onehot', 'ours/dense']
    if res['meta']['compile']:
        hdr += ['ours+cmp', 'dense+cmp', 'cmp/dense']
    has_base = bool(res['layer']) and 'vs_baseline' in res['layer'][0]
    if has_base:
        hdr += ['baseline', 'x baseline'] + (['base+cmp', 'x base+cmp'] if res['meta']['compile'] else [])
    rows = []
    for r in res['layer']:
        ms = r['ms']
        row = [r['n_embd'], r['moe'], r['expert_hidden'], r['dense_hidden'], r['tokens'],
               f"{ms['ours']:.1f} ({r['auto_impl']})", fmt(ms['grouped'], '.1f'), fmt(ms['loop'], '.1f'),
               fmt(ms['tutorial'], '.1f'), r['onehot_note'] or fmt(ms.get('onehot'), '.1f'),
               fmt(ms['dense'], '.1f'), fmt(r['speedup_vs_tutorial']) + 'x',
               (fmt(r['speedup_vs_onehot']) + 'x') if r['speedup_vs_onehot'] else 'OOM',
               fmt(r['ours_vs_dense'])]
        if res['meta']['compile']:
            row += [fmt(ms['ours+compile'], '.1f'), fmt(ms['dense+compile'], '.1f'),
                    fmt(r['compiled_vs_dense_compiled'])]
        if has_base:
            row += [fmt(ms['baseline'], '.1f'), fmt(r['vs_baseline']) + 'x']
            if res['meta']['compile']:
                row += [fmt(ms['baseline+compile'], '.1f'), fmt(r['compiled_vs_baseline_compiled']) + 'x']
        rows.append([str(c) for c in row])
    print_table(hdr, rows)
    print('aten ops per call, forward + backward (a GPU launches one kernel each, eager): ' + '; '.join(
        f"{r['moe']} {r['tokens']} tokens: " + ', '.join(f'{k} {f} + {b}' for k, (f, b) in r['ops'].items())
        for r in res['layer']))

    if res['model']:
        print(f"\n## 2. steady-state training step (fwd+bwd+AdamW; {m['steps']} steps back to back per timed call, "
              f"synced at its ends only; median of {max(m['repeats'], 3)} interleaved calls), " + res['model_cfg_desc'])
        print_table(['model', 'params total', 'active', 'ms/step', 'tokens/s', 'MFU(active)', 'step / dense step',
                     'peak MiB'],
                    [[r['model'], f"{r['params_total'] / 1e6:.1f}M", f"{r['params_active'] / 1e6:.1f}M",
                      f"{r['ms']:.1f}", f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.1f}%",
                      fmt(r.get('step_vs_dense')), fmt(r.get('peak_mib'), '.0f')] for r in res['model']])
        if res['model'][0].get('peak_how'):
            print(f"peak MiB: {res['model'][0]['peak_how']}")

    if res.get('recipe'):
        print('\n## 2b. steady-state training step at the CPU recipe (config/moe_8e_cpu.py sizes), equal active FLOPs')
        print_table(['model', 'params total', 'active', 'ms/step', 'tokens/s', 'speed vs dense', 'step / dense step'],
                    [[r['model'], f"{r['params_total'] / 1e6:.2f}M", f"{r['params_active'] / 1e6:.2f}M",
                      f"{r['ms']:.1f}", f"{r['tokens_per_s']:.0f}", fmt(r.get('vs_dense')),
                      fmt(r.get('step_vs_dense'))] for r in res['recipe']])

    if res['memory']:
        print('\n## 3. peak memory of a training step')
        print_table(['model', 'peak MiB', 'vs dense', 'method'],
                    [[r['model'], f"{r['peak_mib']:.0f}", fmt(r.get('vs_dense')), r['method']] for r in res['memory']])

    print('\n## 4. sampling')
    s = res['sampling']
    if 'note' in s:
        print(s['note'])
    else:
        print(f"baby MoE model, {s['new_tokens']} new tokens: no cache {s['no cache']['tokens_per_s']:.1f} tok/s, "
              f"KV cache {s['kv cache']['tokens_per_s']:.1f} tok/s, speedup {s['speedup']:.2f}x")

    print('\n## 5. torch.compile graph breaks of the MoE layer (torch._dynamo.explain)')
    print_table(['impl', 'mode', 'dtype', 'graphs', 'breaks', 'fullgraph', 'compiled fwd+bwd', 'why not'],
                [[c['impl'], c['mode'], c['dtype'], str(c.get('graphs', '-')), str(c.get('graph_breaks', '-')),
                  str(c['fullgraph']), c.get('compiled_fwd_bwd', '-'),
                  (c.get('reasons') or [c.get('error', '')])[0]] for c in res['compile_check']])
    print(f"\n# total {res['meta']['seconds']:.0f} s")


def table_text(hdr, rows):
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(hdr)]
    lines = ['| ' + ' | '.join(h.ljust(w[i]) for i, h in enumerate(hdr)) + ' |',
             '|' + '|'.join('-' * (x + 2) for x in w) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(c.ljust(w[i]) for i, c in enumerate(r)) + ' |' for r in rows])


def print_table(hdr, rows):
    print(table_text(hdr, rows))


# ----------------------------------------------------------------------------- main

DTYPES = {'float32': torch.float32, 'fp32': torch.float32, 'bfloat16': torch.bfloat16,
          'bf16': torch.bfloat16, 'float16': torch.float16, 'fp16': torch.float16}


SECTIONS = ('layer', 'model', 'memory', 'sampling', 'compile')  # --skip's names


def _checked(check):
    """argparse type: run check(text) (raises ArgumentTypeError), keep the text (main splits it)."""
    def parse(text):
        check(text)
        return text
    parse.__name__ = check.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def make_parser():
    """The arguments, each checked on its own (types, names, ranges); an error is one line, exit 2.
    What depends on the machine or on several arguments (device, dtype, sizes) is check_args's."""
    p = cli.Parser(prog='bench.py', description=__doc__.split('\n')[1],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu | cuda | cuda:N')
    p.add_argument('--dtype', default=None, choices=list(DTYPES),
                   help="default: dtype 'auto' of train.py (bfloat16 on GPUs that have it, float16 on older ones, float32 on CPU)")
    p.add_argument('--quick', action='store_true', help='tiny sizes (CI smoke run, seconds)')
    p.add_argument('--balanced', action='store_true', help='force uniform round-robin routing')
    p.add_argument('--compile', action='store_true', help='also time torch.compile-d ours/dense/model')
    p.add_argument('--json', action='store_true', help='print JSON instead of tables')
    p.add_argument('--n-embd', default=None, type=_checked(cli.int_list),
                   help='comma list, overrides the preset (e.g. 384,768)')
    p.add_argument('--tokens', default=None, type=_checked(cli.int_list),
                   help='comma list, overrides the preset (e.g. 4096,16384)')
    p.add_argument('--moe', default=','.join(MOE_SHAPES), type=_checked(lambda t: cli.names_list(t, MOE_SHAPES, 'MoE shape')),
                   help=f'comma list of {list(MOE_SHAPES)}')
    p.add_argument('--repeats', type=cli.positive_int, default=None)
    p.add_argument('--threads', type=cli.positive_int, default=None,
                   help='torch.set_num_threads (default: torch\'s own). On a small CPU shared with other '
                        'jobs use 1: with 2+ OpenMP threads every parallel op waits at a barrier for a '
                        'descheduled thread, which turns a 1 ms matmul into a 16 ms one (measured here)')
    p.add_argument('--onehot-budget-gib', type=cli.positive_float, default=None,
                   help='memory the one-hot baseline may use (default: half of free RAM / GPU memory); '
                        'sizes whose estimate exceeds it are reported as OOM instead of run')
    p.add_argument('--baseline', default=None, metavar='FILE',
                   help='another version of model.py (e.g. `git show REV:model.py > old_model.py`): its '
                        'MoELayer, with the same weights, is checked and timed beside ours in section 1')
    p.add_argument('--full-logits', action='store_true',
                   help='the training step materialises the whole (tokens, vocab) logits, as before issue 21, '
                        'instead of train.py\'s chunked LM head + CE on CUDA (compare section 3\'s peak memory)')
    p.add_argument('--steps', type=cli.positive_int, default=None,
                   help='section 2: training steps back to back per timed call, synced only at its ends '
                        '(default: the preset\'s, 20 on CUDA, 3 on CPU, 2 with --quick)')
    p.add_argument('--profile', type=cli.non_negative_int, nargs='?', const=3, default=0, metavar='STEPS',
                   help='first, a torch.profiler kernel table (top 30 by time) of STEPS (default 3) steady '
                        'training steps of section 2\'s models (on CUDA its kernels, on CPU its aten ops); '
                        'runs even if section 2 is skipped; 0 = off')
    p.add_argument('--kernels-out', default=None, metavar='FILE', help='--profile: also write the table to FILE')
    p.add_argument('--skip', default='', type=_checked(lambda t: cli.names_list(t, SECTIONS, 'section', True)),
                   help='comma list of sections to skip: ' + ','.join(SECTIONS))
    p.add_argument('--_mem-child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--mcfg', default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def check_args(args):
    """What parse_args cannot check alone: the device is here, the dtype runs on it, the sizes fit the
    expert matmuls and memory, the files can be read and written. Before any work; one line, exit 2."""
    bad = lambda msg: cli.fail('bench.py', msg)  # noqa: E731
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        bad(f'--device {args.device!r} is not a device: use cpu, cuda or cuda:N')
    if device.type not in ('cpu', 'cuda'):
        bad(f'--device {args.device!r}: bench.py measures cpu or cuda')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            bad(f'--device {args.device}: this torch sees no CUDA GPU (use --device cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            bad(f'--device {args.device}: there are {torch.cuda.device_count()} GPUs (cuda:0 ...)')
    dtype_name = args.dtype or hardware.auto_dtype(device.type)
    dtype = DTYPES[dtype_name]
    if dtype == torch.bfloat16 and device.type == 'cuda' and not hardware.bf16_supported():
        bad(f"--dtype {args.dtype}: this GPU has no native bfloat16; use float16 (or leave --dtype out)")
    moe = args.moe.split(',')
    if args.n_embd:
        # the grouped expert matmul (torch._grouped_mm) wants every row a whole number of 16-byte units
        unit = 16 // dtype.itemsize
        for D in map(int, args.n_embd.split(',')):
            for name in moe:
                H = MOE_SHAPES[name][2](D)
                if D % unit or H % unit or H < 1:
                    bad(f'--n-embd {D}: with --moe {name} in {dtype_name} the expert matmuls need n_embd and '
                        f'expert_hidden ({H}) to be multiples of {unit} (16-byte rows); use e.g. 64 or 384')
    if args.tokens or args.n_embd:
        # a layer: its weights, grads and AdamW-free copies (~4x 2*E*D*H), and a few (tokens, n_embd) and
        # (tokens * top_k, hidden) activations at once; more than the free memory fails in the middle of the run
        free = free_memory_bytes(device)
        preset = PRESETS['quick' if args.quick else ('cuda' if device.type == 'cuda' else 'cpu')]  # main's choice
        for D in (map(int, args.n_embd.split(',')) if args.n_embd else preset['n_embd']):
            for T in (map(int, args.tokens.split(',')) if args.tokens else preset['tokens']):
                for n in moe:
                    E, K, hidden_fn = MOE_SHAPES[n]
                    need = (4 * 2 * E * D * hidden_fn(D) + 4 * T * K * (D + hidden_fn(D))) * dtype.itemsize
                    if need > free:
                        bad(f'--n-embd {D} --tokens {T} --moe {n}: a layer needs about {need / 2**30:.3g} GiB, more '
                            f'than the {free / 2**30:.1f} GiB free; use smaller sizes')
    if args.threads and args.threads > (os.cpu_count() or 1):
        bad(f'--threads {args.threads}: this machine has {os.cpu_count()} CPUs; more threads only wait on each other')
    if args.kernels_out is not None:
        if not args.profile:
            bad('--kernels-out writes the --profile table: add --profile (or drop --kernels-out)')
        folder = os.path.dirname(os.path.abspath(args.kernels_out))
        if os.path.isdir(args.kernels_out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            bad(f'--kernels-out {args.kernels_out}: not a file in an existing, writable folder')
    if args.baseline:
        args.baseline_module = load_baseline(args.baseline)


def main(argv=None):
    args = parse_args(argv)
    if not args._mem_child:
        check_args(args)  # every argument, before any work
    JSON_OUT[0], FULL_LOGITS[0] = args.json, args.full_logits
    args.dtype = args.dtype or hardware.auto_dtype(torch.device(args.device).type)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == 'cpu':
        hardware.keep_freed_memory()  # as train.py does on CPU: time the math, not page faults
    if args._mem_child:
        return memory_child(args)
    t_start = time.perf_counter()
    baseline = getattr(args, 'baseline_module', None)  # check_args loaded it: a bad file stopped it
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    preset = dict(PRESETS['quick' if args.quick else ('cuda' if device.type == 'cuda' else 'cpu')])
    n_embds = [int(v) for v in args.n_embd.split(',')] if args.n_embd else preset['n_embd']
    tokens = [int(v) for v in args.tokens.split(',')] if args.tokens else preset['tokens']
    repeats = args.repeats or preset['repeats']
    mcfg = preset['model']
    skip = set(filter(None, args.skip.split(',')))
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak_flops, peak_how = peak_matmul_flops(device, dtype)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))

    res = dict(meta=dict(device=device.type, dtype=args.dtype, torch=torch.__version__,
                         device_name=torch.cuda.get_device_name(device) if device.type == 'cuda'
                         else (platform.processor() or platform.machine()) + f', {os.cpu_count()} cpus',
                         threads=torch.get_num_threads(), balanced=args.balanced, compile=args.compile,
                         quick=args.quick, repeats=repeats, peak_flops=peak_flops, peak_how=peak_how,
                         baseline=args.baseline),
               model_cfg_desc=', '.join(f'{k}={v}' for k, v in mcfg.items()))

    # correctness first: small sizes, every variant against ours
    log('checks ...')
    checks = []
    for name in args.moe.split(','):
        E, K, hidden_fn = MOE_SHAPES[name]
        D = 64 if args.quick else 128
        checks += check_layer_variants(D, E, K, hidden_fn(D), 256 if args.quick else 512, device, dtype,
                                       args.balanced, baseline)
    res['checks'] = checks
    log('op counts ...')
    res['op_counts'] = op_count_report()
    print_op_counts(res['op_counts'])  # at once: the regression number, even if a later section fails

    res['layer'] = []
    if 'layer' not in skip:
        for D in n_embds:
            for name in args.moe.split(','):
                for T in tokens:
                    log(f'layer D={D} {name} T={T} ...')
                    res['layer'].append(bench_layer(D, name, T, device, dtype, repeats, args.balanced,
                                                    args.compile, args.onehot_budget_gib, baseline))
    res['model'] = []
    steps = args.steps or preset['steps']
    res['meta']['steps'] = steps
    if 'model' not in skip or args.profile:
        log('model step ...' if 'model' not in skip else 'profile ...')
        if device.type == 'cpu':  # re-measure just before use: a shared CPU's speed drifts
            peak_flops, peak_how = peak_matmul_flops(device, dtype)
            res['meta'].update(peak_flops=peak_flops, peak_how=peak_how + ', just before the model step')
        res['model'] = bench_model(mcfg, device, dtype, max(repeats, 3), args.balanced, args.compile,
                                   peak_flops, steps, args.profile, args.kernels_out, timed='model' not in skip)
        if 'recipe' in preset and 'model' not in skip:  # small steps: many of them for a stable median
            res['recipe'] = bench_model(preset['recipe'], device, dtype, 10, args.balanced, args.compile,
                                        peak_flops, 3)
    res['memory'] = []
    if 'memory' not in skip or (res['model'] and device.type == 'cpu'):
        log('memory ...')
        res['memory'] = bench_memory(mcfg, device, dtype, args.balanced)
        if device.type == 'cpu':  # section 2's peak memory: a fresh process each (bench_memory says why)
            for row, mem in zip(res['model'], res['memory']):
                row.update(peak_mib=mem['peak_mib'], peak_how=mem['method'])
        if 'memory' in skip:
            res['memory'] = []
    res['sampling'] = dict(note='skipped')
    if 'sampling' not in skip:
        res['sampling'] = bench_sampling(device, dtype, args.balanced, args.quick)
    res['compile_check'] = []
    if 'compile' not in skip:
        log('compile check ...')
        res['compile_check'] = compile_check(device, dtype, args.compile)
    res['meta']['seconds'] = time.perf_counter() - t_start
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_report(res)
    return res


if __name__ == '__main__':
    main()

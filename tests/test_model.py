"""model.py against slow, obviously-correct references (seed 001's unit-test list and issue 2)."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optim  # noqa: E402
from model import (HAS_GROUPED_MM, MoEGPT, MoEGPTConfig, MoELayer, activation_fn,  # noqa: E402
                   load_balancing_loss, router_z_loss)


def route(layer, x_TD):
    """The router's Routing as (logits, probs, top-k ids, gates), for a fixed-k router."""
    r = layer.router(x_TD)
    return (r.logits_TE, r.probs_TE, *r.topk())


def counts(ids, E):
    """Assignments per expert: what the balance loss is made of."""
    return torch.bincount(ids.reshape(-1), minlength=E)

ACTS = ['gelu', 'relu', 'silu', 'tanh', 'swiglu']


def tiny_config(**kw):
    base = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True,
                n_experts=4, top_k=2, expert_hidden=24)
    base.update(kw)
    return MoEGPTConfig(**base)


def moe_layer(dtype=torch.float64, seed=0, **kw):
    """A MoE layer with all weights random (biases too) and a router strong enough to make real,
    tie-free routing decisions."""
    torch.manual_seed(seed)
    layer = MoELayer(tiny_config(**kw)).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def naive_moe(layer, x_TD):
    """Per-token reference: softmax router, true top-k by full sort, each token through its k experts
    one at a time, weighted sum. A Python loop over tokens on purpose: slow and obviously right."""
    ex, r = layer.experts, layer.router
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        probs = torch.softmax(x_TD[t] @ r.gate.weight.T, dim=-1)
        order = sorted(range(len(probs)), key=lambda e: -probs[e].item())[:layer.top_k]
        weights = [probs[e] for e in order]
        if r.norm_topk_prob:
            s = sum(weights)
            weights = [w / s for w in weights]
        for e, w in zip(order, weights):
            h = activation_fn(ex.activation, x_TD[t] @ ex.w1_EDF[e] + ex.b1_EF[e])
            out[t] += w * (h @ ex.w2_EHD[e] + ex.b2_ED[e])
    return out


# ----------------------------------------------------------------------------- router


def test_router_probs_sum_to_one_and_topk_is_true_topk():
    layer = moe_layer(n_experts=8, top_k=3)
    x = torch.randn(50, 16, dtype=torch.float64)
    logits, probs, ids, gates = route(layer, x)
    assert torch.allclose(probs.sum(-1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    ref_ids = torch.tensor([sorted(range(8), key=lambda e: -p[e].item())[:3] for p in probs])
    assert torch.equal(ids, ref_ids)
    # renormalised gates sum to 1 and keep the ratios of the chosen probabilities
    assert torch.allclose(gates.sum(-1), torch.ones(50, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(gates, probs.gather(1, ids) / probs.gather(1, ids).sum(-1, keepdim=True))


def test_gates_not_renormalised_when_switch_style():
    layer = moe_layer(n_experts=8, top_k=2, norm_topk_prob=False)
    x = torch.randn(20, 16, dtype=torch.float64)
    _, probs, ids, gates = route(layer, x)
    assert torch.equal(gates, probs.gather(1, ids))
    assert (gates.sum(-1) < 1).all()


def test_router_fp32_under_bf16_autocast():
    layer = moe_layer(dtype=torch.float32, n_experts=4, router_fp32=True)
    x = torch.randn(10, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, probs, _, _ = route(layer, x)
    assert logits.dtype == torch.float32 and probs.dtype == torch.float32
    assert torch.allclose(logits, x @ layer.router.gate.weight.T, atol=1e-5)


def reference_softmax_topk(logits, k):
    """The plain ops SoftmaxTopK stands for, differentiated by autograd."""
    probs = F.softmax(logits, dim=-1)
    ids = logits.topk(k, dim=-1).indices  # those of probs (monotone), but the same pick on bf16 ties
    gates = probs.gather(1, ids) / probs.gather(1, ids).sum(-1, keepdim=True)
    return probs, ids, gates, torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize('used', ['all', 'gates', 'probs', 'lse', 'probs+lse'])
def test_softmax_topk_node_equals_plain_autograd_float64(used):
    """kernels.SoftmaxTopK (probs, top-k, renormalised gates and lse in one node, its backward
    hand-written) against the plain ops' autograd in float64 and gradcheck, whichever outputs the
    loss uses (an unused output's gradient never arrives: the backward must not assume it)."""
    from kernels import SoftmaxTopK
    torch.manual_seed(0)
    logits = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    w = {name: torch.randn(12, *([6] if name == 'probs' else [3] if name == 'gates' else []),
                           dtype=torch.float64) for name in ('probs', 'gates', 'lse')}
    names = ['probs', 'gates', 'lse'] if used == 'all' else used.split('+')

    def loss(outs):
        probs, ids, gates, lse = outs
        return sum((dict(probs=probs, gates=gates, lse=lse)[n] * w[n]).sum() for n in names)

    ours, ref = SoftmaxTopK.apply(logits, 3), reference_softmax_topk(logits, 3)
    for a_, r_ in zip(ours, ref):
        assert torch.allclose(a_, r_, rtol=0, atol=1e-12) if a_.is_floating_point() else torch.equal(a_, r_)
    g_ours, = torch.autograd.grad(loss(ours), logits)
    g_ref, = torch.autograd.grad(loss(ref), logits)
    assert torch.allclose(g_ours, g_ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda lg: loss(SoftmaxTopK.apply(lg, 3)), (logits,))


def test_softmax_topk_node_under_bf16_logits():
    """router_fp32=False under bf16 autocast: bf16 logits. The node's gradient, in the logits' dtype,
    is as close to the exact (float64) gradient as the plain ops' own under autocast."""
    from kernels import SoftmaxTopK
    torch.manual_seed(0)
    logits = torch.randn(64, 8).to(torch.bfloat16).requires_grad_(True)
    w_p, w_g = torch.randn(64, 8), torch.randn(64, 2)

    def grad(fn, lg, autocast):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            probs, ids, gates, lse = fn(lg)
            loss = (probs * w_p).sum() + (gates * w_g).sum() + lse.double().square().mean()
        return torch.autograd.grad(loss, lg)[0]

    exact = grad(lambda lg: reference_softmax_topk(lg, 2), logits.detach().double().requires_grad_(True), False)
    ours = grad(lambda lg: SoftmaxTopK.apply(lg, 2), logits, True)
    plain = grad(lambda lg: reference_softmax_topk(lg, 2), logits, True)
    assert ours.dtype == torch.bfloat16
    err_ours, err_plain = ((g.double() - exact).abs().max().item() for g in (ours, plain))
    assert err_ours <= max(2 * err_plain, 1e-2 * exact.abs().max().item()), (err_ours, err_plain)


# ----------------------------------------------------------------------------- losses


def test_aux_loss_seed_002_example():
    # seed 002's worked example; its printed 1.0876 is an arithmetic slip (mean of column 2 is 0.1875).
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1],
                          [0.4, 0.4, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1],
                          [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 0, 1, 2, 3, 3]).unsqueeze(1)  # token 3 is a 0.4/0.4 tie: pass it explicitly
    assert load_balancing_loss(probs, counts(ids, 4)).item() == pytest.approx(1.1125, abs=1e-12)
    # f=[.5,.125,.125,.25], P=[.325,.2375,.1875,.25] by hand
    f = torch.tensor([.5, .125, .125, .25], dtype=torch.float64)
    P = torch.tensor([.325, .2375, .1875, .25], dtype=torch.float64)
    assert torch.allclose(probs.mean(0), P)
    assert (4 * (f * P).sum()).item() == pytest.approx(1.1125, abs=1e-12)


@pytest.mark.parametrize('k', [1, 2, 3, 4])
def test_aux_loss_is_one_for_uniform_routing(k):
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    ids = torch.stack([(torch.arange(k) + t) % E for t in range(T)])  # every expert chosen equally often
    assert load_balancing_loss(probs, counts(ids, E)).item() == pytest.approx(1.0, abs=1e-12)


def test_aux_loss_greater_than_one_when_collapsed():
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 6, dtype=torch.float64)
    ids = torch.zeros(6, 1, dtype=torch.long)
    assert load_balancing_loss(probs, counts(ids, 4)).item() == pytest.approx(4 * 0.97)


def test_z_loss_hand_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    # logsumexp: log 2 and log 4; z = mean of squares
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize('activation', ACTS)
@pytest.mark.parametrize('norm', [True, False])
def test_dropless_equals_naive_float64_reference(activation, norm):
    layer = moe_layer(activation=activation, norm_topk_prob=norm, n_experts=5, top_k=2)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    out, aux = layer(x)
    ref = naive_moe(layer, x.view(-1, 16)).view(3, 7, 16)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-10, rel
    assert aux['drop_frac'].item() == 0.0
    assert aux['expert_counts'].sum().item() == 3 * 7 * 2


@pytest.mark.parametrize('expert_impl', ['loop', 'grouped'] if HAS_GROUPED_MM else ['loop'])
@pytest.mark.parametrize('activation', ['gelu', 'swiglu'])
def test_dropless_gradients_equal_naive_float64_reference(expert_impl, activation):
    """The dispatch's backward (SortRows' index_copy and sum over k, UnsortRows' gather, ExpertBias'
    segmented sums) against autograd through the per-token loop in float64: input, router, expert weights,
    biases. grouped_mm has no float64 kernel: that path runs in float32 (same weights)."""
    dtype, tol = (torch.float32, 1e-5) if expert_impl == 'grouped' else (torch.float64, 1e-10)
    grads = []
    for run in ('ours', 'naive'):
        layer = moe_layer(activation=activation, n_experts=5, top_k=2, expert_impl=expert_impl)
        layer = layer.to(dtype if run == 'ours' else torch.float64)
        x = torch.randn(3, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        x = x.to(layer.router.gate.weight.dtype).requires_grad_(True)
        out = layer(x)[0] if run == 'ours' else naive_moe(layer, x.view(-1, 16)).view(3, 7, 16)
        (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        grads.append({'x': x.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    ours, ref = grads
    assert set(ours) == set(ref)
    for name in ref:
        err = ((ours[name].double() - ref[name]).abs().max() / ref[name].abs().max()).item()
        assert err < tol, (name, err)


def test_chunked_lm_head_cross_entropy_equals_the_plain_path(monkeypatch):
    """return_logits=False (train.py's step): the LM head and CE through torch's chunked
    linear_cross_entropy (taken on CUDA; forced here), never the whole logits; loss and every gradient
    equal the plain path in float64 (targets with ignored positions too), and under bf16 autocast
    within bf16 rounding."""
    import model as model_module
    monkeypatch.setattr(model_module, 'chunked_lm_head', lambda device: True)
    cfg = tiny_config(n_experts=4, top_k=2, vocab_size=512, n_embd=16, block_size=64)
    idx = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    tgt = idx.roll(-1, 1)
    tgt[:, -3:] = -1
    for dtype, ctx, tol in ((torch.float64, torch.autocast('cpu', enabled=False), 1e-12),
                            (torch.float32, torch.autocast('cpu', dtype=torch.bfloat16), 2e-2)):
        runs = []
        for return_logits in (True, False):
            torch.manual_seed(0)
            model = MoEGPT(cfg).to(dtype)
            with ctx:
                logits, loss, stats = model(idx, tgt, return_logits=return_logits)
            loss.backward()
            runs.append((logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        (logits, loss_ref, g_ref), (none, loss, g) = runs
        assert none is None and logits.shape == (4, 64, 512)
        assert abs(loss.item() - loss_ref.item()) <= tol * abs(loss_ref.item())
        for n in g_ref:
            err = ((g[n].double() - g_ref[n].double()).abs().max() / g_ref[n].double().abs().max()).item()
            assert err <= tol * 5, (dtype, n, err)


@pytest.mark.parametrize('k', [1, 3])
def test_sort_rows_and_unsort_rows_equal_index_select_autograd(k):
    """SortRows (token rows in expert order; backward an index_copy and a sum over k) and UnsortRows
    (the inverse permutation; backward a gather) against index_select's own autograd, float64, and
    gradcheck."""
    from kernels import SortRows, UnsortRows
    n = 5
    order = torch.randperm(n * k, generator=torch.Generator().manual_seed(0))  # row r of the sort <- assignment order[r]
    x = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n * k, 3, dtype=torch.float64)
    out = SortRows.apply(x, order, k)
    assert torch.equal(out, x[order // k])
    ours, = torch.autograd.grad(out, x, g)
    ref, = torch.autograd.grad(x.index_select(0, order // k), x, g)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: SortRows.apply(v, order, k), (x,))
    y = torch.randn(n * k, 3, dtype=torch.float64, requires_grad=True)
    back = UnsortRows.apply(y, order)
    assert torch.equal(back.index_select(0, order), y)  # the inverse: sorting again gives y
    ours, = torch.autograd.grad(back, y, g)
    ref, = torch.autograd.grad(y.index_select(0, torch.argsort(order)), y, g)
    assert torch.equal(ours, ref)
    assert torch.autograd.gradcheck(lambda v: UnsortRows.apply(v, order), (y,))


@pytest.mark.parametrize('dropped', [0, 3])
def test_expert_bias_equals_index_select_autograd(dropped):
    """ExpertBias (a pointwise add in place; the bias gradient one segmented sum per expert, no atomic
    adds) against h + b[expert] through index_select's autograd, float64 and gradcheck; rows past
    offs[-1] (dropped by capacity) get no gradient into b."""
    from kernels import ExpertBias
    counts = torch.tensor([2, 0, 4, 1])
    offs = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).int()  # (E+1,) as MoELayer makes them
    expert = torch.cat([torch.arange(4).repeat_interleave(counts), torch.full((dropped,), 3)])
    kept = counts.sum().item()
    h = torch.randn(kept + dropped, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(kept + dropped, 5, dtype=torch.float64)
    out = ExpertBias.apply(h.clone(), b, expert, offs)  # in place: on a grouped_mm output, never a leaf
    assert torch.equal(out, h + b[expert])
    ours = torch.autograd.grad(out, (h, b), g)
    g_kept = torch.cat([g[:kept], torch.zeros(dropped, 5, dtype=torch.float64)])
    ref = (g, torch.autograd.grad(h + b.index_select(0, expert), b, g_kept)[0])
    for a_, r_ in zip(ours, ref):
        assert torch.allclose(a_, r_, rtol=0, atol=1e-12)
    if not dropped:
        assert torch.autograd.gradcheck(lambda hh, bb: ExpertBias.apply(hh.clone(), bb, expert, offs), (h, b))


@pytest.mark.skipif(not HAS_GROUPED_MM, reason='torch.nn.functional.grouped_mm needs torch >= 2.8')
@pytest.mark.parametrize('capacity_factor', [0.0, 0.8])
@pytest.mark.parametrize('activation', ['gelu', 'swiglu'])
def test_grouped_path_equals_loop_path(capacity_factor, activation):
    outs, grads = [], []
    for impl in ('grouped', 'loop'):
        layer = moe_layer(dtype=torch.float32, n_experts=6, top_k=2, expert_impl=impl,
                          capacity_factor=capacity_factor, activation=activation)
        torch.manual_seed(1)
        x = torch.randn(2, 40, 16, requires_grad=True)
        out, aux = layer(x)
        (out.square().sum() + aux['losses']['aux']).backward()
        outs.append(out.detach())
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-4, rtol=1e-4)


def test_empty_experts_and_single_token():
    layer = moe_layer(n_experts=8, top_k=2)
    x = torch.randn(1, 1, 16, dtype=torch.float64)  # one token: 6 of 8 experts get nothing
    out, aux = layer(x)
    assert torch.allclose(out.view(1, 16), naive_moe(layer, x.view(1, 16)), atol=1e-12)
    assert aux['expert_counts'].sum().item() == 2 and (aux['expert_counts'] == 0).sum().item() == 6


def test_gradients_reach_router_and_selected_experts_only():
    layer = moe_layer(n_experts=4, top_k=1, norm_topk_prob=False)
    with torch.no_grad():  # make expert 3 lose every routing decision
        layer.router.gate.weight[3] = -100.0 * layer.router.gate.weight[:3].abs().sum(0)
    x = torch.randn(2, 10, 16, dtype=torch.float64).abs()
    out, aux = layer(x)
    out.square().sum().backward()  # the LM-like loss only
    counts = aux['expert_counts']
    assert counts[3] == 0 and (counts[:3] > 0).any()
    g_router_lm = layer.router.gate.weight.grad.clone()
    assert g_router_lm.abs().sum() > 0
    for name in ('w1_EDF', 'w2_EHD', 'b1_EF', 'b2_ED'):
        g = getattr(layer.experts, name).grad
        for e in range(4):
            assert (g[e].abs().sum() > 0) == bool(counts[e] > 0), (name, e)
    # and the aux loss alone also reaches the router
    layer.zero_grad()
    _, aux = layer(x)
    aux['losses']['aux'].backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert layer.experts.w1_EDF.grad is None or layer.experts.w1_EDF.grad.abs().sum() == 0


def test_capacity_drops_exactly_expected_assignments():
    # 6 tokens, 2 experts, top-1, capacity_factor 1.0 -> capacity ceil(1*6*1/2) = 3.
    # Router logits chosen so tokens 0..4 prefer expert 0 and token 5 prefers expert 1:
    # expert 0 keeps tokens 0,1,2 (first in order), drops 3,4.
    layer = moe_layer(n_experts=2, top_k=1, capacity_factor=1.0, n_embd=16, norm_topk_prob=False)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 1.0
        layer.router.gate.weight[1, 0] = -1.0
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    x[0, :5, 0] = 1.0
    x[0, 5, 0] = -1.0
    out, aux = layer(x)
    ref = naive_moe(layer, x.view(6, 16))
    kept = torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.float64).unsqueeze(1)
    assert torch.allclose(out.view(6, 16), ref * kept, atol=1e-12)
    assert aux['drop_frac'].item() == pytest.approx(2 / 6)
    assert aux['expert_counts'].tolist() == [5.0, 1.0]  # counts are demand, before dropping


def test_capacity_drops_second_choices_before_first_choices():
    # top-2, 4 experts, 4 tokens, capacity_factor 0.5 -> capacity ceil(0.5*4*2/4) = 1.
    # Every token ranks experts 0 > 1 > 2 > 3 except token 3, whose first choice is 1.
    # Expert 0: first choices of tokens 0,1,2 -> keeps token 0. Expert 1: first choice of token 3
    # and second choices of tokens 0,1,2 -> keeps token 3 (a first choice wins over earlier seconds).
    layer = moe_layer(n_experts=4, top_k=2, capacity_factor=0.5, norm_topk_prob=False, capacity_priority='choice')
    x = torch.zeros(1, 4, 16, dtype=torch.float64)
    x[0, :, 0] = 1.0
    x[0, 3, 1] = 1.0
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
        layer.router.gate.weight[1, 1] = 5.0
    out, aux = layer(x)
    _, _, ids, gates = route(layer, x.view(4, 16))
    assert ids.tolist() == [[0, 1], [0, 1], [0, 1], [1, 0]]
    ex = layer.experts

    def expert(e, t):
        h = activation_fn(ex.activation, x[0, t] @ ex.w1_EDF[e] + ex.b1_EF[e])
        return h @ ex.w2_EHD[e] + ex.b2_ED[e]
    ref = torch.zeros(4, 16, dtype=torch.float64)
    ref[0] = gates[0, 0] * expert(0, 0)      # token 0 keeps its first choice only
    ref[3] = gates[3, 0] * expert(1, 3)      # token 3 keeps its first choice (expert 1)
    assert torch.allclose(out.view(4, 16), ref, atol=1e-12)
    assert aux['drop_frac'].item() == pytest.approx(6 / 8)


def test_eval_capacity_factor_used_in_eval_mode():
    layer = moe_layer(n_experts=4, top_k=2, capacity_factor=0.25, eval_capacity_factor=0.0)
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    layer.train()
    assert layer(x)[1]['drop_frac'].item() > 0
    layer.eval()
    out, aux = layer(x)
    assert aux['drop_frac'].item() == 0.0
    assert torch.allclose(out.view(-1, 16), naive_moe(layer, x.view(-1, 16)), atol=1e-10)


# ----------------------------------------------------------------------------- model


NANOGPT_NAMES = (['transformer.wte.weight', 'transformer.wpe.weight']
                 + [f'transformer.h.{i}.{n}' for i in range(2) for n in (
                     'ln_1.weight', 'ln_1.bias', 'attn.c_attn.weight', 'attn.c_attn.bias',
                     'attn.c_proj.weight', 'attn.c_proj.bias', 'ln_2.weight', 'ln_2.bias',
                     'mlp.c_fc.weight', 'mlp.c_fc.bias', 'mlp.c_proj.weight', 'mlp.c_proj.bias')]
                 + ['transformer.ln_f.weight', 'transformer.ln_f.bias', 'lm_head.weight'])


def nanogpt_reference_logits(sd, idx, n_head):
    """nanoGPT's forward written out by hand in float64 from a state dict."""
    T = idx.shape[1]
    x = sd['transformer.wte.weight'][idx] + sd['transformer.wpe.weight'][:T]
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + '.weight'], sd[p + '.bias'], 1e-5)  # noqa: E731
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(2):
        p = f'transformer.h.{i}.'
        h = ln(x, p + 'ln_1')
        q, k, v = (h @ sd[p + 'attn.c_attn.weight'].T + sd[p + 'attn.c_attn.bias']).chunk(3, dim=-1)
        B, D = x.shape[0], x.shape[-1]
        q, k, v = (t.view(B, T, n_head, D // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // n_head)
        att = att.masked_fill(~mask, float('-inf')).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        x = x + y @ sd[p + 'attn.c_proj.weight'].T + sd[p + 'attn.c_proj.bias']
        h = ln(x, p + 'ln_2')
        h = F.gelu(h @ sd[p + 'mlp.c_fc.weight'].T + sd[p + 'mlp.c_fc.bias'])
        x = x + h @ sd[p + 'mlp.c_proj.weight'].T + sd[p + 'mlp.c_proj.bias']
    x = ln(x, 'transformer.ln_f')
    return x @ sd['lm_head.weight'].T


def test_dense_model_is_exactly_nanogpt():
    cfg = tiny_config(n_experts=1, expert_hidden=None)
    model = MoEGPT(cfg).double()
    names = [n for n, _ in model.named_parameters()]  # tied lm_head/wte shows once
    assert names == [n for n in NANOGPT_NAMES if n != 'lm_head.weight']
    sd = model.state_dict()
    assert list(sd.keys()) == NANOGPT_NAMES
    assert sd['transformer.h.0.mlp.c_fc.weight'].shape == (64, 16)
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases non-zero too
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    logits, loss, stats = model(idx, idx)
    ref = nanogpt_reference_logits(model.state_dict(), idx, cfg.n_head)
    assert torch.allclose(logits, ref, atol=1e-10)
    assert loss.item() == pytest.approx(F.cross_entropy(ref.view(-1, 37), idx.view(-1)).item(), abs=1e-10)
    assert stats['losses'] == {} and stats['expert_counts'].shape == (0, 1)


def test_moe_layer_placement():
    cfg = tiny_config(n_layer=6, moe_every=2, moe_first_dense=1)
    model = MoEGPT(cfg)
    assert [b.is_moe for b in model.transformer.h] == [False, True, False, True, False, True]
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]


def test_model_loss_is_ce_plus_weighted_aux_and_stats():
    cfg = tiny_config(aux_loss_coef=0.3, z_loss_coef=0.05, n_layer=3)
    model = MoEGPT(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    logits, loss, stats = model(idx, idx, return_intermediate=True)
    ce = F.cross_entropy(logits.view(-1, cfg.vocab_size), idx.view(-1))
    routing = stats['routing']
    assert len(routing) == 3
    aux = torch.stack([load_balancing_loss(r['router_probs'].view(-1, 4), counts(r['topk_ids'], 4))
                       for r in routing]).mean()
    z = torch.stack([router_z_loss(r['router_logits'].view(-1, 4)) for r in routing]).mean()
    assert loss.item() == pytest.approx((ce + 0.3 * aux + 0.05 * z).item(), abs=1e-12)
    assert stats['ce'].item() == pytest.approx(ce.item(), abs=1e-12)
    assert stats['losses']['aux'].item() == pytest.approx(aux.item(), abs=1e-12)
    assert stats['expert_counts'].shape == (3, 4)
    assert stats['expert_counts'].sum(1).tolist() == [2 * 12 * 2] * 3
    for layer_counts, r in zip(stats['expert_counts'], routing):
        assert layer_counts.tolist() == torch.bincount(r['topk_ids'].view(-1), minlength=4).double().tolist()
        assert r['topk_weights'].shape == (2, 12, 2)
        assert torch.allclose(r['router_probs'].sum(-1), torch.ones(2, 12, dtype=torch.float64))
    p = routing[0]['router_probs']
    assert stats['router_entropy'][0].item() == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-6)
    assert not any(t.requires_grad for k, t in stats.items() if torch.is_tensor(t))


def test_routing_intermediates_off_by_default_and_no_state_kept():
    model = MoEGPT(tiny_config())
    idx = torch.randint(0, 37, (2, 8))
    _, loss1, stats1 = model(idx, idx)
    assert 'routing' not in stats1
    model.eval()
    model(torch.randint(0, 37, (3, 5)))  # an eval forward in between changes nothing
    model.train()
    _, loss2, stats2 = model(idx, idx)
    assert loss1.item() == loss2.item()
    assert torch.equal(stats1['expert_counts'], stats2['expert_counts'])
    # nothing tensor-valued is stashed on modules between calls
    for m in model.modules():
        for k, v in vars(m).items():
            assert not torch.is_tensor(v) or k in ('_parameters', '_buffers'), (type(m), k)


def test_num_params_total_and_active():
    cfg = tiny_config(n_experts=8, top_k=2, n_layer=2, moe_every=2)  # block 0 MoE, block 1 dense
    model = MoEGPT(cfg)
    counts = model.get_num_params()
    total = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    per_expert = 16 * 24 + 24 * 16 + 24 + 16  # w1, w2, b1, b2 of one expert
    assert counts.total == total
    assert counts.active == total - 6 * per_expert
    dense = MoEGPT(tiny_config(n_experts=1))
    assert dense.get_num_params().total == dense.get_num_params().active
    mfu_moe = model.estimate_mfu(1, 1.0, peak_flops=1.0)
    assert mfu_moe == (6 * counts.active + 12 * 2 * 2 * 8 * 16) * 16  # active params in the FLOPs


def test_init_router_std_and_residual_scaling():
    cfg = tiny_config(n_embd=64, n_head=4, n_experts=8, expert_hidden=256, n_layer=8, router_init_std=0.01)
    torch.manual_seed(0)
    model = MoEGPT(cfg)
    moe = model.moe_layers()[0]
    assert moe.router.gate.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert moe.experts.w1_EDF.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.experts.w2_EHD.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert moe.experts.b1_EF.abs().sum() == 0


@pytest.mark.parametrize('field,value', [
    ('top_k', 5), ('top_k', 0), ('n_embd', 15), ('activation', 'softplus'),
    ('capacity_factor', -1.0), ('eval_capacity_factor', -0.5), ('expert_impl', 'cuda'),
    ('n_experts', 0), ('moe_dropout', 1.5),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


@pytest.mark.parametrize('impl', ['grouped', 'loop'])
def test_bf16_autocast_cpu_trains(impl):
    if impl == 'grouped' and not HAS_GROUPED_MM:
        pytest.skip('no grouped_mm in this torch')
    torch.manual_seed(0)
    model = MoEGPT(tiny_config(expert_impl=impl, bias=False, activation='swiglu'))
    idx = torch.randint(0, 37, (2, 16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, loss, stats = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    fp32_loss = model(idx, idx)[1]
    assert abs(loss.item() - fp32_loss.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('impl', ['grouped', 'loop'])
def test_experts_cast_once_is_a_cast_per_micro_step_done_once(impl):
    """MoEGPT.train_step(cast_dtype) (train.py: around an optimizer step's micro-steps): three bf16
    micro-steps give bitwise the losses and accumulated fp32 gradients of a cast at every forward, with
    one cast of each expert weight in all instead of one per micro-step (counted at the dispatcher)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(0)
    model = MoEGPT(tiny_config(bias=False, n_experts=4, top_k=2, expert_impl=impl))
    weights = {w.data_ptr() for moe in model.moe_layers() for w in (moe.experts.w1_EDF, moe.experts.w2_EHD)}
    idx = torch.randint(0, 37, (3, 2, 8))

    class CountCasts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                CountCasts.n += 1
            return func(*args, **(kwargs or {}))

    def step(cast_dtype):
        model.zero_grad(set_to_none=True)
        CountCasts.n, losses = 0, []
        with CountCasts(), model.train_step(cast_dtype):
            for x in idx:
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    _, loss, _ = model(x, x, return_logits=False)
                (loss / 3).backward()
                losses.append(loss.detach())
        return CountCasts.n, losses, [p.grad.clone() for p in model.parameters()]

    n_each, losses_each, grads_each = step(None)
    n_once, losses_once, grads_once = step(torch.bfloat16)
    assert (n_each, n_once) == (3 * len(weights), len(weights))
    assert all(torch.equal(a, b) for a, b in zip(losses_each, losses_once))
    assert all(torch.equal(a, b) for a, b in zip(grads_each, grads_once))
    assert all(moe.experts.cast_cache is None for moe in model.moe_layers())  # nothing kept after


@pytest.mark.parametrize('capacity_factor', [0.0, 1.0])
def test_train_step_without_statistics_computes_the_same_and_no_entropy(capacity_factor):
    """MoEGPT.train_step(statistics=False) (train.py: the steps that do not log): the same loss, gradients
    and counts bitwise, no dropped fraction or router entropy in stats, and their kernels not run (no
    entr dispatched); on exit they are back."""
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(0)
    model = MoEGPT(tiny_config(n_experts=4, top_k=2, capacity_factor=capacity_factor))
    idx = torch.randint(0, 37, (2, 8))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    def step(statistics):
        model.zero_grad(set_to_none=True)
        with model.train_step(statistics=statistics), Ops() as ops:
            ops.seen = set()
            _, loss, stats = model(idx, idx)
            loss.backward()
        return loss, stats, [p.grad for p in model.parameters()], ops.seen

    loss_on, stats_on, grads_on, ops_on = step(True)
    loss_off, stats_off, grads_off, ops_off = step(False)
    assert torch.equal(loss_on, loss_off) and all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))
    assert torch.equal(stats_on['expert_counts'], stats_off['expert_counts'])
    assert {'drop_frac', 'router_entropy'} <= set(stats_on) and not {'drop_frac', 'router_entropy'} & set(stats_off)
    assert 'aten.special_entr' in ops_on and 'aten.special_entr' not in ops_off
    assert 'router_entropy' in model(idx, idx)[2]  # back on after the step


def test_metrics_average_entropy_and_drops_over_the_steps_that_brought_them():
    """Two micro-steps, one with statistics and one without: ce is the mean of both, the entropy and
    drop those of the one step (not halved), the load the sum of both."""
    from metrics import MoEMetrics
    m = MoEMetrics([0], 2, 'cpu')
    acc = m.new_acc()
    base = dict(ce=torch.tensor(1.0), loss=torch.tensor(1.0), losses={}, expert_counts=torch.tensor([[3.0, 1.0]]))
    m.add(acc, {**base, 'drop_frac': torch.tensor([0.25]), 'router_entropy': torch.tensor([0.5])})
    m.add(acc, {**base, 'ce': torch.tensor(3.0)})
    s = m.reduce(acc)
    assert s['ce'] == 2.0 and s['layers'][0]['router_entropy'] == 0.5 and s['layers'][0]['drop_frac'] == 0.25
    assert s['layers'][0]['routed'] == 8 and s['layers'][0]['frac'] == [0.75, 0.25]


def test_generate_and_a_few_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = MoEGPT(tiny_config(n_experts=4, top_k=2))
    opt = optim.configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cpu')
    idx = torch.randint(0, 37, (4, 16))
    first = None
    for _ in range(30):
        _, loss, stats = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else stats['ce'].item()
    assert stats['ce'].item() < first - 1.0
    out = model.generate(idx[:1, :3], 20)
    assert out.shape == (1, 23) and torch.equal(out[:, :3], idx[:1, :3])
    assert out.max() < 37


def test_optimizer_groups_decay_weights_not_biases():
    """nanoGPT's rule, for stacked experts too: (E, F) expert biases are biases (no decay)."""
    model = MoEGPT(tiny_config(bias=True))
    opt = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu')
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    no_decay = {names[id(p)] for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert 'transformer.h.0.mlp.experts.w1_EDF' in decay and 'transformer.h.0.mlp.experts.b1_EF' in no_decay
    assert 'transformer.h.0.mlp.experts.b2_ED' in no_decay and 'transformer.h.0.ln_1.weight' in no_decay
    assert all(n.endswith('weight') or n.endswith(('w1_EDF', 'w2_EHD')) for n in decay)
    assert len(decay) + len(no_decay) == len(names)


@pytest.mark.parametrize('n_experts', [1, 4])
def test_compiled_model_trains_like_eager(n_experts):
    """torch.compile (inductor, what train.py uses on GPUs) gives the eager loss and gradients, dense
    model included: `ce + 0 * aux` with ce.detach() in the stats once came back non-differentiable."""
    cfg = tiny_config(n_experts=n_experts, top_k=min(2, n_experts), expert_hidden=64 if n_experts == 1 else 24)
    idx = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MoEGPT(cfg)
        step = torch.compile(model) if compiled else model
        _, loss, stats = step(idx, idx.roll(-1, 1))
        assert loss.requires_grad, 'compiled loss lost its graph'
        loss.backward()
        results.append((loss.detach(), stats['ce'], {n: p.grad for n, p in model.named_parameters()}))
    (l0, ce0, g0), (l1, ce1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-5) and torch.allclose(ce0, ce1, atol=1e-5)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.filterwarnings('ignore:router=softmax')
@pytest.mark.parametrize('name', ['moe_top2', 'switch_cf', 'sigmoid'])
def test_checkpoints_of_the_previous_model_py_load_and_compute_the_same(name):
    """tests/data/old_checkpoints.pt was written by model.py before the routing redesign (commit
    a06ed8d): its model_args (capacity_priority='choice' and norm_topk_prob=True, the old defaults,
    written out) build the same model, its state_dict loads strictly, and the logits and loss are the
    old code's."""
    old = torch.load(os.path.join(os.path.dirname(__file__), 'data', 'old_checkpoints.pt'))[name]
    model = MoEGPT(MoEGPTConfig(**old['model_args'])).eval()
    model.load_state_dict(old['model'])
    logits, loss, _ = model(old['idx'], old['idx'])
    assert torch.allclose(logits, old['logits'], atol=1e-6, rtol=0)
    assert loss.item() == pytest.approx(old['loss'].item(), abs=1e-6)

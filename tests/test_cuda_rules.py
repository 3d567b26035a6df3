"""CUDA's rules, enforced on a CPU, so CPU CI fails the way a GPU would.

- `cuda_grouped_mm`: F.grouped_mm as CUDA runs it. Its output (and, since backward is grouped_mm
  again, its input gradient) is allocated uninitialised and only rows < offs[-1] are written: here the
  other rows come back as NaN, every time (CPU's kernel leaves whatever memory held, often zeros).
  Row strides must be multiples of 16 bytes and 16-byte aligned, offs int32, both operands one dtype.
- Compile: torch.compile(backend='aot_eager') runs the real meta functions (grouped_mm's accepts
  bf16 only), for every (dtype, expert_impl, capacity) train.py can select on a GPU.
- Optimizers: foreach AdamW over FSDP / EP / FSDP+EP runs in tests/test_parallel.py.
"""
import pytest
import torch
import torch.nn.functional as F

from model import (HAS_GROUPED_MM, MoEGPT, MoEGPTConfig, MoELayer, ROUTERS, GroupedExperts,  # noqa: E402
                   use_grouped_mm)

pytestmark = pytest.mark.skipif(not HAS_GROUPED_MM, reason='torch.nn.functional.grouped_mm needs torch >= 2.8')


def check_cuda_layout(name, t):
    """CUDA grouped_mm: one of the last two strides is 1, the other a multiple of 16 bytes; the data
    pointer 16-byte aligned."""
    s, b = t.stride(), t.element_size()
    ok = (s[-1] == 1 and (s[-2] * b) % 16 == 0) or (s[-2] == 1 and (s[-1] * b) % 16 == 0)
    if not ok or t.data_ptr() % 16:
        raise RuntimeError(f'{name}: strides should be multiple of 16 bytes (strides {s}, {t.dtype})')


def segments(offs):
    starts = [0] + offs.tolist()[:-1]
    return list(zip(starts, offs.tolist()))


class _CudaGroupedMM(torch.autograd.Function):
    """2-D rows x 3-D experts with offs, as the model calls it. Output rows >= offs[-1]: NaN."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        return _cuda_forward(a, b, offs)

    @staticmethod
    def backward(ctx, g):
        a, b, offs = ctx.saved_tensors
        grad_a = _cuda_forward(g.contiguous(), b.transpose(-2, -1), offs)  # grouped_mm again: NaN tail
        grad_b = torch.zeros_like(b)  # an expert with no rows gets a zero gradient
        for e, (lo, hi) in enumerate(segments(offs)):
            grad_b[e] = a[lo:hi].t() @ g[lo:hi]
        return grad_a, grad_b, None


def _cuda_forward(a, b, offs):
    check_cuda_layout('mat_a', a)
    check_cuda_layout('mat_b', b)
    if a.dtype != b.dtype or a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise RuntimeError(f'grouped_mm: unsupported dtypes {a.dtype}, {b.dtype}')
    if offs.dtype != torch.int32:
        raise RuntimeError('grouped_mm: offs must be int32')
    out = torch.full((a.shape[0], b.shape[-1]), float('nan'), dtype=a.dtype)
    for e, (lo, hi) in enumerate(segments(offs)):
        out[lo:hi] = a[lo:hi] @ b[e]
    return out


def emulated_grouped_mm(mat_a, mat_b, *, offs=None, bias=None, out_dtype=None):
    assert offs is not None and bias is None and out_dtype is None
    return _CudaGroupedMM.apply(mat_a, mat_b, offs)


@pytest.fixture
def cuda_grouped_mm(monkeypatch):
    monkeypatch.setattr(F, 'grouped_mm', emulated_grouped_mm)


def test_emulator_has_cudas_nan_tail_and_stride_rule(cuda_grouped_mm):
    a, b = torch.randn(10, 8), torch.randn(2, 8, 4)
    y = F.grouped_mm(a, b, offs=torch.tensor([3, 7], dtype=torch.int32))
    assert torch.isnan(y[7:]).all() and torch.equal(y[3:7], a[3:7] @ b[1])
    with pytest.raises(RuntimeError, match='16 bytes'):
        F.grouped_mm(torch.randn(10, 6), torch.randn(2, 6, 4), offs=torch.tensor([3, 7], dtype=torch.int32))


def make_layer(seed=0, **kw):
    cfg = dict(n_embd=16, n_head=2, n_experts=6, top_k=2, expert_hidden=24, bias=True, dropout=0.0,
               block_size=32, vocab_size=32)
    cfg.update(kw)
    torch.manual_seed(seed)
    layer = MoELayer(MoEGPTConfig(**cfg))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def run_layer(layer, impl, x, g, seed=0):
    layer.experts.expert_impl = impl
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # noisy_topk draws its noise in training
    out, aux = layer(x)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, aux


# capacity only where the router reads it (soft declares none: MoEGPTConfig refuses a capacity_factor there)
ROUTER_CAPACITY = [(r, cf) for r in ROUTERS for cf in (0.0, 0.75)
                   if not cf or ROUTERS[r].capacity or ROUTERS[r].reads_capacity_factor]


@pytest.mark.parametrize('router,capacity_factor', ROUTER_CAPACITY)
@pytest.mark.parametrize('bias,activation', [(True, 'gelu'), (False, 'swiglu')])
def test_grouped_under_cuda_rules_equals_loop(cuda_grouped_mm, router, capacity_factor, bias, activation):
    """Every router, dropless and capacity (with real drops), bias on and off: grouped_mm under CUDA's
    uninitialised-rows rule gives the loop's outputs and gradients, all finite; dropped rows add 0."""
    layer = make_layer(router=router, capacity_factor=capacity_factor, bias=bias, activation=activation)
    layer.train()
    x, g = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    ref = run_layer(layer, 'loop', x, g)
    got = run_layer(layer, 'grouped', x, g)
    if capacity_factor and router in ('softmax', 'noisy_topk', 'sigmoid'):
        assert got[3]['drop_frac'].item() > 0.05, 'the test needs real drops'
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    assert got[2].keys() == ref[2].keys()
    for n in ref[2]:
        assert torch.isfinite(got[2][n]).all(), f'{n}: non-finite gradient'
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-5, msg=n)


def test_model_capacity_training_step_finite_under_cuda_rules(cuda_grouped_mm):
    """A whole MoEGPT step in capacity mode (drops in every layer) through CUDA's grouped_mm."""
    cfg = MoEGPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32, n_experts=4, top_k=2,
                       capacity_factor=0.5, bias=True, expert_impl='grouped', router_init_std=0.5)
    torch.manual_seed(0)
    model = MoEGPT(cfg)
    idx = torch.randint(32, (4, 16))
    _, loss, stats = model(idx, idx)
    loss.backward()
    assert stats['drop_frac'].min().item() > 0.1
    assert torch.isfinite(loss)
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad


def offsets(counts_E):
    """(E+1,) int32: each expert's first row, then the end, as MoELayer hands them to the experts."""
    return F.pad(counts_E.cumsum(0), (1, 0)).int()


def test_expert_bias_grads_accumulate_like_a_dense_linear_under_bf16():
    """~N/E rows per expert summed into one bias gradient. A dense Linear under bf16 autocast sums its
    rows with fp32 accumulation and rounds to bf16 (0.23% here; one rounding is up to 2^-9 = 0.2%); the
    experts must be of that order (summed in bf16, as by CUDA's atomic adds, the sum loses 7-50%). The
    gradient reaching y_ND is exactly representable in bf16, so its float64 sum is the exact answer."""
    cfg = MoEGPTConfig(n_embd=16, n_head=2, n_experts=2, top_k=1, expert_hidden=16, bias=True,
                       expert_impl='grouped', block_size=8, vocab_size=8)
    ex = GroupedExperts(cfg)
    N = 4096
    counts = torch.tensor([N // 2, N // 2])
    ids = torch.arange(2).repeat_interleave(N // 2)
    x = torch.randn(N, 16)
    g = (torch.rand(N, 16) + 1.0).to(torch.bfloat16)  # positive: the errors can't cancel
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = ex(x, offsets(counts), ids)
    assert y.dtype == torch.bfloat16
    y.backward(g)
    ref = torch.zeros(2, 16, dtype=torch.float64).index_add_(0, ids, g.double())
    rel = ((ex.b2_ED.grad.double() - ref).abs() / ref).max().item()
    assert ex.b2_ED.grad.dtype == torch.float32

    dense = torch.nn.Linear(16, 16)  # the standard: the same rows through a dense Linear
    with torch.autocast('cpu', dtype=torch.bfloat16):
        dense(x[:N // 2]).backward(g[:N // 2])
    rel_dense = ((dense.bias.grad.double() - ref[0]).abs() / ref[0]).max().item()
    assert rel <= max(2 * rel_dense, 2 ** -8), \
        f'expert bias gradient off by {rel:.2%} (a dense Linear: {rel_dense:.2%})'


class _Sm100GroupedMM(_CudaGroupedMM):
    """pytorch/pytorch#172439 as reported on B200: an expert with no rows gets a non-zero weight gradient."""

    @staticmethod
    def backward(ctx, g):
        grad_a, grad_b, _ = _CudaGroupedMM.backward(ctx, g)
        counts = torch.diff(ctx.saved_tensors[2], prepend=ctx.saved_tensors[2].new_zeros(1))
        grad_b[counts == 0] = 7.0
        return grad_a, grad_b, None


@pytest.mark.parametrize('guard', [False, True])
def test_experts_with_no_rows_get_zero_weight_gradients_where_grouped_mm_is_unreliable(monkeypatch, guard):
    """With sm100's reported bug emulated, the guard (on where kernels.empty_expert_grads_unreliable
    says so) zeroes the weight gradient of every expert that got no rows; the others equal the loop's.
    Without the guard the emulated garbage shows: the test sees the bug it guards against."""
    import kernels
    monkeypatch.setattr(F, 'grouped_mm', lambda a, b, *, offs=None: _Sm100GroupedMM.apply(a, b, offs))
    monkeypatch.setattr(kernels, 'empty_expert_grads_unreliable', lambda device: guard)
    cfg = MoEGPTConfig(n_embd=16, n_head=2, n_experts=4, top_k=1, expert_hidden=16, bias=False,
                       expert_impl='grouped', block_size=8, vocab_size=8)
    counts, x, g = torch.tensor([3, 0, 5, 0]), torch.randn(8, 16), torch.randn(8, 16)
    ids = torch.arange(4).repeat_interleave(counts)
    grads = {}
    for impl in ('grouped', 'loop'):
        torch.manual_seed(0)
        ex = GroupedExperts(cfg)
        ex.expert_impl = impl
        ex(x, offsets(counts), ids).backward(g)
        grads[impl] = (ex.w1_EDF.grad, ex.w2_EHD.grad)
    for got, ref in zip(grads['grouped'], grads['loop']):
        assert torch.equal(ref[[1, 3]], torch.zeros_like(ref[[1, 3]]))
        if guard:
            torch.testing.assert_close(got, ref)
        else:
            assert (got[[1, 3]] == 7.0).all()


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize('field,kw', [('n_embd', dict(n_embd=20, n_head=2)), ('expert_hidden', dict(expert_hidden=20))])
def test_grouped_needs_16_byte_rows_clear_config_error(field, kw):
    cfg = dict(n_embd=16, n_head=2, n_experts=4, top_k=2, expert_impl='grouped')
    cfg.update(kw)
    with pytest.raises(ValueError, match=rf'MoEGPTConfig\.{field}=20 must be a multiple of 8'):
        MoEGPTConfig(**cfg)
    # 'auto' is accepted and takes the loop where grouped_mm's strides would be misaligned
    cfg['expert_impl'] = 'auto'
    layer = MoELayer(MoEGPTConfig(**cfg))
    assert not layer.experts.aligned
    assert not use_grouped_mm('auto', 'cuda', torch.bfloat16, layer.experts.aligned)


def test_misaligned_rows_fail_like_cuda(cuda_grouped_mm):
    """What the config check prevents: n_embd=20 in bf16 is 40-byte rows."""
    ex = GroupedExperts(MoEGPTConfig(n_embd=20, n_head=2, n_experts=2, top_k=1, expert_hidden=16))
    ex.expert_impl = 'grouped'
    with torch.autocast('cpu', dtype=torch.bfloat16), pytest.raises(RuntimeError, match='16 bytes'):
        ex(torch.randn(8, 20), torch.tensor([4, 4]), torch.tensor([0] * 4 + [1] * 4))


# ----------------------------------------------------------------------------- compile

def test_auto_picks_grouped_only_where_it_compiles():
    assert use_grouped_mm('auto', 'cuda', torch.bfloat16)
    assert not use_grouped_mm('auto', 'cuda', torch.float16)  # pre-Ampere GPUs: fp16 + GradScaler
    assert not use_grouped_mm('auto', 'cuda', torch.float32)
    assert not use_grouped_mm('auto', 'cpu', torch.bfloat16)  # CPU: the loop measured faster
    assert not use_grouped_mm('auto', 'cuda', torch.bfloat16, aligned=False)
    assert use_grouped_mm('grouped', 'cpu', torch.float32) and not use_grouped_mm('loop', 'cuda', torch.bfloat16)


# (dtype, expert_impl, capacity): every choice train.py can compile on a GPU; 'auto' resolved as on CUDA.
# Forced 'grouped' in fp16/fp32 runs grouped_mm outside the graph (kernels.grouped_mm_eager).
COMPILE_CASES = [(dt, impl, cf) for dt in ('bfloat16', 'float16', 'float32') for impl in ('auto', 'grouped', 'loop')
                 for cf in (0.0, 1.25)]


@pytest.mark.parametrize('dtype,impl,capacity_factor', COMPILE_CASES)
def test_compiles_for_every_dtype_train_py_allows(dtype, impl, capacity_factor):
    """aot_eager traces with the real meta functions (grouped_mm's rejects fp32/fp16), then runs the
    traced graph eagerly: forward + backward equal to eager."""
    dt = getattr(torch, dtype)
    resolved = 'grouped' if use_grouped_mm(impl, 'cuda', dt) else 'loop'
    layer = make_layer(capacity_factor=capacity_factor, bias=True)
    x, g = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    torch._dynamo.reset()
    ctx = torch.autocast('cpu', dtype=dt, enabled=dt != torch.float32)

    def fwd_bwd(fn):
        layer.experts.expert_impl = resolved
        layer.zero_grad(set_to_none=True)
        with ctx:
            out, _ = fn(x)
        (out.float() * g).sum().backward()
        return out.float().detach(), layer.experts.w1_EDF.grad.clone(), layer.experts.b1_EF.grad.clone()

    ref = fwd_bwd(layer)
    got = fwd_bwd(torch.compile(layer, backend='aot_eager'))
    tol = 1e-5 if dt == torch.float32 else 2e-2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize('capacity_factor', [0.0, 1.25])
def test_inductor_compiles_the_gpu_graph(capacity_factor):
    """The graph a GPU compiles (grouped_mm in bf16 autocast, ExpertBias adds, SortRows / UnsortRows
    both ways), lowered by inductor itself rather than aot_eager, on the CPU kernels: equal to eager."""
    layer = make_layer(capacity_factor=capacity_factor, bias=True)
    layer.experts.expert_impl = 'grouped'
    x, g = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    torch._dynamo.reset()

    def fwd_bwd(fn):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out, _ = fn(xg)
        (out.float() * g).sum().backward()
        return [out.float().detach(), xg.grad] + [p.grad.clone() for p in layer.parameters()]

    ref = fwd_bwd(layer)
    got = fwd_bwd(torch.compile(layer))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.slow  # the long job: an inductor compile of a whole model, twice
def test_inductor_compiled_model_casts_experts_once_like_each_micro_step():
    """MoEGPT.train_step(cast_dtype) under torch.compile (inductor, bf16 autocast, grouped_mm): two
    micro-steps give bitwise the losses and gradients of the compiled model casting at each one (the tied
    embedding's to fp32 rounding: inductor fuses its two contributions in either order)."""
    torch.manual_seed(0)
    model = MoEGPT(MoEGPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=37, n_experts=4,
                                top_k=2, expert_impl='grouped', dropout=0.0, bias=True))
    idx = torch.randint(0, 37, (2, 2, 16))
    compiled = torch.compile(model)
    torch._dynamo.reset()

    def step(cast_dtype):
        model.zero_grad(set_to_none=True)
        losses = []
        with model.train_step(cast_dtype):
            for x in idx:
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    _, loss, _ = compiled(x, x, return_logits=False)
                (loss / 2).backward()
                losses.append(('loss', loss.detach()))
        return losses + [(n, p.grad.clone()) for n, p in model.named_parameters()]

    for (name, a), (_, b) in zip(step(None), step(torch.bfloat16)):
        if name == 'transformer.wte.weight':  # tied with the LM head: inductor sums its two parts in either order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), name


@pytest.mark.slow  # the long job: inductor compiles of a whole model
def test_compiled_model_keeps_one_graph_per_statistics_setting():
    """train.py switches MoEGPT.train_step(statistics=) between its log and other iterations: under
    torch.compile that is a guard, so each setting compiles once and then the two graphs are reused
    (docs/performance.md). Counted as dynamo's compiles over an alternating run."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = MoEGPT(MoEGPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=37, n_experts=4,
                                top_k=2, expert_impl='grouped', dropout=0.0, bias=True))
    x = torch.randint(0, 37, (2, 16))
    compiled = torch.compile(model, fullgraph=True)  # (a graph break would also make more graphs)
    torch._dynamo.reset()
    counters.clear()
    graphs, keys = [], []
    for statistics in (True, False, False, True, False, True):
        with model.train_step(statistics=statistics), torch.autocast('cpu', dtype=torch.bfloat16):
            _, loss, stats = compiled(x, x, return_logits=False)
        loss.backward()
        graphs.append(counters['stats']['unique_graphs'])
        keys.append('router_entropy' in stats)
    assert keys == [True, False, False, True, False, True]
    assert graphs == [1] + [2] * 5  # one graph per setting, each compiled once

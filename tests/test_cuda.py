"""The GPU path on a real GPU: `python -m pytest -q tests` on a CUDA machine runs these. On a machine
without CUDA they are reported as skipped ("not applicable") and nothing else: every rule they check
also has a CPU-side test (tests/test_cuda_rules.py emulates CUDA's grouped_mm, compiles with the real
meta functions, and runs foreach AdamW over FSDP/EP)."""
import math

import pytest
import torch

import optim
from model import HAS_GROUPED_MM, MoEGPT, MoEGPTConfig, MoELayer, use_grouped_mm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='not applicable: no CUDA device')
DEV = 'cuda'


def small_config(**kw):
    cfg = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=128, dropout=0.0, bias=False,
               n_experts=8, top_k=2)
    cfg.update(kw)
    return MoEGPTConfig(**cfg)


def batch(seed, B=8, S=64, V=128):
    """A learnable sequence task: the next token is (token * 3 + 1) mod V."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(V, (B, S), generator=g)
    return x.to(DEV), ((x * 3 + 1) % V).to(DEV)


def bf16_ctx():
    return torch.autocast('cuda', dtype=torch.bfloat16)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason='grouped_mm needs torch >= 2.8')
def test_auto_takes_grouped_mm_in_bf16():
    layer = MoELayer(small_config()).to(DEV)
    assert use_grouped_mm('auto', 'cuda', torch.bfloat16, layer.experts.aligned)


@pytest.mark.parametrize('capacity_factor', [0.0, 1.0])
def test_compiled_bf16_training_with_capacity_learns_no_nan(capacity_factor):
    torch.manual_seed(0)
    model = MoEGPT(small_config(capacity_factor=capacity_factor)).to(DEV)
    opt = optim.configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cuda')
    step = torch.compile(model)
    losses, drops = [], []
    for it in range(40):
        x, y = batch(it)
        with bf16_ctx():
            _, loss, stats = step(x, y)
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f'iter {it}: non-finite gradients in {bad[:4]}'
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        drops.append(stats['drop_frac'].mean().item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    if capacity_factor:
        assert max(drops) > 0, 'capacity 1.0 should drop something at some point'
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize('capacity_factor', [0.0, 1.0])
@pytest.mark.parametrize('bias', [False, True])
def test_grouped_equals_loop_in_bf16(capacity_factor, bias):
    torch.manual_seed(0)
    layer = MoELayer(small_config(capacity_factor=capacity_factor, bias=bias)).to(DEV)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.05)
        layer.router.gate.weight.normal_(0, 0.5)
    x = torch.randn(4, 64, 128, device=DEV)
    g = torch.randn_like(x)
    res = {}
    for impl in ('loop', 'grouped'):
        layer.experts.expert_impl = impl
        layer.zero_grad(set_to_none=True)
        with bf16_ctx():
            out, _ = layer(x)
        (out.float() * g).sum().backward()
        res[impl] = [out.float()] + [p.grad.float() for p in layer.parameters()]
    for a, b in zip(res['grouped'], res['loop']):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_dropless_equals_capacity_when_nothing_is_dropped():
    torch.manual_seed(0)
    layer = MoELayer(small_config(capacity_factor=0.0)).to(DEV)
    x = torch.randn(4, 64, 128, device=DEV)
    with bf16_ctx():
        a, aux_a = layer(x)
        layer.router.capacity_factor = 100.0  # capacity above any load: the capacity path, nothing dropped
        b, aux_b = layer(x)
    assert aux_b['drop_frac'].item() == 0.0
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0)


def test_no_host_sync_in_a_training_step():
    """Dropless, grouped_mm, fused AdamW, global-norm clip: once warm, a step queues without
    waiting for the GPU (torch.cuda.set_sync_debug_mode('error') raises on any synchronising op)."""
    torch.manual_seed(0)
    model = MoEGPT(small_config()).to(DEV)
    opt = optim.configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cuda')
    x, y = batch(0)

    def step():
        with bf16_ctx():
            _, loss, stats = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), stats

    step()  # warm-up: lazy init, AdamW state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        loss, _ = step()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert torch.isfinite(loss).item()

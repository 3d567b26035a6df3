"""Gradient clipping without a pass over the gradients (issue 21): with fused AdamW, train.py takes the global
norm (one read pass), and the kernel applies the clip factor as its grad_scale (it divides each gradient by
grad_scale = 1 / clip factor as it reads it) instead of clip_grad_norm_ multiplying every gradient first.

The reference is the plain path: torch.nn.utils.clip_grad_norm_, then AdamW's step (with a GradScaler:
unscale_, clip_grad_norm_, scaler.step, scaler.update). Equality, on a tiny MoEGPT in fp32 on the CPU:
- a step whose norm is under grad_clip: bitwise (the factor is exactly 1, and x / 1 == x);
- a step whose norm is over it: the update and the moments within 1e-6 relative (a weight then within
  lr x 1e-6): g / (1 / c) and g * c round differently (up to an ulp of the gradient), and Adam carries that
  into the update. Each step starts from the reference's state, so this is one update's difference.
- a non-finite step (the NaN guard): skipped by both, weights, moments and step count untouched.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import optim  # noqa: E402
import parallel  # noqa: E402
from guard import Guard  # noqa: E402
from model import MoEGPT, MoEGPTConfig  # noqa: E402

CFG = dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_experts=4, top_k=2, dropout=0.0,
           bias=True)
# per step: (grad_clip, poisoned with NaN). Norms here are ~1-3: 100 never clips, 0.05 always does
STEPS = [(100.0, False), (0.05, False), (0.05, True), (100.0, False), (0.05, False)]


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(64, (4, 17), generator=g) for _ in STEPS]


def build():
    torch.manual_seed(0)
    model = MoEGPT(MoEGPTConfig(**CFG))
    opt = optim.configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), 'cpu')
    assert opt.defaults.get('fused'), 'fused AdamW on the CPU (torch >= 2.4): what this test is about'
    return model, opt


def loss_of(model, b, nan):
    _, loss, _ = model(b[:, :-1].contiguous(), b[:, 1:].contiguous())
    return loss * float('nan') if nan else loss


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def reference_step(model, opt, scaler, loss, clip):
    """train.py before: unscale_, clip_grad_norm_ (a pass multiplying every gradient), skip if not finite."""
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if torch.isfinite(loss) and (scaler.is_enabled() or torch.isfinite(norm)):
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm


def folded_step(model, opt, scaler, loss, clip, guard, it):
    """train.py now: the norm alone, the clip factor handed to the fused kernel by the guard."""
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    with Ops() as seen:
        norm, coef = parallel.finish_gradients(model, clip, sharded=False, fold=True)
    assert coef is not None and 'aten._foreach_mul_' not in seen.ops and 'aten.mul_' not in seen.ops, seen.ops
    guard.step(it, loss.detach(), norm, coef, opt, scaler)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm


def state(model, opt):
    s = {f'p.{k}': v.detach().clone() for k, v in model.named_parameters()}
    for i, st in enumerate(opt.state.values()):
        s.update({f'opt{i}.{k}': v.clone() for k, v in st.items()})
    return s


@pytest.mark.parametrize('float16_scaler', [False, True])
def test_folded_clip_equals_clip_grad_norm_then_step(float16_scaler, tmp_path):
    """float16_scaler: a GradScaler on (train.py's float16 path; its scaling works on fp32 here): unscale_
    stays, the clip still folds, the overflow step is skipped and backs the scale off in both runs."""
    ref_model, ref_opt = build()
    new_model, new_opt = build()
    ref_scaler, new_scaler = (torch.amp.GradScaler('cpu', enabled=float16_scaler, init_scale=2.0 ** 10)
                              for _ in range(2))
    guard = Guard(max_bad_steps=3, device='cpu', ddp=False, master=True, ckpt_path=str(tmp_path / 'ckpt.pt'))
    clipped_seen = unclipped_seen = 0
    for it, (b, (clip, nan)) in enumerate(zip(batches(), STEPS)):
        # each step from the reference's state: the claim is about one update (across steps Adam would
        # amplify a last-bit difference in a near-zero gradient: m / sqrt(v) normalises it to a full step)
        new_model.load_state_dict(ref_model.state_dict())
        new_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (loading would alias the moments)
        new_scaler.load_state_dict(ref_scaler.state_dict())
        before = state(new_model, new_opt)
        n_ref = reference_step(ref_model, ref_opt, ref_scaler, loss_of(ref_model, b, nan), clip)
        n_new = folded_step(new_model, new_opt, new_scaler, loss_of(new_model, b, nan), clip, guard, it)
        a, c = state(ref_model, ref_opt), state(new_model, new_opt)
        if nan:  # skipped by both: nothing moved
            assert all(torch.equal(before[k], c[k]) for k in c)
        clipped = not nan and n_new.item() > clip
        clipped_seen, unclipped_seen = clipped_seen + clipped, unclipped_seen + (not nan and not clipped)
        for k in a:  # bitwise unless this step clipped; then within 1e-6 relative (see the docstring)
            if clipped and k.startswith('p.'):  # the update, relative to its own size (lr = 1e-2)
                torch.testing.assert_close(c[k] - before[k], a[k] - before[k], rtol=1e-6, atol=1e-8)
            elif clipped:  # the moments (where m_prev and g cancel: 1e-6 of the tensor's largest element)
                torch.testing.assert_close(c[k], a[k], rtol=1e-6, atol=1e-6 * a[k].abs().max().item())
            else:
                assert torch.equal(a[k], c[k]), (it, k)
        assert torch.equal(n_ref, n_new) or (nan and n_ref.isnan() and n_new.isnan())
        assert ref_scaler.get_scale() == new_scaler.get_scale()
    assert clipped_seen == 2 and unclipped_seen == 2
    assert guard.settle() is False and guard.bad_since_log == 1  # the NaN step, counted when read


def test_without_the_fold_the_update_differs(tmp_path):
    """The comparison can fail: the same folded run with the clip factor dropped (grad_scale ignored) is
    far from the reference once a step clips."""
    ref_model, ref_opt = build()
    new_model, new_opt = build()
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    guard = Guard(max_bad_steps=3, device='cpu', ddp=False, master=True, ckpt_path=str(tmp_path / 'ckpt.pt'))
    for it, (b, (clip, nan)) in enumerate(zip(batches()[:2], STEPS[:2])):  # the second step clips
        reference_step(ref_model, ref_opt, scaler, loss_of(ref_model, b, nan), clip)
        loss = loss_of(new_model, b, nan)
        loss.backward()
        norm, _ = parallel.finish_gradients(new_model, clip, sharded=False, fold=True)
        guard.step(it, loss.detach(), norm, None, new_opt, scaler)  # the factor lost
        new_opt.zero_grad(set_to_none=True)
    diffs = [(p - q).abs().max().item() for p, q in zip(ref_model.parameters(), new_model.parameters())]
    assert max(diffs) > 1e-4


def test_no_fold_without_a_fused_optimizer_or_clip():
    """The plain clip where the optimizer is not fused (fold=False: the factor is applied here, as
    clip_grad_norm_ does, bitwise), and no factor at all with grad_clip=0 (the norm is still measured)."""
    for fold, clip in ((False, 0.05), (True, 0.0)):
        ref, new = build()[0], build()[0]
        b = batches()[0]
        for m in (ref, new):
            loss_of(m, b, False).backward()
        n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip if clip else float('inf'))
        n_new, coef = parallel.finish_gradients(new, clip, sharded=False, fold=fold)
        assert coef is None and torch.equal(n_ref, n_new)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ref.parameters(), new.parameters()))

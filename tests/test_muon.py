"""optimizer='muon' (issue 23): Muon on the hidden matrices and on each routed expert's matrix, AdamW on the
rest, in one optimizer (optim.MuonAdamW). The references are torch's own optimizers: torch.optim.Muon on
each expert's matrix as a separate 2-D parameter, torch.optim.AdamW, and the AdamW set-up of before the key.
End to end (train.py in a subprocess, tiny models, fp32 on the CPU): resume bitwise, DDP and expert
parallelism on gloo equal to the single process, bad keys refused in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoint  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
from guard import Guard  # noqa: E402
from model import MoEGPT, MoEGPTConfig  # noqa: E402


def muon_adamw(params, **kw):
    """A MuonAdamW whose params are all Muon's (the unit tests' set-up)."""
    return optim.MuonAdamW([dict(params=params, muon=True)], adjust_lr_fn='match_rms_adamw', **kw)


# ----------------------------------------------------------------------------- the update itself

@pytest.mark.parametrize('nesterov', [True, False])
def test_expert_update_equals_torch_muon_on_each_expert_matrix(nesterov):
    """A stacked (E, D, F) expert weight after 4 steps == torch.optim.Muon on its E matrices as separate 2-D
    parameters (float64 weights; Newton-Schulz in bf16 in both, torch's dtype, what ns_dtype='auto' takes on
    a GPU): momentum, Nesterov, decoupled
    weight decay, the lr adjustment of one (D, F) matrix (match_rms_adamw), lr_ratio. Bitwise. A 2-D matrix in
    the same group takes torch's step too."""
    g = torch.Generator().manual_seed(0)
    E, D, F = 4, 24, 40  # D < F and the (F, D) second weight: both orientations of the Newton-Schulz
    w1_EDF = torch.randn(E, D, F, generator=g, dtype=torch.float64).requires_grad_()
    w2_EFD = torch.randn(E, F, D, generator=g, dtype=torch.float64).requires_grad_()
    m_DD = torch.randn(D, D, generator=g, dtype=torch.float64).requires_grad_()
    ref = [w.detach()[e].clone().requires_grad_() for w in (w1_EDF, w2_EFD) for e in range(E)]
    ref.append(m_DD.detach().clone().requires_grad_())
    ours = optim.MuonAdamW([dict(params=[w1_EDF, w2_EFD, m_DD], muon=True, lr_ratio=2.0)], lr=0.01,
                           weight_decay=0.1, momentum=0.9, nesterov=nesterov, ns_dtype='bfloat16')
    theirs = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                              adjust_lr_fn='match_rms_adamw')
    start = [w.detach().clone() for w in (w1_EDF, w2_EFD)]
    for _ in range(4):
        grads = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in (w1_EDF, w2_EFD, m_DD)]
        for w, gr in zip((w1_EDF, w2_EFD, m_DD), grads):
            w.grad = gr.clone()
        for r, gr in zip(ref, [gr[e] for gr in grads[:2] for e in range(E)] + [grads[2]]):
            r.grad = gr.clone()
        ours.step()
        theirs.step()
    got = [w1_EDF.detach()[e] for e in range(E)] + [w2_EFD.detach()[e] for e in range(E)] + [m_DD.detach()]
    for a, b in zip(got, ref):
        assert torch.equal(a, b.detach())
    bufs = ours.state[w1_EDF]['momentum_buffer']
    assert all(torch.equal(bufs[e], theirs.state[ref[e]]['momentum_buffer']) for e in range(E))
    # it moved by Muon-sized steps: each expert's update has the RMS 0.2 x lr x 2 of match_rms_adamw (roughly:
    # the Newton-Schulz output's singular values are ~0.7-1.2, not exactly 1)
    step_rms = (w1_EDF.detach() - start[0] * (1 - 0.02 * 0.1) ** 4).pow(2).mean((1, 2)).sqrt() / 4
    assert ((0.5 * 0.2 * 0.02 < step_rms) & (step_rms < 1.5 * 0.2 * 0.02)).all(), step_rms


def test_orthogonalising_the_stack_as_one_matrix_would_differ():
    """The comparison above can fail: orthogonalising the (E x D, F) stack as one matrix (one norm, one
    Newton-Schulz, the lr of an (E x D, F) matrix) is far from the per-expert update."""
    from torch.optim._muon import _zeropower_via_newtonschulz as ns
    g = torch.Generator().manual_seed(1)
    G = torch.randn(4, 24, 40, generator=g, dtype=torch.float64)
    G[0] *= 10  # experts of different gradient scales: one norm for all would shrink the others' updates
    args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
    per_expert = optim.zeropower_via_newtonschulz_batched(G, *args).double()
    as_one = ns(G.reshape(-1, 40), *args).double().reshape(G.shape)
    assert (per_expert - as_one).abs().max() > 0.1
    # and each expert's matrix is near-orthogonal: singular values in Newton-Schulz's ~[0.5, 1.5] band
    s = torch.linalg.svdvals(per_expert)
    assert (s > 0.4).all() and (s < 1.6).all(), s


def test_float32_newton_schulz_per_matrix():
    """ns_dtype='float32' (the CPU's 'auto'): each matrix of a stack as if alone, within fp32 rounding (batched
    and single matmuls may sum in another order); the same iteration as torch's bf16 one, to bf16's precision;
    and near-orthogonal (singular values in Newton-Schulz's ~[0.5, 1.5] band)."""
    from torch.optim._muon import _zeropower_via_newtonschulz as ns
    g = torch.Generator().manual_seed(3)
    G = torch.randn(4, 24, 40, generator=g)
    G[1] *= 100
    args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
    stacked = optim.zeropower_via_newtonschulz_batched(G, *args, torch.float32)
    assert stacked.dtype == torch.float32
    for e in range(4):
        alone = optim.zeropower_via_newtonschulz_batched(G[e:e + 1], *args, torch.float32)[0]
        torch.testing.assert_close(stacked[e], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stacked[e], ns(G[e], *args).float(), rtol=0, atol=0.03)  # bf16's ulp at ~1
    s = torch.linalg.svdvals(stacked)
    assert (s > 0.4).all() and (s < 1.6).all(), s


def test_ns_dtype_auto_is_float32_on_the_cpu():
    """'auto' on the CPU: a 2-D matrix and an expert stack both take the fp32 Newton-Schulz (not torch's bf16)."""
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(s, generator=g).requires_grad_() for s in ((24, 40), (3, 24, 40))]
    opt = optim.MuonAdamW([dict(params=ws, muon=True)], lr=0.01, weight_decay=0.0, momentum=0.0, nesterov=False)
    grads = [torch.randn(w.shape, generator=g) for w in ws]
    start = [w.detach().clone() for w in ws]
    for w, gr in zip(ws, grads):
        w.grad = gr
    opt.step()
    adj = 0.01 * 0.2 * 40 ** 0.5  # match_rms_adamw for a (24, 40) matrix
    args = ((3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    torch.testing.assert_close(ws[0].detach(), start[0] - adj * optim.zeropower_via_newtonschulz_batched(
        grads[0][None], *args)[0])
    torch.testing.assert_close(ws[1].detach(), start[1] - adj * optim.zeropower_via_newtonschulz_batched(grads[1], *args))


def test_adamw_groups_step_like_torch_adamw():
    """MuonAdamW's AdamW groups == torch.optim.AdamW (non-fused), bitwise, state included (so a checkpoint's
    optimizer state reads as AdamW's for those parameters)."""
    g = torch.Generator().manual_seed(2)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in ((65, 32), (32,), (4, 32))]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    ours = optim.MuonAdamW([dict(params=ps[:2]), dict(params=ps[2:], weight_decay=0.0)], lr=3e-3,
                           weight_decay=0.1, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW([dict(params=qs[:2]), dict(params=qs[2:], weight_decay=0.0)], lr=3e-3,
                               weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert ours.state[p].keys() == theirs.state[q].keys() == {'step', 'exp_avg', 'exp_avg_sq'}
        assert all(torch.equal(ours.state[p][k], theirs.state[q][k]) for k in ours.state[p])


# ----------------------------------------------------------------------------- which tensor gets which optimizer

def named_groups(model, opt):
    name = {id(p): n for n, p in model.named_parameters()}
    return [{name[id(p)] for p in g['params']} for g in opt.param_groups]


def test_parameter_groups_by_name():
    """A model with everything: a dense first layer, shared experts with a gate, a noisy router (two E x D
    matrices), swiglu, untied lm_head, biases, QK-norm."""
    cfg = MoEGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, n_experts=4, top_k=2,
                       n_shared_experts=1, moe_first_dense=1, router='noisy_topk', shared_expert_gate=True,
                       activation='swiglu', norm='rmsnorm', position='rope', tie_embeddings=False, qk_norm='head',
                       qkv_bias=True, attn_out_bias=True, bias=True)
    model = MoEGPT(cfg)
    opt = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95), 'cpu', optimizer='muon', muon_lr=2e-3)
    muon, decay, no_decay = named_groups(model, opt)
    h0, h1 = 'transformer.h.0.', 'transformer.h.1.'
    assert muon == {h0 + 'attn.c_attn.weight', h0 + 'attn.c_proj.weight', h0 + 'mlp.c_fc.weight', h0 + 'mlp.c_proj.weight',
                    h1 + 'attn.c_attn.weight', h1 + 'attn.c_proj.weight', h1 + 'mlp.experts.w1_EDF',
                    h1 + 'mlp.experts.w2_EHD', h1 + 'mlp.shared_experts.c_fc.weight',
                    h1 + 'mlp.shared_experts.c_proj.weight'}
    assert decay == {'transformer.wte.weight', 'lm_head.weight', h1 + 'mlp.router.gate.weight',
                     h1 + 'mlp.router.noise.weight', h1 + 'mlp.shared_expert_gate.weight'}
    assert no_decay == {n for n, _ in model.named_parameters()} - muon - decay
    assert h1 + 'mlp.experts.b1_EF' in no_decay and 'transformer.ln_f.weight' in no_decay
    assert [(g['muon'], g['weight_decay'], g['lr_ratio']) for g in opt.param_groups] == \
        [(True, 0.1, 2.0), (False, 0.1, 1.0), (False, 0.0, 1.0)]
    assert opt.param_groups[0]['momentum'] == 0.95 and opt.param_groups[0]['adjust_lr_fn'] == 'match_rms_adamw'


def configure_optimizers_before_issue_23(model, weight_decay, learning_rate, betas, device_type, foreach=None):
    """optim.configure_optimizers as it was before the optimizer key, verbatim: the reference of 'adamw'."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # the experts' stacked biases are 2-D, and still biases
            decay = p.dim() >= 2 and not name.endswith(('.b1_EF', '.b2_ED'))
            groups.setdefault((decay, type(p).__name__ == 'DTensor'), []).append(p)
    optim_groups = [{'params': ps, 'weight_decay': weight_decay if decay else 0.0}
                    for (decay, _), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    extra = dict(fused=True) if optim.fused_adamw_supported(device_type) and not foreach else dict(foreach=foreach)
    return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra)


def test_default_adamw_is_the_adamw_of_before():
    """No optimizer key (and optimizer='adamw'): the same torch.optim.AdamW, groups and settings as before the
    key, and the same weights after 3 steps, bitwise."""
    cfg = MoEGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2, bias=True)
    models = []
    for make in (configure_optimizers_before_issue_23, optim.configure_optimizers,
                 lambda *a: optim.configure_optimizers(*a, optimizer='adamw')):
        torch.manual_seed(0)
        model = MoEGPT(cfg)
        opt = make(model, 0.1, 1e-2, (0.9, 0.95), 'cpu')
        assert type(opt) is torch.optim.AdamW
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            b = torch.randint(64, (4, 17), generator=g)
            model(b[:, :-1].contiguous(), b[:, 1:].contiguous())[1].backward()
            opt.step()
            opt.zero_grad()
        models.append((model, opt))
    (m0, o0), *rest = models
    for m, o in rest:
        assert named_groups(m, o) == named_groups(m0, o0)
        assert o.defaults == o0.defaults
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m0.parameters()))


# ----------------------------------------------------------------------------- the NaN guard

@pytest.mark.parametrize('float16_scaler', [False, True])
def test_non_finite_step_changes_no_weight_and_no_momentum(tmp_path, float16_scaler):
    """train.py's step path (unscale_, finish_gradients' clip, then Guard.step) with optimizer='muon': a NaN step
    leaves every weight, Muon momentum buffer and AdamW moment as it was; the steps around it move them.
    float16_scaler: train.py's float16 path, a GradScaler on (its scaling works on fp32 here): scale, unscale_,
    scaler.step on MuonAdamW, and the overflow backs the scale off."""
    torch.manual_seed(0)
    model = MoEGPT(MoEGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                                n_shared_experts=1, dropout=0.0))
    opt = optim.configure_optimizers(model, 0.1, 1e-2, (0.9, 0.95), 'cpu', optimizer='muon')
    assert not opt.defaults.get('fused')  # so finish_gradients clips the gradients itself (no fold)
    scaler = torch.amp.GradScaler('cpu', enabled=float16_scaler, init_scale=2.0 ** 10)
    guard = Guard(max_bad_steps=3, device='cpu', ddp=False, master=True, ckpt_path=str(tmp_path / 'ckpt.pt'))
    g = torch.Generator().manual_seed(0)

    def snapshot():
        s = {f'p.{n}': p.detach().clone() for n, p in model.named_parameters()}
        s.update({f'{i}.{k}': v.clone() for i, st in enumerate(opt.state.values()) for k, v in st.items()})
        return s

    for it, nan in enumerate([False, True, False]):
        before = snapshot()
        b = torch.randint(64, (4, 17), generator=g)
        loss = model(b[:, :-1].contiguous(), b[:, 1:].contiguous())[1] * (float('nan') if nan else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm, clip = parallel.finish_gradients(model, 0.5, sharded=False, fold=opt.defaults.get('fused'))
        assert clip is None
        guard.step(it, loss.detach(), norm, clip, opt, scaler)
        scale = scaler.get_scale()
        scaler.update()
        assert scaler.get_scale() == (scale / 2 if nan and float16_scaler else scale)
        opt.zero_grad(set_to_none=True)
        after = snapshot()
        if nan:
            assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in after)
        elif it > 0:  # a real step moves every weight that had a gradient, and every buffer
            moved = [k for k in after if not torch.equal(before[k], after[k])]
            assert {k for k in after if 'momentum_buffer' in k} <= set(moved)
            assert 'p.transformer.h.0.mlp.experts.w1_EDF' in moved and 'p.transformer.wte.weight' in moved
    assert any('momentum_buffer' in k for k in after)
    assert guard.bad_in_a_row == 0 and guard.take_bad_count() == 1


# ----------------------------------------------------------------------------- train.py end to end

TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--dropout=0.0', '--eval_iters=4', '--warmup_iters=0', '--log_interval=1',
        '--n_experts=4', '--top_k=2', '--optimizer=muon']


@pytest.fixture
def char_data(shakespeare_char_dir):
    return shakespeare_char_dir  # conftest's session-wide shakespeare_char, prepared once for the suite


def train(args, torchrun=0, timeout=300):
    cmd = [sys.executable, 'train.py', *map(str, args)]
    if torchrun:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}',
               *cmd[1:]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def ok(r):
    assert r.returncode == 0, f'exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}'
    return r


def losses(out_dir):
    return [r['loss'] for r in map(json.loads, (Path(out_dir) / 'log.jsonl').read_text().splitlines())
            if r['type'] == 'train']


def test_resume_is_bitwise(char_data, tmp_path):
    """Stop at iter 4, resume to 8 == straight to 8: losses, weights and the optimizer state (Muon's momentum
    buffers, AdamW's moments) bitwise. A dense first layer, a shared expert, and the sigmoid router, whose
    aux-free expert_bias keeps its own update (a buffer, in no optimizer)."""
    common = [*TINY, f'--data_dir={char_data}', '--eval_interval=4', '--lr_decay_iters=8', '--always_save_checkpoint=True',
              '--moe_first_dense=1', '--n_shared_experts=1', '--router=sigmoid', '--learning_rate=3e-3',
              '--muon_lr=6e-3', '--muon_momentum=0.9']
    a, b = tmp_path / 'a', tmp_path / 'b'
    ok(train([*common, f'--out_dir={a}', '--max_iters=8']))
    ok(train([*common, f'--out_dir={b}', '--max_iters=4']))
    r = ok(train([*common, f'--out_dir={b}', '--max_iters=8', '--init_from=resume']))
    assert 'at iter 4' in r.stdout
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 8 and la == lb and la[-1] < la[0]
    ca, cb = checkpoint.load(a / 'ckpt.pt'), checkpoint.load(b / 'ckpt.pt')
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k
    assert ca['model']['transformer.h.1.mlp.router.expert_bias'].abs().sum() > 0  # the aux-free bias moved
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert sa.keys() == sb.keys() and sum('momentum_buffer' in s for s in sa.values()) == 10
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert ca['optimizer']['param_groups'][0]['muon'] and ca['optimizer']['param_groups'][0]['lr_ratio'] == 2.0
    # resuming with the other optimizer: one clear line, exit 2
    r = train([*common, f'--out_dir={b}', '--max_iters=8', '--init_from=resume', '--optimizer=adamw',
               '--muon_lr=0.0', '--muon_momentum=0.95'])
    assert r.returncode == 2 and "was trained with optimizer='muon', not 'adamw'" in r.stderr, r.stderr


def test_expert_parallel_update_equals_single_process_bitwise(tmp_path):
    """tests/muon_ep_worker.py: given the same gradients, expert_parallel=2's update (each rank its own 2 of 4
    experts) equals the single process's, bitwise, on every parameter; the checkpoint's gathered optimizer
    state equals the single-process optimizer's state_dict."""
    out = tmp_path / 'out.json'
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'tests/muon_ep_worker.py', str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0 and out.is_file(), p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r['local_experts'] == [2] * 8  # w1, w2, b1, b2 of 2 MoE layers: 2 of 4 experts each
    assert r['equal'] and all(r['equal'].values()), r['equal']
    assert len(r['moved']) == len(r['equal'])  # every parameter took steps (equal is not 'both stood still')
    assert r['state_equal']


@pytest.mark.slow  # the long job: several multi-process runs
def test_expert_parallel_dcp_resume_is_bitwise(char_data, tmp_path):
    """expert_parallel=2 with its default checkpoint (ckpt_format auto: DCP, every rank its own shard): stop
    at iter 4, resume to 8 == straight to 8, bitwise: losses, weights, and Muon's momentum buffers and
    AdamW's moments, each rank having saved and reloaded its own experts' (a shard-local state DCP reshards
    like AdamW's)."""
    common = [*TINY, f'--data_dir={char_data}', '--eval_interval=4', '--lr_decay_iters=8', '--always_save_checkpoint=True',
              '--expert_parallel=2', '--learning_rate=3e-3', '--muon_lr=6e-3']
    a, b = tmp_path / 'a', tmp_path / 'b'
    ok(train([*common, f'--out_dir={a}', '--max_iters=8'], torchrun=2))
    ok(train([*common, f'--out_dir={b}', '--max_iters=4'], torchrun=2))
    r = ok(train([*common, f'--out_dir={b}', '--max_iters=8', '--init_from=resume'], torchrun=2))
    assert 'at iter 4' in r.stdout and (b / 'ckpt.dcp').is_symlink() and not (b / 'ckpt.pt').exists()
    la, lb = losses(a), losses(b)
    assert len(la) == 8 and la == lb and la[-1] < la[0]
    ca, cb = checkpoint.load(a / 'ckpt.dcp'), checkpoint.load(b / 'ckpt.dcp')
    assert all(torch.equal(ca['model'][k], cb['model'][k]) for k in ca['model'])
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert sa.keys() == sb.keys() and sum('momentum_buffer' in s for s in sa.values()) == 8  # per layer: c_attn, c_proj, w1, w2
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def movement_ratios(single, multi):
    """{name: |w_multi - w_single| / |w_single - w_init|} (Frobenius), w_init: train.py's seeded init."""
    cs, cm = checkpoint.load(single / 'ckpt.pt'), checkpoint.load(multi / 'ckpt.pt')
    torch.manual_seed(cs['config']['seed'])
    init = MoEGPT(MoEGPTConfig(**cs['model_args'])).state_dict()
    return {k: ((cm['model'][k] - cs['model'][k]).norm() / (cs['model'][k] - init[k]).norm()).item()
            for k in cs['model'] if k in init}


@pytest.mark.slow  # the long job: several multi-process runs
@pytest.mark.parametrize('ep', [1, 2])
def test_ddp_and_expert_parallel_train_like_single_process(char_data, tmp_path, ep):
    """train.py under torchrun, 2 processes (gloo), plain DDP and expert_parallel=2 == 1 process accumulating
    the same 8 rows: losses within 1e-5; the weights within 5% of how far they moved. Not bitwise: the ranks'
    gradients differ from the single process's in the last bits (reduction order, the all-to-all), and
    Muon's bf16 Newton-Schulz turns a last-bit difference in its input into a bf16-rounding one in its
    output (measured: <= 4% of the movement on Muon's matrices, <= 0.3% on AdamW's parameters). The update
    with the same gradients is bitwise equal: test_expert_parallel_update_equals_single_process_bitwise."""
    common = [*TINY, f'--data_dir={char_data}', '--max_iters=5', '--eval_interval=5', '--gradient_accumulation_steps=2',
              '--lr_decay_iters=5', '--learning_rate=3e-3', '--always_save_checkpoint=True', '--aux_loss_coef=0.0']
    single, multi = tmp_path / 'single', tmp_path / 'multi'
    ok(train([*common, f'--out_dir={single}']))
    ok(train([*common, f'--out_dir={multi}', f'--expert_parallel={ep}', '--ckpt_format=single'], torchrun=2))  # (EP: dcp by default)
    ls, lm = losses(single), losses(multi)
    assert ls[-1] < ls[0] - 0.05  # it trained (so equal losses mean equal updates)
    assert lm == pytest.approx(ls, rel=1e-5)
    ratios = movement_ratios(single, multi)
    assert len(ratios) == 18 and max(ratios.values()) < 0.05, ratios


@pytest.mark.parametrize('args, msg', [
    (['--optimizer=sgd'], "optimizer='sgd' must be one of ('adamw', 'muon')"),
    (['--optimizer=muon', '--muon_lr=-0.01'], 'muon_lr=-0.01 must be >= 0'),
    (['--optimizer=muon', '--muon_momentum=1.0'], 'muon_momentum=1.0 must be in [0, 1)'),
    (['--optimizer=muon', '--muon_lr=0.01', '--learning_rate=0'], 'muon_lr=0.01 with learning_rate=0'),
    (['--muon_lr=0.01'], "muon_lr=0.01 is Muon's: it needs optimizer='muon'"),
])
def test_bad_keys_fail_in_one_line(char_data, tmp_path, args, msg):
    r = train([*TINY[:-1], f'--data_dir={char_data}', f'--out_dir={tmp_path / "out"}', *args])
    assert r.returncode == 2 and r.stderr.startswith('train.py: error: ') and msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'out').exists()


def test_fsdp_is_refused_naming_what_runs(char_data, tmp_path):
    r = train([*TINY, f'--data_dir={char_data}', f'--out_dir={tmp_path / "out"}', '--fsdp=True', '--dry_run'],
              torchrun=2)
    assert r.returncode != 0 and "train.py: error: optimizer='muon' runs single-process, under DDP and with " \
                                 "expert_parallel, not with fsdp=True" in r.stderr, r.stderr
    assert 'exitcode  : 2' in r.stderr and not (tmp_path / 'out').exists()  # (torchrun's report of the ranks)


def test_bfloat16_autocast_trains(char_data, tmp_path):
    """bf16 autocast on the CPU, with gradient accumulation: Muon steps on fp32 weights from bf16-computed
    gradients, and the loss goes down."""
    out = tmp_path / 'out'
    ok(train([*TINY, f'--data_dir={char_data}', f'--out_dir={out}', '--dtype=bfloat16', '--max_iters=12',
              '--eval_interval=12', '--lr_decay_iters=12', '--learning_rate=3e-3', '--gradient_accumulation_steps=2']))
    ls = losses(out)
    assert len(ls) == 12 and ls[-1] < ls[0] - 0.1, ls


def test_compiled_model_trains_with_muon_like_eager(char_data, tmp_path):
    """--compile=True (inductor, on the CPU) compiles the model, not the optimizer: Muon steps the compiled
    model's parameters, and 3 iters give the eager run's losses to float tolerance (inductor fuses the
    same math in another order)."""
    common = [*TINY, f'--data_dir={char_data}', '--max_iters=3', '--eval_interval=3', '--lr_decay_iters=3',
              '--learning_rate=3e-3']
    ok(train([*common, f'--out_dir={tmp_path / "eager"}']))
    r = ok(train([*common, f'--out_dir={tmp_path / "compiled"}', '--compile=True']))
    assert 'compiling the model' in r.stdout, r.stdout[-2000:]
    le, lc = losses(tmp_path / 'eager'), losses(tmp_path / 'compiled')
    assert len(le) == 3 and le[-1] < le[0] and lc == pytest.approx(le, rel=1e-4, abs=1e-5)


def test_dry_run(char_data, tmp_path):
    r = ok(train([*TINY, f'--data_dir={char_data}', f'--out_dir={tmp_path / "out"}', '--dry_run']))
    assert "optimizer='muon'" in r.stdout and 'dry run: every check passed' in r.stdout

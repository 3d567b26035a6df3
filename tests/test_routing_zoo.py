"""Issue 7: every router / expert design against a float64 reference, in the one dispatch path."""
import json
import os
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import checkpoint
import optim
from model import MoEGPT, MoEGPTConfig, MoELayer, activation_fn, load_balancing_loss, sequence_balancing_loss


def layer_for(seed=0, dtype=torch.float64, **kw):
    args = dict(block_size=16, vocab_size=37, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True,
                n_experts=6, top_k=2, expert_hidden=24)
    args.update(kw)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        layer = MoELayer(MoEGPTConfig(**args)).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def expert(layer, e, x_D):
    ex = layer.experts
    h = activation_fn(ex.activation, x_D @ ex.w1_EDF[e] + ex.b1_EF[e])
    return h @ ex.w2_EHD[e] + ex.b2_ED[e]


def topk_by_sort(row, k):
    return sorted(range(len(row)), key=lambda e: -row[e].item())[:k]


def token_choice_reference(layer, x_TD, scores_TE, select_TE=None, normalise=True):
    """out_t = sum over the k experts with the highest select score of gate * expert(x_t), gates
    taken from scores (renormalised over the k if asked). A Python loop over tokens on purpose."""
    select_TE = scores_TE if select_TE is None else select_TE
    out = torch.zeros_like(x_TD)
    chosen = []
    for t in range(x_TD.shape[0]):
        ids = topk_by_sort(select_TE[t], layer.top_k)
        w = [scores_TE[t, e] for e in ids]
        if normalise:
            w = [v / sum(w) for v in w]
        out[t] = sum(wi * expert(layer, e, x_TD[t]) for wi, e in zip(w, ids))
        chosen.append(ids)
    return out, chosen


# ----------------------------------------------------------------------------- noisy top-k


def test_noisy_topk_equals_reference_with_its_noise_and_is_clean_in_eval():
    layer = layer_for(router='noisy_topk')
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    xt = x.view(-1, 16)
    r = layer.router
    # training: logits + N(0,1) * softplus(x W_noise); same RNG draw as the layer's
    torch.manual_seed(5)
    out, aux = layer.train()(x, return_intermediate=True)
    torch.manual_seed(5)
    noisy = xt @ r.gate.weight.T + torch.randn(18, 6, dtype=torch.float64) * F.softplus(xt @ r.noise.weight.T)
    ref, chosen = token_choice_reference(layer, xt, noisy.softmax(-1))
    assert torch.allclose(out.view(-1, 16), ref, atol=1e-10)
    assert aux['routing']['topk_ids'].view(-1, 2).tolist() == chosen
    # the noise scale is learned: it gets a gradient
    out.square().sum().backward()
    assert r.noise.weight.grad.abs().sum() > 0
    # eval: no noise, plain softmax top-k
    out, _ = layer.eval()(x)
    ref, _ = token_choice_reference(layer, xt, (xt @ r.gate.weight.T).softmax(-1))
    assert torch.allclose(out.view(-1, 16), ref, atol=1e-10)


# ----------------------------------------------------------------------------- sigmoid + bias


def test_sigmoid_router_selects_with_bias_but_gates_ignore_it():
    layer = layer_for(router='sigmoid', n_experts=5, top_k=2)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    xt = x.view(-1, 16)
    scores = torch.sigmoid(xt @ layer.router.gate.weight.T)
    for bias in (torch.zeros(5), torch.tensor([3.0, -3.0, 0.0, 0.5, -0.2])):
        layer.router.expert_bias.copy_(bias)
        out, aux = layer(x, return_intermediate=True)
        ref, chosen = token_choice_reference(layer, xt, scores, select_TE=scores + bias.double())
        assert aux['routing']['topk_ids'].view(-1, 2).tolist() == chosen
        assert torch.allclose(out.view(-1, 16), ref, atol=1e-10)
        # the gates are the selected experts' own scores, renormalised: the bias is nowhere in them
        gates = aux['routing']['topk_weights'].view(-1, 2)
        sel = scores.gather(1, torch.tensor(chosen))
        assert torch.allclose(gates, sel / sel.sum(-1, keepdim=True), atol=1e-12)
    assert [c[0] for c in chosen].count(0) > 6  # the +3 bias really moved selection to expert 0
    assert 'router.expert_bias' in layer.state_dict()
    assert 'router.expert_bias' not in dict(layer.named_parameters())


def test_sigmoid_bias_update_moves_load_toward_uniform():
    torch.manual_seed(0)
    cfg = MoEGPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=16, n_experts=4, top_k=1,
                       router='sigmoid', bias_update_rate=0.02, norm_topk_prob=True)
    model = MoEGPT(cfg)
    moe = model.moe_layers()[0]
    with torch.no_grad():  # a skewed router: expert 0 wins almost everywhere
        moe.router.gate.weight.copy_(torch.randn(4, 16) * 0.1)
        moe.router.gate.weight[0] += 0.5
    x = torch.randn(1, 256, 16) + 1.0
    gates_before = moe(x, return_intermediate=True)[1]['routing']
    imbalance = []
    for _ in range(60):
        _, aux = moe(x)
        counts = aux['expert_counts']
        imbalance.append((counts.max() / counts.mean()).item())
        model.update_expert_bias(counts.unsqueeze(0))
    assert imbalance[0] > 2.5 and imbalance[-1] < 1.5, imbalance[::10]
    assert moe.router.expert_bias[0] < 0 < moe.router.expert_bias[1:].max()
    # the bias moved selection only: for the same chosen experts, the gates are unchanged
    after = moe(x, return_intermediate=True)[1]['routing']
    scores = torch.sigmoid(x.view(-1, 16) @ moe.router.gate.weight.T)
    assert torch.allclose(after['topk_weights'].view(-1), torch.ones(256))  # top-1, renormalised
    moe.router.norm_topk_prob = False
    raw = moe(x, return_intermediate=True)[1]['routing']
    assert torch.allclose(raw['topk_weights'].view(-1, 1), scores.gather(1, raw['topk_ids'].view(-1, 1)))
    assert gates_before['topk_ids'].ne(after['topk_ids']).any()


# ----------------------------------------------------------------------------- expert choice


def test_expert_choice_every_expert_takes_exactly_C_tokens():
    layer = layer_for(router='expert_choice', n_experts=4, top_k=2, capacity_factor=1.5)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    xt = x.view(-1, 16)
    out, aux = layer(x, return_intermediate=True)
    C = 8  # ceil(1.5 * 20 / 4)
    probs = (xt @ layer.router.gate.weight.T).softmax(-1)
    tokens = aux['routing']['token_N'].view(4, -1)  # the rows, expert by expert: each expert's tokens
    assert tokens.shape == (4, C) and aux['expert_counts'].tolist() == [C] * 4
    ref = torch.zeros_like(xt)
    for e in range(4):
        ids = topk_by_sort(probs[:, e], C)
        assert sorted(tokens[e].tolist()) == sorted(ids)
        for t in ids:
            ref[t] += probs[t, e] * expert(layer, e, xt[t])
    assert torch.allclose(out.view(-1, 16), ref, atol=1e-10)
    picked = set(tokens.reshape(-1).tolist())
    assert aux['drop_frac'].item() == pytest.approx(1 - len(picked) / 20)
    assert set(aux['losses']) == {'z'}  # balanced by construction: no balance loss


def test_expert_choice_warns_and_generates_with_the_batch_rule():
    with pytest.warns(UserWarning, match='sees the future'):
        model = MoEGPT(MoEGPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=1, n_embd=16,
                                    n_experts=4, top_k=2, router='expert_choice')).eval()
    prompt = torch.randint(0, 11, (1, 3))
    out = model.generate(prompt, 6, temperature=0)  # the cache is turned off: the whole context each step
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    with pytest.raises(ValueError, match='expert-choice'):
        model.generate(prompt, 2, return_routing=True)


# ----------------------------------------------------------------------------- soft, shared, fine-grained


def test_soft_moe_equals_dense_mixture():
    layer = layer_for(router='soft', n_experts=4, top_k=1)
    assert layer.top_k == 4
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    xt = x.view(-1, 16)
    out, aux = layer(x)
    probs = (xt @ layer.router.gate.weight.T).softmax(-1)
    ref = torch.stack([sum(probs[t, e] * expert(layer, e, xt[t]) for e in range(4)) for t in range(10)])
    assert torch.allclose(out.view(-1, 16), ref, atol=1e-10)
    assert aux['expert_counts'].tolist() == [10.0] * 4


def test_shared_experts_always_contribute():
    layer = layer_for(n_shared_experts=2)
    assert layer.shared_experts.c_fc.out_features == 2 * 24
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    out, _ = layer(x)
    routed, _ = token_choice_reference(layer, x.view(-1, 16), (x.view(-1, 16) @ layer.router.gate.weight.T).softmax(-1))
    shared = layer.shared_experts(x).view(-1, 16)
    assert torch.allclose(out.view(-1, 16), routed + shared, atol=1e-10)
    assert (shared.abs().sum(-1) > 0).all()  # every token, whatever the router says


def test_fine_grained_keeps_active_parameters():
    base = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, bias=False)
    coarse = MoEGPT(MoEGPTConfig(n_experts=8, top_k=2, expert_hidden=4 * 32, **base)).get_num_params()
    m = 4
    fine = MoEGPT(MoEGPTConfig(n_experts=8 * m, top_k=2 * m, expert_hidden=4 * 32 // m, **base)).get_num_params()
    # expert parameters, total and active, are identical; only the router grows (E x n_embd per layer)
    router = lambda E: 2 * E * 32  # noqa: E731  (2 layers)
    assert fine.active - router(8 * m) == coarse.active - router(8)
    assert fine.total - router(8 * m) == coarse.total - router(8)
    dense = MoEGPT(MoEGPTConfig(n_experts=1, expert_hidden=2 * 4 * 32, **base)).get_num_params()
    assert dense.active == coarse.active - 2 * 8 * 32  # the router is the only extra active weight


# ----------------------------------------------------------------------------- balance-loss scope


def test_sequence_balance_loss_matches_per_sequence_reference():
    layer = layer_for(balance_scope='sequence', n_experts=4, top_k=2)
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    _, aux = layer(x, return_intermediate=True)
    r = aux['routing']
    cnt = lambda ids: torch.bincount(ids.reshape(-1), minlength=4)
    per_seq = [load_balancing_loss(r['router_probs'][b], cnt(r['topk_ids'][b])) for b in range(3)]
    assert aux['losses']['aux'].item() == pytest.approx(sum(per_seq).item() / 3, abs=1e-12)
    counts_BE = torch.stack([cnt(r['topk_ids'][b]) for b in range(3)])
    assert sequence_balancing_loss(r['router_probs'], counts_BE).item() == pytest.approx(aux['losses']['aux'].item())
    micro = load_balancing_loss(r['router_probs'].view(-1, 4), cnt(r['topk_ids']))
    assert abs(micro.item() - aux['losses']['aux'].item()) > 1e-6  # a different quantity


def _global_scope_worker(rank, port, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        layer = layer_for(balance_scope='global', n_experts=4, top_k=2)  # same weights on both ranks
        torch.manual_seed(100 + rank)
        x = torch.randn(1, 8, 16, dtype=torch.float64)
        _, aux = layer(x, return_intermediate=True)
        results[rank] = (aux['losses']['aux'].item(), aux['routing']['router_probs'].detach().view(-1, 4),
                         aux['routing']['topk_ids'].view(-1, 2))
        dist.barrier()  # no rank tears gloo down while another is still busy (it can abort at exit)
    finally:
        dist.destroy_process_group()


def test_global_balance_loss_uses_counts_from_all_ranks():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_global_scope_worker, args=(port, results), nprocs=2)
    ids_all = torch.cat([results[0][2], results[1][2]])
    counts = torch.bincount(ids_all.view(-1), minlength=4).double()
    for rank in (0, 1):
        loss, probs, ids = results[rank]
        expected = 4 * (counts / counts.sum() * probs.mean(0)).sum()  # global f, local P
        assert loss == pytest.approx(expected.item(), abs=1e-12)
        assert loss != pytest.approx(load_balancing_loss(probs, torch.bincount(ids.view(-1), minlength=4)).item(), abs=1e-9)


# ----------------------------------------------------------------------------- every variant trains


VARIANTS = {
    'switch_top1': dict(top_k=1, capacity_factor=1.25, norm_topk_prob=False),
    'mixtral_top2': dict(top_k=2),
    'noisy_topk': dict(router='noisy_topk'),
    'shared': dict(n_shared_experts=1),
    'fine_grained': dict(n_experts=16, top_k=4, expert_hidden=16),
    'sigmoid': dict(router='sigmoid', balance_scope='sequence', aux_loss_coef=0.001),
    'expert_choice': dict(router='expert_choice', capacity_factor=2.0),
    'soft': dict(router='soft'),
}


@pytest.mark.parametrize('name', VARIANTS)
def test_variant_trains_and_survives_checkpoint(name, tmp_path):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=32, n_experts=4, top_k=2,
                dropout=0.0, bias=False)
    args.update(VARIANTS[name])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = MoEGPT(MoEGPTConfig(**args))
    opt = optim.configure_optimizers(model, 0.1, 3e-3, (0.9, 0.95), 'cpu')
    idx = torch.randint(0, 23, (4, 16))
    losses = []
    for _ in range(8):
        _, loss, stats = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_expert_bias(stats['expert_counts'])
        losses.append(stats['ce'].item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    checkpoint.save({'format_version': checkpoint.FORMAT_VERSION, 'model': model.state_dict(),
                     'model_args': args}, str(tmp_path / 'ckpt.pt'))
    ckpt = checkpoint.load(str(tmp_path / 'ckpt.pt'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        restored = MoEGPT(MoEGPTConfig(**ckpt['model_args']))
    restored.load_state_dict(ckpt['model'])
    model.eval(), restored.eval()
    assert torch.equal(model(idx, idx)[0], restored(idx, idx)[0])
    if name == 'sigmoid':
        assert restored.moe_layers()[0].router.expert_bias.abs().sum() > 0


# ----------------------------------------------------------------------------- configs + compare.py


def zoo_model(name, **over):
    """The model a zoo config builds on train.py's defaults (the baby GPT), as train.py would."""
    import configurator
    from conftest import REPO
    defaults = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, bias=False, n_experts=8, top_k=2)
    ns = configurator._read_file(str(REPO / 'config' / f'{name}.py'))
    args = {**defaults, **{k: v for k, v in ns.items() if k in MoEGPTConfig.field_names()}, **over}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return MoEGPT(MoEGPTConfig(vocab_size=65, **args))


def test_zoo_configs_build_and_keep_active_flops():
    import compare
    dense = zoo_model('dense', expert_hidden=2 * 4 * 384)  # dense of equal active FLOPs to top-2
    target = dense.get_num_params().active
    for name in compare.ZOO:
        model = zoo_model(name)
        active = model.get_num_params().active
        routers = sum(p.numel() for moe in model.moe_layers() for p in moe.router.parameters())  # gate (+ noise)
        if name in ('dense', 'switch_top1'):
            continue  # the 1x-FFN baseline and top-1 Switch: different active FLOPs by design
        assert active - routers == target, name  # same active expert FLOPs as top-2
    # granularity follows a later --n_embd override (the CPU recipe)
    assert zoo_model('fine_grained', n_embd=128, n_head=4).config.expert_hidden == 128


def test_compare_reads_logs_and_tabulates(tmp_path, capsys, monkeypatch):
    import compare
    for name, ces, ms in (('dense', [4.0, 3.0, 2.5], 10.0), ('moe', [4.0, 2.8, 2.6], 20.0)):
        d = tmp_path / name
        d.mkdir()
        layers = [] if name == 'dense' else [{'max_over_mean': 1.5, 'drop_frac': 0.1}, {'max_over_mean': 2.0, 'drop_frac': 0.0}]
        recs = []
        for i, ce in enumerate(ces):
            recs.append({'type': 'eval', 'iter': 10 * i, 'val_ce': ce, 'layers': layers})
            if i < 2:
                recs.append({'type': 'train', 'iter': 10 * i + 5, 'iters': 10, 'ms_per_iter': ms, 'layers': layers})
        (d / 'log.jsonl').write_text('\n'.join(map(json.dumps, recs)) + '\n{"torn')
    monkeypatch.setattr(sys, 'argv', ['compare.py', str(tmp_path / 'dense'), str(tmp_path / 'moe'),
                                      '--plot', str(tmp_path / 'c.png')])
    compare.main()
    out = capsys.readouterr().out
    assert '| dense | 20 | 2.5000 | 2.5000 | 10.0 | 1.00x | - | - |' in out
    assert '| moe | 20 | 2.6000 | 2.6000 | 20.0 | 2.00x | 2.00 | 5.0 |' in out
    assert (tmp_path / 'c.png').stat().st_size > 10000
    evals, _ = compare.read_run(str(tmp_path / 'moe'))
    assert [round(e[1], 3) for e in evals] == [0.0, 0.2, 0.4]  # wall-clock: 10 iters x 20 ms per interval

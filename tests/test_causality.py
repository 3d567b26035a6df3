"""Causality probe for every router and capacity setting: changing the tokens after position t (of one
sequence of the batch) must not change any sequence's logits at positions <= t. The model states
which settings keep that (MoEGPTConfig.causal); the probe must agree with it, both ways: a setting
that claims causality shows no change, and a setting that doesn't shows one (the probe can detect)."""
import pytest
import torch

from model import MoEGPT, MoEGPTConfig

B, S, V, CUT = 4, 16, 32, 7


def make(**kw):
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=S, vocab_size=V, dropout=0.0, bias=False,
               n_experts=4, top_k=2, router_init_std=1.0)  # a decisive router: real, changing drops
    cfg.update(kw)
    torch.manual_seed(0)
    return MoEGPT(MoEGPTConfig(**cfg)).double()


def leak(model, train):
    """Largest change of logits at positions <= CUT, over all sequences, when positions > CUT of
    sequence 0 or of the last sequence are redrawn (two draws)."""
    model.train(train)
    worst = 0.0
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(V, (B, S), generator=g)
        for b in (0, B - 1):
            idx2 = idx.clone()
            idx2[b, CUT + 1:] = torch.randint(V, (S - CUT - 1,), generator=g)
            outs = []
            for x in (idx, idx2):
                torch.manual_seed(123)  # the same router noise (noisy_topk) for both
                logits, _, _ = model(x, x)  # targets: logits at every position
                outs.append(logits[:, :CUT + 1])
            worst = max(worst, (outs[0] - outs[1]).abs().max().item())
    return worst


SETTINGS = {
    'dense': dict(n_experts=1),
    'softmax': dict(router='softmax'),
    'noisy_topk': dict(router='noisy_topk'),
    'sigmoid': dict(router='sigmoid'),
    'soft': dict(router='soft'),
    'shared+fine': dict(n_experts=8, top_k=4, granularity=2, n_shared_experts=1),
    'expert_choice': dict(router='expert_choice', capacity_factor=2.0),
    'capacity top2 choice': dict(capacity_factor=1.0, capacity_priority='choice'),
    'capacity top2 position': dict(capacity_factor=1.0, capacity_priority='position'),
    'capacity top1 choice': dict(top_k=1, capacity_factor=1.0, capacity_priority='choice'),
    'capacity top1 position': dict(top_k=1, capacity_factor=1.0, capacity_priority='position'),
    'eval capacity only, choice': dict(capacity_factor=0.0, eval_capacity_factor=1.0, capacity_priority='choice'),
    'sigmoid capacity position': dict(router='sigmoid', capacity_factor=1.0, capacity_priority='position'),
}


@pytest.mark.filterwarnings('ignore:router=expert_choice')
@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', list(SETTINGS))
def test_causality_probe_agrees_with_the_model(name, train):
    model = make(**SETTINGS[name])
    d = leak(model, train)
    cf = model.config.capacity_factor if train else (model.config.eval_capacity_factor
                                                      if model.config.eval_capacity_factor is not None
                                                      else model.config.capacity_factor)
    mode_causal = model.config.causal or (model.config.router != 'expert_choice' and cf == 0)
    if mode_causal:
        assert d < 1e-12, f'{name} ({"train" if train else "eval"}) claims causality but leaks {d:.2e}'
    else:
        assert d > 1e-6, f'{name}: the probe should see the future leak (got {d:.2e})'


def test_causal_and_batch_dependent_flags():
    c = lambda **kw: MoEGPTConfig(n_embd=16, n_head=2, n_experts=4, top_k=2, **kw)
    assert c().causal and not c().batch_dependent
    assert not c(router='expert_choice').causal and c(router='expert_choice').batch_dependent
    assert not c(capacity_factor=1.25, capacity_priority='choice').causal
    assert c(capacity_factor=1.25, capacity_priority='choice').batch_dependent
    assert c(capacity_factor=1.25).causal  # the default priority is the causal one
    assert c(capacity_factor=1.25, capacity_priority='position').causal
    assert c(capacity_factor=1.25, capacity_priority='position').batch_dependent
    with pytest.raises(ValueError, match="capacity_priority='first'"):
        c(capacity_priority='first')


def test_position_priority_keeps_earlier_positions_first():
    """One expert, capacity for half the assignments, top-1: with 'position' priority the kept
    tokens are exactly the first half of the positions (all sequences), not whole sequences."""
    from model import MoELayer
    layer = MoELayer(MoEGPTConfig(n_embd=8, n_head=1, n_experts=2, top_k=1, capacity_factor=1.0,
                                  capacity_priority='position', bias=False))
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[0.0] * 8, [-100.0] + [0.0] * 7]))
    x = torch.zeros(2, 4, 8, dtype=torch.float32)
    x[..., 0] = -1.0  # every token prefers expert 1... strongly
    layer.eval()
    _, aux = layer(x, return_intermediate=True)
    assert aux['expert_counts'].tolist() == [0.0, 8.0]
    assert aux['drop_frac'].item() == pytest.approx(0.5)  # capacity = ceil(1.0 * 8 * 1 / 2) = 4
    # which tokens kept: the output of a dropped token is exactly 0
    out, _ = layer(x)
    kept = (out.abs().sum(-1) > 0)
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False]]
    layer.capacity_priority = 'choice'  # GShard: batch order, sequence 0 first
    out, _ = layer(x)
    assert (out.abs().sum(-1) > 0).tolist() == [[True, True, True, True], [False, False, False, False]]

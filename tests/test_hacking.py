"""docs/hacking.md's worked examples, applied as written to a copy of model.py, trained for a few steps
and checked against float64 per-token references; and the routing contract plugged in from outside
model.py: a router and a loss term defined here, registered, trained, checked against a reference
and run through the causality probe (issue 20)."""
import dataclasses
import importlib.util
import math
import re

import pytest
import torch
import torch.nn.functional as F

import model
from conftest import REPO
from metrics import MoEMetrics
from test_causality import leak

# Where a block's first line says it goes: (insert after | before, the model.py text it goes by)
ANCHORS = {'# in MoEGPTConfig': ('after', '    topk_group: int = 1'),
           '# with the routers': ('before', 'def limit_to_groups('),
           '# with the losses': ('before', 'def pooled_balance_loss(')}
TINY = dict(block_size=16, vocab_size=23, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True,
            n_experts=4, top_k=2, expert_hidden=24)


def examples():
    """{letter: (edits, files, lines) as the doc's heading states them, [code blocks]}."""
    text = (REPO / 'docs/hacking.md').read_text()
    out = {}
    for m in re.finditer(r'^## \((\w)\) [^\n]*\((\d+) edits?, (\d+) files?, (\d+) lines\)\n(.*?)(?=^## )', text, re.S | re.M):
        out[m.group(1)] = (tuple(int(g) for g in m.group(2, 3, 4)), re.findall(r'```python\n(.*?)```', m.group(5), re.S))
    return out


def hacked_model(letter, tmp_path):
    """model.py with example `letter`'s blocks inserted where their first lines say, imported as a module."""
    src = (REPO / 'model.py').read_text()
    for block in examples()[letter][1]:
        where, code = block.split('\n', 1)
        how, anchor = ANCHORS[where]
        i = src.index(anchor)
        if how == 'after':  # a field: indented into the class body
            i = src.index('\n', i) + 1
            code = ''.join('    ' + line for line in code.splitlines(keepends=True))
        src = src[:i] + code + ('\n\n' if how == 'before' else '') + src[i:]
    path = tmp_path / f'model_{letter}.py'
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def random_layer(mod, **kw):
    """An MoE layer of module `mod` in float64, every weight random (a decisive router)."""
    torch.manual_seed(0)
    layer = mod.MoELayer(mod.MoEGPTConfig(**{**TINY, **kw})).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def per_token_reference(layer, x_TD, choose):
    """A Python loop over tokens: choose(logits_E) -> [(expert, gate)], each chosen expert's MLP on the
    token alone, the gate-weighted sum. Slow and obviously right."""
    ex, out = layer.experts, torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for e, g in choose(x_TD[t] @ layer.router.gate.weight.T):
            h = model.activation_fn(ex.activation, x_TD[t] @ ex.w1_EDF[e] + ex.b1_EF[e])
            out[t] += g * (h @ ex.w2_EHD[e] + ex.b2_ED[e])
    return out


def top_p_choice(logits_E, p=0.5):
    probs, chosen, total = torch.softmax(logits_E, -1), [], 0.0
    for e in sorted(range(len(probs)), key=lambda e: -probs[e].item()):
        if total >= p:
            break
        chosen.append((e, probs[e]))
        total += probs[e].item()
    return chosen


def relu_choice(logits_E):
    return [(e, logits_E[e]) for e in range(len(logits_E)) if logits_E[e] > 0]


def train_steps(m, steps=6, seed=0):
    """A few AdamW steps on one fixed batch: the losses, which must fall."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, TINY['vocab_size'], (4, TINY['block_size']), generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        _, loss, stats = m(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, stats


@pytest.mark.parametrize('letter', ['a', 'b', 'c'])
def test_examples_state_their_edit_counts(letter):
    (edits, files, lines), blocks = examples()[letter]
    assert len(blocks) == edits and files == 1
    assert all(b.split('\n', 1)[0] in ANCHORS for b in blocks)
    assert sum(len(b.rstrip('\n').split('\n')) - 1 for b in blocks) == lines


def test_example_a_top_p_router(tmp_path):
    mod = hacked_model('a', tmp_path)
    layer = random_layer(mod, router='top_p')
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out, aux = layer(x)
    ref = per_token_reference(layer, x.view(-1, 16), top_p_choice)
    assert (out.view(-1, 16) - ref).abs().max().item() < 1e-10
    per_token = torch.bincount(layer.router(x.view(-1, 16)).token_N, minlength=15)
    assert per_token.min() >= 1 and per_token.max() > per_token.min()  # dynamic k: tokens differ
    assert aux['expert_counts'].sum().item() == per_token.sum().item()
    losses, stats = train_steps(mod.MoEGPT(mod.MoEGPTConfig(**TINY, router='top_p')))
    assert set(stats['losses']) == {'aux', 'z'} and losses[-1] < losses[0] - 0.1, losses


def test_example_b_entropy_loss_term(tmp_path):
    mod = hacked_model('b', tmp_path)
    cfg = mod.MoEGPTConfig(**{**TINY, 'n_layer': 3}, entropy_loss_coef=0.5)
    m = mod.MoEGPT(cfg).double()
    idx = torch.randint(0, TINY['vocab_size'], (2, 8))
    logits, loss, stats = m(idx, idx, return_intermediate=True)
    ent = torch.stack([-(r['router_probs'] * r['router_probs'].log()).sum(-1).mean() for r in stats['routing']]).mean()
    assert stats['losses']['entropy'].item() == pytest.approx(ent.item(), abs=1e-12)
    ce = F.cross_entropy(logits.view(-1, TINY['vocab_size']), idx.view(-1))
    terms = stats['losses']
    assert loss.item() == pytest.approx((ce + 0.01 * terms['aux'] + 0.001 * terms['z'] + 0.5 * ent).item(), abs=1e-12)
    # the term alone moves the router; the coefficient is a config field, so a train.py key
    layer = random_layer(mod, entropy_loss_coef=0.5)
    g, = torch.autograd.grad(layer(torch.randn(2, 5, 16, dtype=torch.float64))[1]['losses']['entropy'],
                             [layer.router.gate.weight])
    assert g.abs().sum() > 0
    assert 'entropy_loss_coef' in mod.MoEGPTConfig.field_names()
    acc = (metrics := MoEMetrics([0, 1, 2], 4, 'cpu')).new_acc()
    metrics.add(acc, stats)
    assert metrics.reduce(acc)['losses']['entropy'] == pytest.approx(ent.item(), rel=1e-9)  # logged by name


def test_example_c_relu_router_and_l1_term(tmp_path):
    mod = hacked_model('c', tmp_path)
    layer = random_layer(mod, router='relu', l1_loss_coef=1e-3)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out, aux = layer(x)
    x_TD = x.view(-1, 16)
    assert (out.view(-1, 16) - per_token_reference(layer, x_TD, relu_choice)).abs().max().item() < 1e-10
    l1 = F.relu(x_TD @ layer.router.gate.weight.T).sum(-1).mean()
    assert set(aux['losses']) == {'z', 'l1'} and aux['losses']['l1'].item() == pytest.approx(l1.item(), abs=1e-12)
    losses, stats = train_steps(mod.MoEGPT(mod.MoEGPTConfig(**TINY, router='relu', l1_loss_coef=1e-3)))
    assert losses[-1] < losses[0] - 0.1, losses


# ----------------------------------------------------------------------------- plugged from outside

def above_uniform(router, x_TD):
    """A token takes every expert whose probability is above uniform (1/E): a causal, dynamic-k router."""
    logits_TE = router.logits(x_TD)
    probs_TE = F.softmax(logits_TE, dim=-1)
    token_N, expert_N = (probs_TE > 1.0 / probs_TE.shape[-1]).nonzero(as_tuple=True)
    return model.Routing(token_N, expert_N, probs_TE[token_N, expert_N], logits_TE, probs_TE)


def batch_centred(router, x_TD):
    """Top-k of the logits minus their mean over the whole batch: depends on other (later) tokens."""
    logits_TE = router.logits(x_TD)
    centred_TE = logits_TE - logits_TE.mean(dim=0, keepdim=True)
    return router.topk(logits_TE, F.softmax(logits_TE, dim=-1), select_TE=centred_TE)


def logit_l2(moe, r, counts_E, S):
    return r.logits_TE.square().mean()


@dataclasses.dataclass
class PluggedConfig(model.MoEGPTConfig):
    logit_l2_loss_coef: float = 0.05


@pytest.fixture
def plugged():
    model.register_router('above_uniform')(above_uniform)
    model.register_router('batch_centred', causal=False, batch_dependent=True)(batch_centred)
    model.register_loss('logit_l2')(logit_l2)
    yield
    for name in ('above_uniform', 'batch_centred'):
        del model.ROUTERS[name]
    del model.LOSSES['logit_l2']


def test_router_and_loss_plugged_from_outside(plugged):
    torch.manual_seed(0)
    layer = model.MoELayer(PluggedConfig(**TINY, router='above_uniform')).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    out, aux = layer(x)

    def choose(logits_E):
        probs = torch.softmax(logits_E, -1)
        return [(e, probs[e]) for e in range(len(probs)) if probs[e] > 1 / len(probs)]
    assert (out.view(-1, 16) - per_token_reference(layer, x.view(-1, 16), choose)).abs().max().item() < 1e-10
    logits = x.view(-1, 16) @ layer.router.gate.weight.T
    assert aux['losses']['logit_l2'].item() == pytest.approx(logits.square().mean().item(), abs=1e-12)
    m = model.MoEGPT(PluggedConfig(**TINY, router='above_uniform'))
    losses, stats = train_steps(m)
    assert set(stats['losses']) == {'aux', 'z', 'logit_l2'} and losses[-1] < losses[0] - 0.1, losses


@pytest.mark.filterwarnings('ignore:router=batch_centred')
@pytest.mark.parametrize('name', ['above_uniform', 'batch_centred'])
def test_plugged_routers_declarations_agree_with_the_causality_probe(plugged, name):
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32, dropout=0.0, bias=False,
               n_experts=4, top_k=2, router_init_std=1.0, router=name)
    torch.manual_seed(0)
    m = model.MoEGPT(PluggedConfig(**cfg)).double()
    d = leak(m, train=False)
    assert m.config.causal == (d < 1e-12), (name, d)
    assert m.config.batch_dependent == (name == 'batch_centred')
    assert math.isfinite(d)


def test_a_loss_term_without_its_coefficient_field_is_refused_by_the_config(plugged):
    """A registered term needs its <name>_loss_coef: the config says so (train.py prints it as one
    line, exit 2, before any work), not a traceback from deep in the model."""
    with pytest.raises(ValueError, match="loss term 'logit_l2', which needs a config field logit_l2_loss_coef"):
        model.MoEGPTConfig(**TINY)
    PluggedConfig(**TINY)  # with the field: fine

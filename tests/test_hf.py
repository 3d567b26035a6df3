"""Issue 15: the MoE families in and out of HF format, and the block / MoE-layer options they need.

Offline: every HF model is a tiny random one built from a config object (float32, eval) and saved
with save_pretrained to a temp directory. Order: block options -> MoE-layer features (each family's
HF MoE block against our MoELayer with copied weights) -> import -> export -> configs.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import hf
import optim
from conftest import REPO
from model import MoEGPT, MoEGPTConfig, MoELayer

V = 64  # vocab of every tiny model


def llama_style(**kw):
    args = dict(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, dropout=0.0,
                norm='rmsnorm', position='rope', rope_theta=1000.0, activation='swiglu', bias=False,
                tie_embeddings=False, n_experts=4, top_k=2, expert_hidden=16)
    args.update(kw)
    return MoEGPTConfig(**args)


def sharpen(model, seed=0, scale=0.3):
    """Random non-trivial values everywhere (norm weights, biases, a decisive router), so every
    parameter is checked and no routing decision is a near-tie."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('router.gate.weight', 'mlp.gate.weight')):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    return model


# ----------------------------------------------------------------------------- 1. block options


@pytest.mark.parametrize('field,value,extra', [
    ('norm', 'batchnorm', {}), ('norm_eps', 0.0, {}), ('position', 'alibi', {}), ('rope_theta', 0.0, {}),
    ('n_kv_head', 3, {}), ('head_dim', 0, {}), ('head_dim', 7, {'position': 'rope'}), ('qk_norm', 'layer', {}),
    ('dense_hidden', 0, {}), ('capacity_scope', 'batch', {}), ('balance_scope', 'sum', {}),
    ('balance_scope', 'pooled', {'router': 'expert_choice'}),
    # older checkpoints' aux_loss_layers: 'pooled' maps to balance_scope='pooled' (micro-batch counts) only
    ('aux_loss_layers', 'sum', {}), ('aux_loss_layers', 'pooled', {'balance_scope': 'sequence'}),
    ('shared_expert_gate', True, {}), ('routed_scaling_factor', 0.0, {}), ('n_group', 3, {}),
    ('n_group', 2, {'router': 'soft'}), ('topk_group', 3, {'n_group': 2}), ('top_k', 3, {'n_group': 4, 'topk_group': 1}),
])
def test_new_config_fields_are_validated_by_name(field, value, extra):
    with pytest.raises(ValueError, match=f'MoEGPTConfig.{field}='):
        MoEGPTConfig(**{'n_embd': 32, 'n_head': 4, 'n_experts': 4, 'top_k': 2, field: value, **extra})


def test_defaults_stay_gpt2():
    c = MoEGPTConfig(n_embd=32, n_head=4)
    assert (c.norm, c.position, c.qk_norm, c.tie_embeddings) == ('layernorm', 'learned', 'none', True)
    assert (c.n_kv_head, c.head_dim, c.qkv_bias, c.attn_out_bias, c.dense_hidden) == (4, 8, True, True, 128)
    model = MoEGPT(c)
    assert model.lm_head.weight is model.transformer.wte.weight and 'wpe' in model.transformer
    assert isinstance(model.transformer.h[0].ln_1, torch.nn.LayerNorm)


def test_llama_block_parameters_and_counts():
    model = MoEGPT(llama_style(qk_norm='head', qkv_bias=True, n_shared_experts=1, shared_expert_gate=True))
    names = dict(model.named_parameters())
    assert 'transformer.wpe.weight' not in names and 'lm_head.weight' in names
    assert names['transformer.h.0.attn.c_attn.weight'].shape == ((4 + 2 * 2) * 8, 32)  # q | k | v, GQA
    assert names['transformer.h.0.attn.c_attn.bias'].shape == (64,)
    assert 'transformer.h.0.attn.c_proj.bias' not in names
    assert names['transformer.h.0.attn.q_norm.weight'].shape == (8,)
    assert names['transformer.h.0.mlp.shared_expert_gate.weight'].shape == (1, 32)
    # untied: the token embedding is a lookup, not counted with non_embedding; lm_head is
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params().total == total - V * 32


@pytest.mark.parametrize('kw', [dict(qk_norm='head', qkv_bias=True), dict(qk_norm='proj', n_kv_head=4),
                                dict(n_experts=1, n_kv_head=1, head_dim=16)])
def test_rope_kv_cache_equals_full_forward(kw):
    from generation import KVCache
    torch.manual_seed(0)
    model = sharpen(MoEGPT(llama_style(block_size=16, n_layer=3, moe_every=2, **kw)), scale=1.0).eval()
    prompt = torch.randint(0, V, (3, 4))
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)  # 16 = block_size: all fits
    assert torch.equal(cached, model.generate(prompt, 12, temperature=0, use_cache=False))
    # the logits of each cached step (q and k rotated at offset = cache length) equal a full forward's
    full, _, _ = model(cached, cached)
    cache = KVCache(model.config.n_layer)
    step, _, _ = model(cached[:, :4], kv_cache=cache)
    assert torch.allclose(step[:, -1], full[:, 3], atol=1e-5)
    for i in range(4, 16):
        step, _, _ = model(cached[:, i:i + 1], kv_cache=cache)
        assert torch.allclose(step[:, -1], full[:, i], atol=1e-5), i
    # past block_size: the cached path refills with the last half block (positions restart at 0)
    out = model.generate(prompt, 20, temperature=0, use_cache=True)
    seq, start = prompt, 0
    for _ in range(20):
        seq = torch.cat([seq, model(seq[:, start:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        if seq.size(1) - start > 16:
            start = seq.size(1) - 8
    assert torch.equal(out, seq)


# ----------------------------------------------------------------------------- 2. MoE-layer features


def moe_layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(llama_style(**kw)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def test_group_limited_routing_and_scaling_equal_a_per_token_reference():
    layer = moe_layer(router='sigmoid', n_experts=8, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.randn(8, dtype=torch.float64) * 0.3)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out, aux = layer(x, return_intermediate=True)
    ex, r = layer.experts, layer.router
    ref = torch.zeros(18, 32, dtype=torch.float64)
    for t, xt in enumerate(x.view(-1, 32)):
        score = torch.sigmoid(xt @ r.gate.weight.T)
        sel = (score + r.expert_bias).tolist()
        group = [sum(sorted(sel[2 * g:2 * g + 2], reverse=True)[:2]) for g in range(4)]
        groups = sorted(range(4), key=lambda g: -group[g])[:2]
        allowed = [e for e in range(8) if e // 2 in groups]
        ids = sorted(allowed, key=lambda e: -sel[e])[:3]
        assert {e // 2 for e in ids} <= set(groups)
        w = score[ids] / score[ids].sum() * 2.5
        for wi, e in zip(w, ids):
            h = xt @ ex.w1_EDF[e]
            ref[t] += wi * ((F.silu(h[:16]) * h[16:]) @ ex.w2_EHD[e])
        assert sorted(aux['routing']['topk_ids'].view(-1, 3)[t].tolist()) == sorted(ids)
    assert torch.allclose(out.view(-1, 32), ref, atol=1e-10)


@pytest.mark.parametrize('priority', ['choice', 'position'])
@pytest.mark.parametrize('top_k', [1, 2])
def test_capacity_per_sequence_is_each_sequence_on_its_own(priority, top_k):
    """capacity_scope='sequence' on a batch == every sequence run alone with the micro-batch scope."""
    kw = dict(n_experts=4, top_k=top_k, capacity_factor=0.75, capacity_priority=priority)
    layer = moe_layer(**kw, capacity_scope='sequence')
    alone = moe_layer(**kw)  # same seed: same weights
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    out, aux = layer(x)
    refs = [alone(x[b:b + 1]) for b in range(3)]
    assert torch.allclose(out, torch.cat([o for o, _ in refs]), atol=1e-12)
    assert aux['drop_frac'].item() == pytest.approx(sum(a['drop_frac'].item() for _, a in refs) / 3)
    assert 0 < aux['drop_frac'].item() < 1
    batch_scope, _ = alone(x)
    assert not torch.allclose(batch_scope, out)  # the scope matters on this batch


def leak(model):
    """Largest change of any sequence's logits at positions <= 6 when sequence 0's later tokens change."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(V, (4, 16), generator=g)
    idx2 = idx.clone()
    idx2[0, 7:] = torch.randint(V, (9,), generator=g)
    a, b = (model(i, i)[0][:, :7] for i in (idx, idx2))
    return (a - b).abs().max().item()


def other_sequences_change(model):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(V, (4, 16), generator=g)
    idx2 = idx.clone()
    idx2[1:] = torch.randint(V, (3, 16), generator=g)
    return (model(idx, idx)[0][0] - model(idx2, idx2)[0][0]).abs().max().item()


@pytest.mark.parametrize('top_k,priority', [(1, 'choice'), (2, 'choice'), (2, 'position')])
def test_capacity_per_sequence_causality_and_batch_independence(top_k, priority):
    cfg = llama_style(n_experts=4, top_k=top_k, capacity_factor=1.0, capacity_priority=priority,
                      capacity_scope='sequence', router_init_std=1.0, block_size=16)
    assert not cfg.batch_dependent
    assert cfg.causal == (top_k == 1 or priority == 'position')
    torch.manual_seed(0)
    model = MoEGPT(cfg).double().train()
    assert other_sequences_change(model) < 1e-12  # no sequence sees another
    d = leak(model)
    assert (d < 1e-12) if cfg.causal else (d > 1e-6), d


# Each family's HF MoE block against our MoELayer with the same weights: forward, gradients, aux loss.

def hf_moe_block(family):
    t = pytest.importorskip('transformers')
    common = dict(hidden_size=32, num_attention_heads=4, num_experts_per_tok=2, hidden_act='silu')
    if family == 'mixtral':
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B
        c = t.MixtralConfig(intermediate_size=16, num_local_experts=4, **common)
        ours = dict(norm_topk_prob=True)
    elif family == 'olmoe':
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as B
        c = t.OlmoeConfig(intermediate_size=16, num_experts=4, norm_topk_prob=False, **common)
        ours = dict(norm_topk_prob=False)
    elif family == 'qwen2_moe':
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as B
        c = t.Qwen2MoeConfig(moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
                             norm_topk_prob=False, **common)
        ours = dict(norm_topk_prob=False, n_shared_experts=2, shared_expert_gate=True)
    elif family == 'qwen3_moe':
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B
        c = t.Qwen3MoeConfig(moe_intermediate_size=16, num_experts=4, norm_topk_prob=True, **common)
        ours = dict(norm_topk_prob=True)
    else:  # DeepSeek-V3: sigmoid scores, e_score_correction_bias, group-limited, scaled, a shared expert
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as B
        c = t.DeepseekV3Config(hidden_size=32, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=3,
                               n_group=4, topk_group=2, routed_scaling_factor=2.5, moe_intermediate_size=16,
                               n_shared_experts=1, norm_topk_prob=True)
        ours = dict(router='sigmoid', n_experts=8, top_k=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                    n_shared_experts=1)
    torch.manual_seed(0)
    block = B(c).double()
    with torch.no_grad():
        for n, p in block.named_parameters():
            p.normal_(0, 0.5 if n == 'gate.weight' else 0.2)
        if family == 'deepseek_v3':
            block.gate.e_score_correction_bias.normal_(0, 0.3)
    layer = MoELayer(llama_style(**ours)).double()
    sd = {'router.gate.weight': block.gate.weight,
          'experts.w1_EDF': block.experts.gate_up_proj.transpose(1, 2),
          'experts.w2_EHD': block.experts.down_proj.transpose(1, 2)}
    shared = {'qwen2_moe': 'shared_expert', 'deepseek_v3': 'shared_experts'}.get(family)
    if shared:
        s = getattr(block, shared)
        sd.update({'shared_experts.c_fc.weight': torch.cat([s.gate_proj.weight, s.up_proj.weight]),
                   'shared_experts.c_proj.weight': s.down_proj.weight})
    if family == 'qwen2_moe':
        sd['shared_expert_gate.weight'] = block.shared_expert_gate.weight
    if family == 'deepseek_v3':
        sd['router.expert_bias'] = block.gate.e_score_correction_bias
    layer.load_state_dict({k: v.detach().clone() for k, v in sd.items()})
    return block, layer, c


@pytest.mark.parametrize('family', ['mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe', 'deepseek_v3'])
def test_hf_moe_block_equals_our_layer(family):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    block, layer, c = hf_moe_block(family)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    xh, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(2, 11, 32, dtype=torch.float64)
    ref = block(xh)
    out, aux = layer(xo, return_intermediate=True)
    # float64 both, but HF takes the router's softmax (DeepSeek: the whole router) in float32
    close = lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5)  # noqa: E731
    assert close(out, ref)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    assert close(xo.grad, xh.grad)
    assert close(layer.router.gate.weight.grad, block.gate.weight.grad)
    assert close(layer.experts.w1_EDF.grad, block.experts.gate_up_proj.grad.transpose(1, 2))
    assert close(layer.experts.w2_EHD.grad, block.experts.down_proj.grad.transpose(1, 2))
    if family == 'qwen2_moe':
        assert close(layer.shared_expert_gate.weight.grad, block.shared_expert_gate.weight.grad)
    if family == 'deepseek_v3':
        return  # its HF model has no balance loss (aux-loss-free balancing)
    # the aux loss, under the coefficient mapping: HF's f sums to top_k, ours to 1
    logits = aux['routing']['router_logits'].reshape(-1, layer.n_experts)
    hf_aux = load_balancing_loss_func((logits,), layer.n_experts, layer.top_k)
    assert hf_aux.item() == pytest.approx(layer.top_k * aux['losses']['aux'].item(), rel=1e-6)  # HF sums in float32


def test_pooled_aux_loss_is_hfs_across_layers_and_the_coefficient_maps():
    """balance_scope='pooled' is HF's load_balancing_loss_func over all layers (value and router
    gradients) divided by top_k; HF's router_aux_loss_coef c is our aux_loss_coef top_k*c."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    c, K = 0.02, 2
    torch.manual_seed(0)
    for layers in ('pooled', 'mean'):
        model = MoEGPT(llama_style(n_layer=3, router_init_std=0.5, balance_scope='pooled' if layers == 'pooled' else 'micro_batch', aux_loss_coef=K * c,
                                   z_loss_coef=0.0)).double()
        idx = torch.randint(0, V, (3, 12))
        logits, loss, stats = model(idx, idx, return_intermediate=True)
        router_logits = tuple(r['router_logits'].reshape(-1, 4) for r in stats['routing'])
        if layers == 'mean':  # ours: the mean of per-layer losses, each = HF's single-layer loss / K
            per_layer = [load_balancing_loss_func((lg,), 4, K) / K for lg in router_logits]
            assert stats['losses']['aux'].item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=1e-6)
            continue
        hf_aux = load_balancing_loss_func(router_logits, 4, K)
        assert hf_aux.item() == pytest.approx(K * stats['losses']['aux'].item(), rel=1e-6)  # HF sums in float32
        ce = F.cross_entropy(logits.view(-1, V), idx.view(-1))
        assert loss.item() == pytest.approx((ce + c * hf_aux).item(), rel=1e-7)  # HF's loss, coef c
        # the same gradients reach the routers
        g_ours = torch.autograd.grad(loss - ce, [m.router.gate.weight for m in model.moe_layers()],
                                     retain_graph=True)
        g_hf = torch.autograd.grad(c * hf_aux, [m.router.gate.weight for m in model.moe_layers()])
        for a, b in zip(g_ours, g_hf):
            assert torch.allclose(a, b, atol=1e-8)


# ----------------------------------------------------------------------------- 3. import


def tiny_hf_config(family):
    t = pytest.importorskip('transformers')
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000.0, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    moe = dict(num_experts_per_tok=2, router_aux_loss_coef=0.02)
    return {
        'gpt2': lambda: t.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=48, resid_pdrop=0,
                                     embd_pdrop=0, attn_pdrop=0, bos_token_id=None, eos_token_id=None),
        'llama': lambda: t.LlamaConfig(intermediate_size=40, **common),
        'qwen2': lambda: t.Qwen2Config(intermediate_size=40, **common),
        'qwen3': lambda: t.Qwen3Config(intermediate_size=40, head_dim=16, **common),
        'mixtral': lambda: t.MixtralConfig(intermediate_size=24, num_local_experts=4, **moe, **common),
        'olmoe': lambda: t.OlmoeConfig(intermediate_size=24, num_experts=4, norm_topk_prob=False, **moe, **common),
        'qwen2_moe': lambda: t.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=16, num_experts=4,
                                              shared_expert_intermediate_size=32, decoder_sparse_step=2, **moe, **common),
        'qwen3_moe': lambda: t.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=16, num_experts=4, head_dim=16,
                                              mlp_only_layers=[0], norm_topk_prob=True, **moe, **common),
    }[family]()


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
    """family -> (save_pretrained dir, token batch, HF's logits on it)."""
    t = pytest.importorskip('transformers')
    t.logging.set_verbosity_error()
    out = {}
    for i, family in enumerate(hf.FAMILIES):
        torch.manual_seed(i)
        model = sharpen(t.AutoModelForCausalLM.from_config(tiny_hf_config(family)), seed=i).eval()
        d = tmp_path_factory.mktemp(family)
        model.save_pretrained(d)
        idx = torch.randint(0, V, (2, 20))
        with torch.no_grad():
            out[family] = (str(d), idx, model(idx).logits)
    return out


def logits_of(model, idx):
    return model.eval()(idx, idx)[0].detach()


@pytest.mark.parametrize('family', hf.FAMILIES)
def test_import_gives_transformers_logits(hf_dirs, family):
    path, idx, ref = hf_dirs[family]
    model = hf.load(path)
    assert (logits_of(model, idx) - ref).abs().max().item() < 2e-5
    assert hf.hf_family(model.config)[0] == family  # and its architecture is recognised for export
    if family in hf.MOE_FAMILIES:
        assert model.config.aux_loss_coef == pytest.approx(2 * 0.02)  # top_k x HF's router_aux_loss_coef
        assert model.config.balance_scope == 'pooled' and model.config.z_loss_coef == 0.0


def test_imported_placement_and_widths(hf_dirs):
    q2 = hf.load_config(hf_dirs['qwen2_moe'][0])  # decoder_sparse_step=2: MoE at layers 1 (and 3, ...)
    assert [q2.is_moe_layer(i) for i in range(3)] == [False, True, False]
    assert (q2.expert_hidden, q2.dense_hidden, q2.n_shared_experts, q2.shared_expert_gate) == (16, 40, 2, True)
    q3 = hf.load_config(hf_dirs['qwen3_moe'][0])  # mlp_only_layers=[0]
    assert [q3.is_moe_layer(i) for i in range(3)] == [False, True, True] and q3.head_dim == 16


@pytest.mark.parametrize('family', ['mixtral', 'qwen2_moe'])
def test_legacy_per_expert_layout_fuses_to_transformers_5s(hf_dirs, family):
    """The files on disk (and transformers < 5) keep one Linear per expert; fuse_experts gives the
    in-memory fused layout."""
    from safetensors.torch import load_file
    t = pytest.importorskip('transformers')
    path = hf_dirs[family][0]
    on_disk = load_file(os.path.join(path, 'model.safetensors'))
    assert any('.experts.0.' in k for k in on_disk)
    fused = hf.fuse_experts(on_disk)
    mem = t.AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert set(fused) == set(mem)
    assert all(torch.equal(fused[k], mem[k]) for k in mem)


@pytest.mark.parametrize('family', hf.MOE_FAMILIES)
def test_training_steps_after_import(hf_dirs, family):
    path, idx, _ = hf_dirs[family]
    torch.manual_seed(0)
    model = hf.load(path).train()
    opt = optim.configure_optimizers(model, 0.0, 3e-3, (0.9, 0.95), 'cpu')
    losses = []
    for _ in range(6):
        _, loss, stats = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.5, losses
    assert stats['expert_counts'].sum(1).tolist() == [idx.numel() * 2] * len(model.moe_layers())


@pytest.mark.parametrize('family,moe,export_as', [
    ('llama', dict(n_experts=4, top_k=2), 'mixtral'),
    ('qwen2', dict(n_experts=4, top_k=2, norm_topk_prob=True, n_shared_experts=1, shared_expert_gate=True), 'qwen2_moe'),
    ('qwen3', dict(n_experts=4, top_k=1, norm_topk_prob=True), 'qwen3_moe'),  # top-1: renormalised only if asked
    ('gpt2', dict(n_experts=4, top_k=2, moe_every=2), None),
])
def test_upcycled_dense_checkpoint_is_the_dense_function_and_exports(hf_dirs, family, moe, export_as, tmp_path):
    path, idx, ref = hf_dirs[family]
    model = hf.load(path, **moe)
    assert model.config.n_experts == 4 and len(model.moe_layers()) >= 1
    ex = model.moe_layers()[0].experts
    assert torch.equal(ex.w1_EDF[0], ex.w1_EDF[3])  # every expert a copy of the dense MLP
    assert (logits_of(model, idx) - ref).abs().max().item() < 2e-5  # the dense function at step 0
    assert hf.hf_family(model.config)[0] == export_as
    if export_as is None:  # a GPT-2-style MoE: no HF class
        with pytest.raises(hf.UnsupportedCheckpoint, match='GPT-2-style MoE .* has no HF class'):
            hf.export(model, tmp_path / 'x')
        return
    t = pytest.importorskip('transformers')
    hf.export(model, tmp_path / 'moe')
    back = t.AutoModelForCausalLM.from_pretrained(tmp_path / 'moe').eval()
    assert type(back).__name__.lower().startswith(export_as.replace('_', ''))
    with torch.no_grad():
        assert (back(idx).logits - ref).abs().max().item() < 2e-5  # HF's MoE = the dense HF model


def test_overrides_the_checkpoint_fixes_are_refused(hf_dirs):
    path = hf_dirs['mixtral'][0]
    with pytest.raises(ValueError, match=r"\['n_experts'\] are fixed by the checkpoint \(n_experts=4\)"):
        hf.load(path, n_experts=8)
    assert 'n_experts' in hf.fixed_fields(path) and 'n_experts' not in hf.fixed_fields(hf_dirs['llama'][0])
    assert 'dropout' not in hf.fixed_fields(path)
    m = hf.load(path, block_size=16, dropout=0.1, norm='rmsnorm', n_kv_head=None)  # same value / None: fine
    assert (m.config.block_size, m.config.dropout) == (16, 0.1)
    with pytest.raises(ValueError, match='unknown MoEGPTConfig fields'):
        hf.load(path, n_expert=8)
    with pytest.raises(ValueError, match="block_size=64 is longer than the checkpoint's n_positions=48"):
        hf.load(hf_dirs['gpt2'][0], block_size=64)


def test_unsupported_architectures_say_why():
    t = pytest.importorskip('transformers')
    with pytest.raises(hf.UnsupportedCheckpoint, match="model_type 'bert' is not supported; supported: gpt2"):
        hf.config_args(t.BertConfig())
    with pytest.raises(hf.UnsupportedCheckpoint, match='rope_type'):
        hf.config_args(t.LlamaConfig(rope_scaling={'rope_type': 'linear', 'factor': 2.0}))
    with pytest.raises(hf.UnsupportedCheckpoint, match='sliding-window'):
        hf.config_args(t.Qwen2MoeConfig(use_sliding_window=True, sliding_window=16))
    with pytest.raises(hf.UnsupportedCheckpoint, match='clip_qkv'):
        hf.config_args(t.OlmoeConfig(clip_qkv=8.0))


def test_gpt2_dir_loads_as_the_same_model(hf_dirs):
    """hf.load of a GPT-2 save_pretrained dir (the one way in; model.py has no from_pretrained) is HF's model."""
    path, idx, ref = hf_dirs['gpt2']
    model = hf.load(path)
    assert model.config.activation == 'gelu_tanh' and model.config.n_experts == 1
    assert (logits_of(model, idx) - ref).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- 4. export


def family_config(family, **kw):
    """A MoEGPT trained here whose architecture is `family`'s (config/<family>_tiny.py's shape, smaller)."""
    moe = dict(n_experts=4, top_k=2, bias=False)
    return {
        'gpt2': lambda: MoEGPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=32, activation='gelu_tanh'),
        'llama': lambda: llama_style(n_experts=1, expert_hidden=40, qkv_bias=True, attn_out_bias=True),
        'qwen2': lambda: llama_style(n_experts=1, expert_hidden=40, qkv_bias=True),
        'qwen3': lambda: llama_style(n_experts=1, expert_hidden=40, qk_norm='head', head_dim=16),
        'mixtral': lambda: llama_style(**moe),
        'olmoe': lambda: llama_style(**moe, qk_norm='proj', norm_topk_prob=False, n_kv_head=4),
        'qwen2_moe': lambda: llama_style(**moe, n_layer=3, moe_first_dense=1, dense_hidden=40, qkv_bias=True,
                                         norm_topk_prob=False, n_shared_experts=2, shared_expert_gate=True),
        'qwen3_moe': lambda: llama_style(**moe, qk_norm='head', head_dim=16, tie_embeddings=True),
    }[family]()


@pytest.mark.parametrize('family', hf.FAMILIES)
def test_export_reloads_in_transformers_with_our_logits(family, tmp_path):
    t = pytest.importorskip('transformers')
    t.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = sharpen(MoEGPT(family_config(family))).eval()
    idx = torch.randint(0, V, (2, 20))
    ours = logits_of(model, idx)
    assert hf.export(model, tmp_path) == family
    back = t.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (back(idx).logits - ours).abs().max().item() < 2e-5
    again = hf.load(tmp_path)  # and back in: the same model
    assert (logits_of(again, idx) - ours).abs().max().item() < 2e-5


def test_gpt2_without_biases_exports_with_zero_biases(tmp_path):
    t = pytest.importorskip('transformers')
    torch.manual_seed(0)
    model = sharpen(MoEGPT(MoEGPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=32, bias=False,
                                        activation='gelu_tanh'))).eval()
    idx = torch.randint(0, V, (2, 20))
    hf.export(model, tmp_path)
    back = t.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (back(idx).logits - logits_of(model, idx)).abs().max().item() < 2e-5


def test_gpt2_style_moe_has_no_hf_class_and_goes_native(tmp_path):
    torch.manual_seed(0)
    cfg = MoEGPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=32, n_experts=4, top_k=2,
                       router='sigmoid')
    model = sharpen(MoEGPT(cfg))
    with torch.no_grad():
        model.moe_layers()[0].router.expert_bias.normal_()
    family, reasons = hf.hf_family(cfg)
    assert family is None and "norm='layernorm' (needs 'rmsnorm')" in reasons['mixtral']
    with pytest.raises(hf.UnsupportedCheckpoint, match='has no HF class'):
        hf.export(model, tmp_path / 'hf')
    hf.export_native(model, tmp_path / 'native')
    back = hf.load(tmp_path / 'native', dropout=0.1)
    assert back.config.dropout == 0.1 and back.config.n_experts == 4
    idx = torch.randint(0, V, (2, 20))
    assert torch.equal(logits_of(back, idx), logits_of(model, idx))  # buffers (expert_bias) included


def write_ckpt(out_dir, model):
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save({'format_version': checkpoint.FORMAT_VERSION, 'model': model.state_dict(),
                     'model_args': vars(model.config), 'iter_num': 0}, os.path.join(out_dir, 'ckpt.pt'))


def test_export_py_end_to_end(tmp_path):
    """export.py --out_dir=... --to=...: a Qwen3-MoE-shaped checkpoint becomes an HF directory that
    transformers loads (export.py checks the logits itself); a GPT-2-style MoE is refused plainly,
    pointing to --format=native (test_gpt2_style_moe_has_no_hf_class_and_goes_native)."""
    pytest.importorskip('transformers')
    torch.manual_seed(0)
    write_ckpt(tmp_path / 'q3', sharpen(MoEGPT(family_config('qwen3_moe'))))
    r = subprocess.run([sys.executable, 'export.py', f'--out_dir={tmp_path / "q3"}', f'--to={tmp_path / "hf"}'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'Qwen3MoeForCausalLM' in r.stdout and 'logits match' in r.stdout
    assert os.path.isfile(tmp_path / 'hf' / 'model.safetensors') and os.path.isfile(tmp_path / 'hf' / 'config.json')
    write_ckpt(tmp_path / 'g', MoEGPT(MoEGPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16,
                                                   n_experts=4, top_k=2)))
    r = subprocess.run([sys.executable, 'export.py', f'--out_dir={tmp_path / "g"}', f'--to={tmp_path / "g_hf"}'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'has no HF class' in r.stderr and '--format=native' in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr and not os.path.exists(tmp_path / 'g_hf')


# ----------------------------------------------------------------------------- 5. configs


@pytest.mark.parametrize('family', hf.MOE_FAMILIES)
def test_family_config_is_small_cpu_trainable_and_exportable(family):
    import configurator
    cfg = {}  # the chain the config's header gives: the CPU recipe, then the family's architecture
    for name in ('moe_8e_cpu', f'{family}_tiny'):
        cfg.update(configurator._read_file(str(REPO / 'config' / f'{name}.py')))
    keys = set(MoEGPTConfig.field_names())
    assert cfg['dataset'] == 'shakespeare_char' and cfg['device'] == 'cpu' and cfg['compile'] is False
    model_cfg = MoEGPTConfig(**{k: v for k, v in cfg.items() if k in keys and v is not None}, vocab_size=65)
    assert hf.hf_family(model_cfg)[0] == family
    for d in ('n_embd', 'expert_hidden', 'head_dim'):
        assert getattr(model_cfg, d) % 8 == 0, d
    model = MoEGPT(model_cfg)
    assert model.get_num_params().total < 6e6
    idx = torch.randint(0, 65, (2, 16))
    _, loss, _ = model(idx, idx)
    loss.backward()
    assert math.isfinite(loss.item())


# ----------------------------------------------------------------------------- train.py --init_from=hf:PATH


def test_train_py_fine_tunes_an_imported_mixtral(shakespeare_char_dir, tmp_path):
    """train.py --init_from=hf:DIR: the checkpoint's shape and routing, train.py's other keys; a dry run
    reads the config only; the run trains (finite losses) and its checkpoint holds the Mixtral shape."""
    import json
    t = pytest.importorskip('transformers')
    t.logging.set_verbosity_error()
    cfg = tiny_hf_config('mixtral')
    cfg.vocab_size = 96  # shakespeare_char has 65
    torch.manual_seed(0)
    d = tmp_path / 'mixtral'
    t.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    args = [sys.executable, 'train.py', f'--init_from=hf:{d}', f'--data_dir={shakespeare_char_dir}',
            f'--out_dir={tmp_path / "out"}', '--device=cpu', '--compile=False', '--block_size=32', '--batch_size=4',
            '--max_iters=6', '--eval_interval=6', '--eval_iters=2', '--log_interval=1', '--warmup_iters=0',
            '--lr_decay_iters=6', '--dropout=0.0']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run(args + ['--dry_run'], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and 'every check passed' in r.stdout, r.stderr
    assert not (tmp_path / 'out').exists()
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(tmp_path / 'out' / 'ckpt.pt', map_location='cpu', weights_only=False)
    a = ck['model_args']
    assert (a['n_experts'], a['top_k'], a['norm'], a['position'], a['n_kv_head'], a['vocab_size']) == \
        (4, 2, 'rmsnorm', 'rope', 2, 96)
    assert a['aux_loss_coef'] == pytest.approx(2 * 0.02)  # HF's router_aux_loss_coef, mapped (top_k x c)
    losses = [json.loads(l)['ce'] for l in (tmp_path / 'out' / 'log.jsonl').read_text().splitlines()
              if json.loads(l)['type'] == 'train']
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    r = subprocess.run([sys.executable, 'train.py', '--init_from=hf:/no/such/dir', f'--data_dir={shakespeare_char_dir}',
                        '--device=cpu'], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "init_from='hf:/no/such/dir': cannot load it" in r.stderr and 'Traceback' not in r.stderr


def test_preempted_hf_start_prints_a_resume_command_that_resumes(shakespeare_char_dir, tmp_path):
    """A run started from a checkpoint (--init_from=hf:DIR) got its shape from it: the resume command that
    SIGTERM prints passes those fixed fields (train.py's _fixed), so it resumes instead of refusing a
    different model config."""
    import shlex
    import signal
    t = pytest.importorskip('transformers')
    t.logging.set_verbosity_error()
    cfg = tiny_hf_config('mixtral')
    cfg.vocab_size = 96
    torch.manual_seed(0)
    d = tmp_path / 'mixtral'
    t.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    out = tmp_path / 'out'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, 'train.py', f'--init_from=hf:{d}', f'--data_dir={shakespeare_char_dir}',
                          f'--out_dir={out}', '--device=cpu', '--compile=False', '--block_size=32', '--batch_size=4',
                          '--max_iters=2000', '--eval_interval=1000', '--eval_iters=1', '--log_interval=1',
                          '--warmup_iters=0', '--decay_lr=False'], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        while 'iter 2:' not in (line := p.stdout.readline()):
            assert line, p.stderr.read()
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, stderr
    resume = shlex.split(stdout.split('resume with:\n')[1].splitlines()[0])
    assert "--n_kv_head=2" in resume and "--position='rope'" in resume, resume
    r = subprocess.run([sys.executable, *resume[1:], '--max_iters=6'], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and 'resumed from' in r.stdout, r.stderr[-2000:]

"""
HF transformers checkpoints in and out of MoEGPT: the config and key maps, kept out of model.py.

In, load(): a hub name or a save_pretrained directory of
  GPT-2, Llama, Qwen2, Qwen3 (dense: fine-tune it, or sparse-upcycle it with n_experts > 1),
  Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE (MoE: the checkpoint fixes the experts and the routing),
or a directory export.py wrote in moe-gpt's own format (export_native).
Out, export(): the HF class whose architecture is the model's (hf_family() says which, and why the
others don't fit): GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM for dense
models; MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM for MoE ones.
A GPT-2-style MoE (LayerNorm, learned positions, MoE FFN) has no HF class: export() refuses it,
export_native() writes it as safetensors + config.json that load() (and only moe-gpt) reads back.

The maps are tables of (our key, HF keys, op): 'copy', 'T' (GPT-2's Conv1D stores (in, out)),
'cat' (our fused c_attn = q|k|v and swiglu c_fc = gate|up are HF's separate projections
concatenated), 'experts' (HF stacks experts as (E, out, in), ours (E, in, out)). The same table reads
both ways. transformers' in-memory layout is used (transformers >= 5 fuses each layer's experts into
3-D gate_up_proj / down_proj; older versions and the files on disk keep one Linear per expert:
fuse_experts() brings those to the fused layout first). transformers is imported only in here.
"""
import json
import os
import re
import warnings

import torch

from model import TUNABLE, MoEGPT, MoEGPTConfig

DENSE_FAMILIES = ('gpt2', 'llama', 'qwen2', 'qwen3')
MOE_FAMILIES = ('mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe')
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES
GPT2_ACTS = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu', 'relu': 'relu',
             'silu': 'silu', 'swish': 'silu', 'tanh': 'tanh'}
GPT2_ACT_OUT = {'gelu_tanh': 'gelu_new', 'gelu': 'gelu', 'relu': 'relu', 'silu': 'silu', 'tanh': 'tanh'}
NATIVE_TYPE = 'moe_gpt'  # config.json model_type of export_native's directories
# fields a native directory's config does not fix: the training settings (model.TUNABLE), block_size
_NATIVE_FREE = TUNABLE | {'block_size'}


class UnsupportedCheckpoint(ValueError):
    """An HF architecture (or a feature of it) that MoEGPT does not compute, or a MoEGPT that no HF
    class computes. The message says which and why."""


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError('HF checkpoints need transformers: pip install transformers') from e
    return transformers


# ----------------------------------------------------------------------------- HF config -> ours

def _rope_theta(hc):
    """rope_theta of an HF config (transformers 5: rope_parameters; 4: rope_theta / rope_scaling).
    Only plain rope: scaled variants (llama3, yarn, dynamic, ...) compute other angles."""
    params = getattr(hc, 'rope_parameters', None) or {}
    scaling = getattr(hc, 'rope_scaling', None) or {}
    kind = params.get('rope_type', scaling.get('rope_type', scaling.get('type', 'default')))
    if kind != 'default':
        raise UnsupportedCheckpoint(f'rope_type={kind!r}: only plain rope (rope_type default) is implemented')
    if params.get('partial_rotary_factor', getattr(hc, 'partial_rotary_factor', 1.0)) != 1.0:
        raise UnsupportedCheckpoint('partial_rotary_factor != 1: only full-width rope is implemented')
    return float(params.get('rope_theta', getattr(hc, 'rope_theta', 10000.0)))


def _moe_placement(n_layer, moe_layers):
    """(moe_first_dense, moe_every) that put MoE blocks exactly at moe_layers."""
    for first in range(n_layer + 1):
        for every in range(1, n_layer + 1):
            placed = [i >= first and (i - first) % every == 0 for i in range(n_layer)]
            if placed == [i in moe_layers for i in range(n_layer)]:
                return first, every
    raise UnsupportedCheckpoint(f'MoE blocks at layers {sorted(moe_layers)}: not moe_first_dense + k*moe_every')


def config_args(hc):
    """An HF config -> (family, fixed, defaults): fixed are the MoEGPTConfig fields the checkpoint
    decides (its shapes and its function), defaults the ones an override may change (block_size,
    dropout, training losses)."""
    family = hc.model_type
    if family not in FAMILIES:
        raise UnsupportedCheckpoint(f'model_type {family!r} is not supported; supported: {", ".join(FAMILIES)}')
    if family == 'gpt2':
        act = GPT2_ACTS.get(hc.activation_function)
        if act is None:
            raise UnsupportedCheckpoint(f'GPT-2 activation {hc.activation_function!r} is not supported')
        if not hc.scale_attn_weights or hc.scale_attn_by_inverse_layer_idx or hc.reorder_and_upcast_attn:
            raise UnsupportedCheckpoint('GPT-2 attention variants (scale_attn_weights=False, '
                                        'scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn) are not implemented')
        hidden = hc.n_inner or 4 * hc.n_embd
        fixed = dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, vocab_size=hc.vocab_size, bias=True,
                     activation=act, expert_hidden=hidden, dense_hidden=hidden, norm='layernorm',
                     norm_eps=hc.layer_norm_epsilon, position='learned', n_kv_head=hc.n_head,
                     head_dim=hc.n_embd // hc.n_head, qk_norm='none', qkv_bias=True, attn_out_bias=True,
                     tie_embeddings=bool(getattr(hc, 'tie_word_embeddings', True)))
        return family, fixed, dict(block_size=hc.n_positions, dropout=0.0)

    # Llama-style: RMSNorm, rope, swiglu MLPs / experts, no MLP bias (Llama's mlp_bias aside)
    if hc.hidden_act != 'silu':
        raise UnsupportedCheckpoint(f'hidden_act={hc.hidden_act!r}: only silu (swiglu MLPs) is implemented')
    if getattr(hc, 'use_sliding_window', False) or (family == 'mixtral' and getattr(hc, 'sliding_window', None)):
        raise UnsupportedCheckpoint('sliding-window attention is not implemented')
    n_head = hc.num_attention_heads
    head_dim = getattr(hc, 'head_dim', None) or hc.hidden_size // n_head
    fixed = dict(n_layer=hc.num_hidden_layers, n_head=n_head, n_embd=hc.hidden_size, vocab_size=hc.vocab_size,
                 n_kv_head=getattr(hc, 'num_key_value_heads', None) or n_head, head_dim=head_dim, norm='rmsnorm',
                 norm_eps=hc.rms_norm_eps, position='rope', rope_theta=_rope_theta(hc), activation='swiglu',
                 tie_embeddings=bool(hc.tie_word_embeddings), qk_norm='none', bias=False)
    attention_bias = bool(getattr(hc, 'attention_bias', False))
    fixed.update(qkv_bias=attention_bias, attn_out_bias=attention_bias)
    if family == 'qwen2' or family == 'qwen2_moe':  # q/k/v bias, none on o_proj
        fixed.update(qkv_bias=bool(getattr(hc, 'qkv_bias', True)), attn_out_bias=False)
    if family in ('qwen3', 'qwen3_moe'):
        fixed['qk_norm'] = 'head'
    if family == 'olmoe':
        if hc.clip_qkv is not None:
            raise UnsupportedCheckpoint('OLMoE clip_qkv is not implemented')
        if head_dim != hc.hidden_size // n_head:
            raise UnsupportedCheckpoint("OLMoE's QK-norm assumes head_dim = hidden_size // num_attention_heads")
        fixed['qk_norm'] = 'proj'
    if family == 'llama':
        fixed['bias'] = bool(getattr(hc, 'mlp_bias', False))
    defaults = dict(block_size=hc.max_position_embeddings, dropout=0.0)
    if family in DENSE_FAMILIES:
        fixed.update(expert_hidden=hc.intermediate_size, dense_hidden=hc.intermediate_size)
        return family, fixed, defaults

    # MoE families: softmax over the experts, top-k, dropless
    n_experts = hc.num_local_experts if family == 'mixtral' else hc.num_experts
    fixed.update(n_experts=n_experts, top_k=hc.num_experts_per_tok, router='softmax', n_shared_experts=0,
                 shared_expert_gate=False, norm_topk_prob=True if family == 'mixtral' else bool(hc.norm_topk_prob),
                 routed_scaling_factor=1.0, n_group=1, topk_group=1, granularity=1)
    if family in ('mixtral', 'olmoe'):
        fixed.update(expert_hidden=hc.intermediate_size, dense_hidden=hc.intermediate_size,
                     moe_first_dense=0, moe_every=1)
    else:  # Qwen: moe_intermediate_size experts; dense blocks (intermediate_size) by step / mlp_only_layers
        moe = {i for i in range(hc.num_hidden_layers)
               if i not in (hc.mlp_only_layers or []) and (i + 1) % hc.decoder_sparse_step == 0}
        first, every = _moe_placement(hc.num_hidden_layers, moe)
        fixed.update(expert_hidden=hc.moe_intermediate_size, dense_hidden=hc.intermediate_size,
                     moe_first_dense=first, moe_every=every)
    if family == 'qwen2_moe':  # a gated shared expert, as wide as n_shared_experts routed ones
        n_shared, rest = divmod(hc.shared_expert_intermediate_size, hc.moe_intermediate_size)
        if rest or not n_shared:
            raise UnsupportedCheckpoint(f'shared_expert_intermediate_size={hc.shared_expert_intermediate_size} is '
                                        f'not a multiple of moe_intermediate_size={hc.moe_intermediate_size}')
        fixed.update(n_shared_experts=n_shared, shared_expert_gate=True)
    if family == 'mixtral' and getattr(hc, 'router_jitter_noise', 0):
        warnings.warn(f'Mixtral router_jitter_noise={hc.router_jitter_noise} (training-time input jitter) is '
                      'not implemented; the model computes the same function without it')
    # HF's loss: aux coefficient c on f summing to top_k, pooled over the layers; no z-loss
    defaults.update(aux_loss_coef=hc.num_experts_per_tok * hc.router_aux_loss_coef, balance_scope='pooled',
                    z_loss_coef=0.0, capacity_factor=0.0)
    return family, fixed, defaults


def _merge(fixed, defaults, overrides, where):
    unknown = set(overrides) - set(MoEGPTConfig.field_names())
    if unknown:
        raise ValueError(f'{where}: unknown MoEGPTConfig fields {sorted(unknown)}')
    # an override of a field the checkpoint fixes is refused, unless None ("the checkpoint's") or the same value
    clash = sorted(k for k, v in overrides.items() if k in fixed and v is not None and v != fixed[k])
    if clash:
        raise ValueError(f'{where}: {clash} are fixed by the checkpoint ('
                         + ', '.join(f'{k}={fixed[k]!r}' for k in clash) + ')')
    args = {**defaults, **{k: v for k, v in overrides.items() if k not in fixed}, **fixed}
    return MoEGPTConfig(**args)


# ----------------------------------------------------------------------------- key maps

def _mlp_map(ours, theirs, bias):
    """A swiglu MLP: our c_fc = HF's gate_proj | up_proj, c_proj = down_proj."""
    m = [(ours + 'c_fc.weight', [theirs + 'gate_proj.weight', theirs + 'up_proj.weight'], 'cat'),
         (ours + 'c_proj.weight', [theirs + 'down_proj.weight'], 'copy')]
    if bias:
        m += [(ours + 'c_fc.bias', [theirs + 'gate_proj.bias', theirs + 'up_proj.bias'], 'cat'),
              (ours + 'c_proj.bias', [theirs + 'down_proj.bias'], 'copy')]
    return m


def key_map(cfg, family):
    """[(our key, [HF keys], op)] for a model of config cfg in HF family `family`."""
    if family == 'gpt2':  # our names are GPT-2's; its Conv1D weights are stored (in, out)
        m = [(k, [k], 'copy') for k in ('transformer.wte.weight', 'transformer.wpe.weight',
                                        'transformer.ln_f.weight', 'transformer.ln_f.bias')]
        for i in range(cfg.n_layer):
            p = f'transformer.h.{i}.'
            m += [(p + n, [p + n], 'T' if n.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight')) else 'copy')
                  for n in ('ln_1.weight', 'ln_1.bias', 'attn.c_attn.weight', 'attn.c_attn.bias', 'attn.c_proj.weight',
                            'attn.c_proj.bias', 'ln_2.weight', 'ln_2.bias', 'mlp.c_fc.weight', 'mlp.c_fc.bias',
                            'mlp.c_proj.weight', 'mlp.c_proj.bias')]
    else:
        m = [('transformer.wte.weight', ['model.embed_tokens.weight'], 'copy'),
             ('transformer.ln_f.weight', ['model.norm.weight'], 'copy')]
        for i in range(cfg.n_layer):
            o, h = f'transformer.h.{i}.', f'model.layers.{i}.'
            m += [(o + 'ln_1.weight', [h + 'input_layernorm.weight'], 'copy'),
                  (o + 'ln_2.weight', [h + 'post_attention_layernorm.weight'], 'copy'),
                  (o + 'attn.c_attn.weight', [h + f'self_attn.{p}_proj.weight' for p in 'qkv'], 'cat'),
                  (o + 'attn.c_proj.weight', [h + 'self_attn.o_proj.weight'], 'copy')]
            if cfg.qkv_bias:
                m.append((o + 'attn.c_attn.bias', [h + f'self_attn.{p}_proj.bias' for p in 'qkv'], 'cat'))
            if cfg.attn_out_bias:
                m.append((o + 'attn.c_proj.bias', [h + 'self_attn.o_proj.bias'], 'copy'))
            if cfg.qk_norm != 'none':
                m += [(o + f'attn.{n}.weight', [h + f'self_attn.{n}.weight'], 'copy') for n in ('q_norm', 'k_norm')]
            if not cfg.is_moe_layer(i):
                m += _mlp_map(o + 'mlp.', h + 'mlp.', cfg.bias)
                continue
            m += [(o + 'mlp.router.gate.weight', [h + 'mlp.gate.weight'], 'copy'),
                  (o + 'mlp.experts.w1_EDF', [h + 'mlp.experts.gate_up_proj'], 'experts'),
                  (o + 'mlp.experts.w2_EHD', [h + 'mlp.experts.down_proj'], 'experts')]
            if cfg.n_shared_experts:  # Qwen2-MoE's one (wide) shared expert and its gate
                m += _mlp_map(o + 'mlp.shared_experts.', h + 'mlp.shared_expert.', cfg.bias)
            if cfg.shared_expert_gate:
                m.append((o + 'mlp.shared_expert_gate.weight', [h + 'mlp.shared_expert_gate.weight'], 'copy'))
    if not cfg.tie_embeddings:
        m.append(('lm_head.weight', ['lm_head.weight'], 'copy'))
    return m


_LEGACY_EXPERT = re.compile(
    r'(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$')
_ROLE = {'w1': 'gate', 'gate_proj': 'gate', 'w3': 'up', 'up_proj': 'up', 'w2': 'down', 'down_proj': 'down'}


def fuse_experts(sd):
    """transformers < 5 and the safetensors files keep one Linear per expert (Mixtral: block_sparse_moe
    .experts.e.w1/w3/w2; OLMoE, Qwen: mlp.experts.e.gate_proj/up_proj/down_proj); transformers 5
    fuses a layer's experts into gate_up_proj (E, 2I, D) and down_proj (E, D, I). Returns sd in the
    fused layout (a fused sd comes back as it is)."""
    out, experts = {}, {}
    for k, v in sd.items():
        m = _LEGACY_EXPERT.match(k)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[_ROLE[m.group(3)]] = v
        else:
            out[k.replace('.block_sparse_moe.', '.mlp.')] = v
    for layer, es in experts.items():
        es = [es[e] for e in range(len(es))]
        out[layer + '.mlp.experts.gate_up_proj'] = torch.stack([torch.cat([e['gate'], e['up']]) for e in es])
        out[layer + '.mlp.experts.down_proj'] = torch.stack([e['down'] for e in es])
    return out


def hf_to_ours(sd_hf, cfg, family):
    """HF state dict (fused experts) -> ours, for a MoEGPT of config cfg."""
    sd = {}
    for ours, theirs, op in key_map(cfg, family):
        missing = [k for k in theirs if k not in sd_hf]
        if missing:
            raise UnsupportedCheckpoint(f'{family} checkpoint has no {missing[0]} (needed for {ours})')
        ts = [sd_hf[k] for k in theirs]
        sd[ours] = (ts[0].t() if op == 'T' else ts[0].transpose(1, 2) if op == 'experts'
                    else torch.cat(ts) if op == 'cat' else ts[0])
    return sd


def ours_to_hf(sd, cfg, family, shapes):
    """Our state dict -> HF's, the key map read backwards; shapes: HF key -> shape (how to split a 'cat')."""
    out = {}
    for ours, theirs, op in key_map(cfg, family):
        t = sd[ours]
        if op == 'cat':
            for k, part in zip(theirs, t.split([shapes[k][0] for k in theirs])):
                out[k] = part
        else:
            out[theirs[0]] = t.t() if op == 'T' else t.transpose(1, 2) if op == 'experts' else t
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- load

def _native_dir(name_or_path):
    path = os.path.join(str(name_or_path), 'config.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        c = json.load(f)
    return c if c.get('model_type') == NATIVE_TYPE else None


# The GPT-2 hub checkpoints' shapes (nanoGPT's table; the rest is GPT2Config's defaults): their config
# without the network, so a dry run of train.py --init_from=gpt2 checks it offline (load_config).
GPT2_HUB = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
            'gpt2-xl': (48, 25, 1600)}


def _hf_config(name_or_path):
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path)
    except OSError:  # offline, or no such name
        if name_or_path not in GPT2_HUB:
            raise
        n_layer, n_head, n_embd = GPT2_HUB[name_or_path]
        return transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def fixed_fields(name_or_path):
    """The MoEGPTConfig fields the checkpoint decides (reads its config only, no weights). An
    override of one of them is refused by load() unless it equals the checkpoint's value; the
    other fields are free (block_size, dropout, the losses; for a dense checkpoint the MoE fields:
    n_experts > 1 upcycles it)."""
    native = _native_dir(name_or_path)
    if native is not None:
        return frozenset(f for f in MoEGPTConfig.field_names() if f not in _NATIVE_FREE)
    return frozenset(config_args(_hf_config(name_or_path))[1])


def load_config(name_or_path, **overrides):
    """The MoEGPTConfig load() would build (no weights read)."""
    native = _native_dir(name_or_path)
    if native is not None:
        fixed = {k: v for k, v in native['moe_gpt'].items() if k not in _NATIVE_FREE}
        free = {k: v for k, v in native['moe_gpt'].items() if k in _NATIVE_FREE}
        return _merge(fixed, free, overrides, f'load({name_or_path!r})')
    family, fixed, defaults = config_args(_hf_config(name_or_path))
    return _merge(fixed, defaults, overrides, f'load({name_or_path!r})')


def load(name_or_path, upcycle_noise=0.0, **overrides):
    """An HF checkpoint (hub name or save_pretrained directory), or an export_native directory, as a
    MoEGPT (float32, train mode). overrides set MoEGPTConfig fields; the ones the checkpoint fixes
    (fixed_fields) may only be None or repeat the checkpoint's value.

    A dense checkpoint (GPT-2, Llama, Qwen2, Qwen3) with n_experts > 1 is sparse-upcycled
    (Komatsuzaki et al. 2022): every expert of an MoE block starts as a copy of that block's dense
    MLP (plus Gaussian noise of std upcycle_noise x the weight's std, if asked), the router small.
    With the k gates renormalised (norm_topk_prob: the default for top_k > 1; top-1 must ask for it)
    and no noise the upcycled model computes exactly the dense one's function at step 0. Shared
    experts (n_shared_experts) start with their output projection at zero, so they add nothing.

    Raises ImportError (no transformers), OSError (no such directory / hub name, no network),
    UnsupportedCheckpoint (an architecture or feature MoEGPT does not compute), ValueError (bad
    overrides)."""
    native = _native_dir(name_or_path)
    if native is not None:
        return _load_native(name_or_path, overrides)
    transformers = _transformers()
    hc = _hf_config(name_or_path)
    family, fixed, defaults = config_args(hc)
    config = _merge(fixed, defaults, overrides, f'load({name_or_path!r})')
    if family == 'gpt2' and config.block_size > hc.n_positions:  # a learned table can be cut, not grown
        raise ValueError(f'load({name_or_path!r}): block_size={config.block_size} is longer than the '
                         f'checkpoint\'s n_positions={hc.n_positions}')
    hf = transformers.AutoModelForCausalLM.from_pretrained(name_or_path)  # its own dtype; copied into fp32
    sd_hf = fuse_experts(hf.state_dict())
    del hf
    if family == 'gpt2' and 'transformer.wpe.weight' in sd_hf:
        sd_hf['transformer.wpe.weight'] = sd_hf['transformer.wpe.weight'][:config.block_size]
    upcycle = family in DENSE_FAMILIES and config.n_experts > 1
    if upcycle and not config.norm_topk_prob:
        print('load: norm_topk_prob=False (the default for top_k=1), so the upcycled model starts away from the '
              'dense one; norm_topk_prob=True keeps it, but then a top-1 router gets no gradient from the LM loss')
    model = MoEGPT(config)
    dense_cfg = MoEGPTConfig(**{**vars(config), 'n_experts': 1, 'shared_expert_gate': False, 'n_shared_experts': 0,
                                'n_group': 1, 'topk_group': 1}) if upcycle else config
    sd = hf_to_ours(sd_hf, dense_cfg, family)
    params = model.state_dict()
    if not upcycle:  # every tensor of the model comes from the checkpoint, in its shape
        missing = [k for k in params if k not in sd and not (k == 'lm_head.weight' and config.tie_embeddings)]
        bad = [k for k, v in sd.items() if k not in params or params[k].shape != v.shape]
        if missing or bad:
            raise UnsupportedCheckpoint(f'{family} checkpoint does not fit the model: missing {missing[:3]}, '
                                        f'unexpected or misshapen {bad[:3]}')
    with torch.no_grad():
        for k, v in sd.items():
            if k in params and params[k].shape == v.shape:  # upcycling: the MoE blocks' MLPs go to _upcycle
                params[k].copy_(v)
        if upcycle:
            _upcycle(model, sd, upcycle_noise)
    return model


def _upcycle(model, dense_sd, noise):
    """Every expert of each MoE block := that block's dense MLP (w1 = c_fc^T, w2 = c_proj^T); the
    shared experts, if any, get c_fc's copy too and a zero c_proj (no output at step 0)."""
    for i, block in enumerate(model.transformer.h):
        if not block.is_moe:
            continue
        pre, ex = f'transformer.h.{i}.mlp.', block.mlp.experts
        for ours, theirs, t in ((ex.w1_EDF, 'c_fc.weight', True), (ex.w2_EHD, 'c_proj.weight', True),
                                (ex.b1_EF, 'c_fc.bias', False), (ex.b2_ED, 'c_proj.bias', False)):
            if ours is None:
                continue
            w = dense_sd[pre + theirs]
            w = w.t() if t else w
            ours.copy_(w.expand_as(ours))
            if noise > 0 and ours.dim() == 3:
                ours.add_(torch.randn_like(ours) * noise * w.std())
        shared = block.mlp.shared_experts
        if shared is not None:
            if shared.c_fc.weight.shape == dense_sd[pre + 'c_fc.weight'].shape:
                shared.c_fc.weight.copy_(dense_sd[pre + 'c_fc.weight'])
            torch.nn.init.zeros_(shared.c_proj.weight)
            if shared.c_proj.bias is not None:
                torch.nn.init.zeros_(shared.c_proj.bias)


# ----------------------------------------------------------------------------- export

def hf_family(cfg):
    """(family, reasons): the HF family whose architecture is exactly cfg's (None if there is none),
    and for every family the list of reasons it does not fit (empty for the one that does)."""
    c = cfg
    moe = c.n_experts > 1
    eval_cf = c.capacity_factor if c.eval_capacity_factor is None else c.eval_capacity_factor
    llama_style = [r for ok, r in (
        (c.norm == 'rmsnorm', f"norm={c.norm!r} (needs 'rmsnorm')"),
        (c.position == 'rope', f"position={c.position!r} (needs 'rope')"),
        (c.activation == 'swiglu', f"activation={c.activation!r} (needs 'swiglu')")) if not ok]
    no_bias = [] if not c.bias else ['bias=True (the MoE families have no MLP / expert biases)']
    routing = [r for ok, r in (
        (c.router == 'softmax', f"router={c.router!r} (needs 'softmax': softmax over the experts, then top-k)"),
        (eval_cf == 0, 'capacity in eval mode (HF is dropless: set eval_capacity_factor=0)'),
        (c.routed_scaling_factor == 1.0, 'routed_scaling_factor != 1'),
        (c.n_group == 1, 'group-limited routing (n_group > 1)')) if not ok]
    all_moe = [] if c.moe_first_dense == 0 and c.moe_every == 1 else ['dense blocks between the MoE blocks']
    qk = lambda want: [] if c.qk_norm == want else [f'qk_norm={c.qk_norm!r} (needs {want!r})']  # noqa: E731
    one_attn_bias = [] if c.qkv_bias == c.attn_out_bias else ['qkv_bias != attn_out_bias (one attention_bias)']
    no_shared = [] if not c.n_shared_experts else ['shared experts']
    default_head = [] if c.head_dim * c.n_head == c.n_embd else ['head_dim != n_embd // n_head']
    dense_only = [] if not moe else ['experts (n_experts > 1)']
    moe_only = [] if moe else ['no experts (n_experts = 1)']
    reasons = {
        'gpt2': dense_only + [r for ok, r in (
            (c.norm == 'layernorm', f"norm={c.norm!r} (needs 'layernorm')"),
            (c.position == 'learned', f"position={c.position!r} (needs 'learned')"),
            (c.activation in GPT2_ACT_OUT, f'activation={c.activation!r} (needs one of {", ".join(GPT2_ACT_OUT)})'),
            (c.n_kv_head == c.n_head, 'grouped-query attention'),
            (c.qk_norm == 'none', 'QK-norm')) if not ok] + default_head,
        'llama': dense_only + llama_style + qk('none') + one_attn_bias,
        'qwen2': dense_only + llama_style + qk('none') + no_bias + [r for ok, r in (
            (c.qkv_bias, 'no q/k/v bias'), (not c.attn_out_bias, 'attention output bias')) if not ok],
        'qwen3': dense_only + llama_style + qk('head') + no_bias + one_attn_bias,
        'mixtral': moe_only + llama_style + no_bias + routing + all_moe + qk('none') + no_shared + [r for ok, r in (
            (not c.qkv_bias and not c.attn_out_bias, 'attention biases'),
            (c.norm_topk_prob, 'norm_topk_prob=False (Mixtral renormalises the top-k gates)')) if not ok],
        'olmoe': moe_only + llama_style + no_bias + routing + all_moe + qk('proj') + no_shared + one_attn_bias + default_head,
        'qwen2_moe': moe_only + llama_style + no_bias + routing + qk('none') + [r for ok, r in (
            (c.n_shared_experts >= 1 and c.shared_expert_gate, 'no gated shared expert (n_shared_experts >= 1, '
                                                               'shared_expert_gate=True)'),
            (not c.attn_out_bias, 'attention output bias')) if not ok],
        'qwen3_moe': moe_only + llama_style + no_bias + routing + qk('head') + no_shared + one_attn_bias,
    }
    fits = [f for f in FAMILIES if not reasons[f]]
    return (fits[0] if fits else None), reasons


def hf_config(cfg, family):
    """The transformers config of family `family` for a MoEGPT of config cfg."""
    t = _transformers()
    c = cfg
    if family == 'gpt2':
        eos = 50256 if c.vocab_size > 50256 else None
        return t.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                            n_head=c.n_head, n_inner=c.expert_hidden, activation_function=GPT2_ACT_OUT[c.activation],
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=c.norm_eps,
                            tie_word_embeddings=c.tie_embeddings, bos_token_id=eos, eos_token_id=eos)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, max_position_embeddings=c.block_size,
                  rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, hidden_act='silu', attention_dropout=0.0,
                  tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if c.head_dim * c.n_head != c.n_embd or family in ('llama', 'qwen3', 'qwen3_moe', 'mixtral'):
        common['head_dim'] = c.head_dim
    moe = dict(num_experts_per_tok=c.top_k, router_aux_loss_coef=c.aux_loss_coef / c.top_k)
    dense_layers = [i for i in range(c.n_layer) if not c.is_moe_layer(i)]
    if family == 'llama':
        return t.LlamaConfig(**common, intermediate_size=c.expert_hidden, attention_bias=c.qkv_bias, mlp_bias=c.bias)
    if family == 'qwen2':
        return t.Qwen2Config(**common, intermediate_size=c.expert_hidden, use_sliding_window=False)
    if family == 'qwen3':
        return t.Qwen3Config(**common, intermediate_size=c.expert_hidden, attention_bias=c.qkv_bias,
                             use_sliding_window=False)
    if family == 'mixtral':
        return t.MixtralConfig(**common, **moe, intermediate_size=c.expert_hidden, num_local_experts=c.n_experts,
                               sliding_window=None)
    if family == 'olmoe':
        return t.OlmoeConfig(**common, **moe, intermediate_size=c.expert_hidden, num_experts=c.n_experts,
                             norm_topk_prob=c.norm_topk_prob, attention_bias=c.qkv_bias, clip_qkv=None)
    qwen = dict(**common, **moe, intermediate_size=c.dense_hidden, moe_intermediate_size=c.expert_hidden,
                num_experts=c.n_experts, norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                mlp_only_layers=dense_layers, use_sliding_window=False)
    if family == 'qwen2_moe':
        return t.Qwen2MoeConfig(**qwen, shared_expert_intermediate_size=c.n_shared_experts * c.expert_hidden,
                                qkv_bias=c.qkv_bias)
    return t.Qwen3MoeConfig(**qwen, attention_bias=c.qkv_bias)


def export(model, out_dir, family=None):
    """Write model as an HF directory (config.json + model.safetensors, by transformers'
    save_pretrained, so in the files' usual layout) that AutoModelForCausalLM.from_pretrained reads.
    family: one of FAMILIES, or None to take the one hf_family() finds. Returns the family.
    Raises UnsupportedCheckpoint, saying why each family does not fit, when none does."""
    cfg = model.config
    found, reasons = hf_family(cfg)
    if family is not None and family not in reasons:
        raise ValueError(f'family={family!r} must be one of {FAMILIES}')
    if family is not None and reasons[family]:
        raise UnsupportedCheckpoint(f'{family} does not fit: ' + '; '.join(reasons[family])
                                    + (f' ({found} does: leave family unset)' if found else ''))
    family = family or found
    if family is None:
        why = '\n'.join(f'  {f}: ' + '; '.join(reasons[f]) for f in FAMILIES)
        kind = ('a GPT-2-style MoE (LayerNorm, learned positions, MoE feed-forward) has no HF class; '
                'export.py --format=native writes it as safetensors + config.json for moe-gpt'
                if cfg.n_experts > 1 and cfg.norm == 'layernorm' and cfg.position == 'learned'
                else 'no HF class computes this architecture')
        raise UnsupportedCheckpoint(f'{kind}; why each family does not fit:\n{why}')
    hf = _transformers().AutoModelForCausalLM.from_config(hf_config(cfg, family))
    hf_sd = hf.state_dict()
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if 'lm_head.weight' not in ours or cfg.tie_embeddings:
        ours['lm_head.weight'] = ours['transformer.wte.weight']
    if family == 'gpt2':  # GPT-2's Linears and LayerNorms always have biases: ours, absent, are zeros
        params = dict(hf.named_parameters())
        ours.update({k: torch.zeros(p.shape) for k, p in params.items() if k.endswith('.bias') and k not in ours})
    new = ours_to_hf(ours, cfg, family, {k: v.shape for k, v in hf_sd.items()})
    if cfg.tie_embeddings:
        new['lm_head.weight'] = new['model.embed_tokens.weight' if family != 'gpt2' else 'transformer.wte.weight']
    missing = [k for k in dict(hf.named_parameters(remove_duplicate=False)) if k not in new]
    if missing:
        raise UnsupportedCheckpoint(f'export to {family}: nothing maps to {missing[:3]}')
    bad = [k for k, v in new.items() if k not in hf_sd or hf_sd[k].shape != v.shape]
    if bad:
        raise UnsupportedCheckpoint(f'export to {family}: {bad[0]} has shape {tuple(new[bad[0]].shape)}, '
                                    f'{family} wants {tuple(hf_sd[bad[0]].shape) if bad[0] in hf_sd else "no such key"}')
    hf.load_state_dict(new, strict=False)
    hf.save_pretrained(out_dir)
    return family


def export_native(model, out_dir):
    """Any MoEGPT (a GPT-2-style MoE included) as model.safetensors (our parameter names and
    buffers; no pickle) + config.json (model_type 'moe_gpt', our config fields). load() reads it
    back; transformers cannot (no HF class computes a GPT-2 block with an MoE feed-forward)."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop('lm_head.weight', None)  # the same tensor as wte (safetensors refuses shared storage)
    save_file(sd, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
        json.dump({'model_type': NATIVE_TYPE, 'architectures': ['MoEGPT'],
                   'note': 'moe-gpt native format: read it with hf.load (transformers has no class for it)',
                   'moe_gpt': vars(model.config)}, f, indent=2)


def _load_native(path, overrides):
    from safetensors.torch import load_file
    model = MoEGPT(load_config(path, **overrides))
    sd = load_file(os.path.join(str(path), 'model.safetensors'))
    if model.config.tie_embeddings:
        sd['lm_head.weight'] = sd['transformer.wte.weight']
    if 'transformer.wpe.weight' in sd:
        sd['transformer.wpe.weight'] = sd['transformer.wpe.weight'][:model.config.block_size]
    model.load_state_dict(sd)
    return model

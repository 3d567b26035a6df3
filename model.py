"""
MoEGPT: nanoGPT's GPT-2 decoder whose feed-forward blocks can be Mixture-of-Experts layers.
The defaults are GPT-2's block, parameter for parameter; block options (RMSNorm, rope, grouped-query
attention, QK-norm, untied embeddings, per-projection biases) build the Llama-style MoE families
(Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE). hf.py maps their HF checkpoints in and out.

Reading order: config -> attention -> router -> experts -> MoE layer -> block -> model.

Shape suffixes name every dispatch tensor (torchtitan's convention):
  B batch, S sequence, T tokens (= B*S), D n_embd, E n_experts, K top_k,
  F expert hidden width (2*expert_hidden for swiglu), N = T*K token->expert assignments,
  G expert groups and M experts per group (group-limited routing).

Dispatch is dropless by default: the N assignments are sorted by expert, every expert runs on its
contiguous slice (one grouped matmul for all experts, or a loop over the slices), and the results are
gathered back to their tokens and summed, weighted by the gates. No Python loop over tokens, no
tokens x experts x capacity one-hot tensors. Aux losses and routing statistics are *returned*, never
stored on the module.
"""
import inspect
import math
import warnings
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ('gelu', 'gelu_tanh', 'relu', 'silu', 'swish', 'tanh', 'swiglu')
EXPERT_IMPLS = ('auto', 'grouped', 'loop')
ROUTERS = ('softmax', 'noisy_topk', 'sigmoid', 'expert_choice', 'soft')
BALANCE_SCOPES = ('micro_batch', 'sequence', 'global')
CAPACITY_PRIORITIES = ('choice', 'position')
CAPACITY_SCOPES = ('micro_batch', 'sequence')
AUX_LOSS_LAYERS = ('mean', 'pooled')
NORMS = ('layernorm', 'rmsnorm')
POSITIONS = ('learned', 'rope')
QK_NORMS = ('none', 'head', 'proj')
HAS_GROUPED_MM = hasattr(F, 'grouped_mm')
# expert_impl='auto' (use_grouped_mm): grouped_mm on GPUs in bf16 (one kernel for all experts). On CPU the
# slice loop, measured faster at every expert count on a 2-core machine (fp32, fwd+bwd, n_embd 384,
# 8192 tokens, equal active FLOPs, 1 thread): loop/grouped time 0.93 at 8e top-2, 0.86 at 16e top-4,
# 0.95 at 32e top-8, 0.98 at 64e top-8 (grouped_mm's CPU path is a loop of its own).


@dataclass
class MoEGPTConfig:
    # --- nanoGPT's fields, same meanings
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears (experts included) and LayerNorms, like GPT-2
    # --- block options: the defaults are GPT-2's block. Llama-style families (Mixtral, OLMoE, Qwen-MoE)
    # use rmsnorm + rope + swiglu, bias=False, untied embeddings, and some of GQA, QK-norm, q/k/v bias
    norm: str = 'layernorm'  # layernorm (GPT-2) | rmsnorm (Llama: no mean, no bias, computed in fp32)
    norm_eps: float = 1e-5  # epsilon of every norm (GPT-2 and nn.LayerNorm: 1e-5)
    position: str = 'learned'  # learned (GPT-2's wpe table) | rope (rotary, on q and k; no table)
    rope_theta: float = 10000.0  # rope: the base of the rotation frequencies
    n_kv_head: Optional[int] = None  # grouped-query attention: key/value heads, each shared by
    # n_head // n_kv_head query heads; None = n_head (multi-head attention)
    head_dim: Optional[int] = None  # width of one head; None = n_embd // n_head (Qwen3-MoE sets its own)
    qk_norm: str = 'none'  # none | head (Qwen3: RMSNorm over each head's q and k) | proj (OLMoE: over the
    # whole q and k projections, before the split into heads)
    qkv_bias: Optional[bool] = None  # bias of the q/k/v projection; None = bias (Qwen2: True, bias=False)
    attn_out_bias: Optional[bool] = None  # bias of attention's output projection; None = bias
    tie_embeddings: bool = True  # lm_head shares wte's weight (GPT-2); False = its own matrix
    # --- Mixture of Experts
    n_experts: int = 1  # 1 = plain dense GPT (exactly nanoGPT's parameters)
    top_k: int = 2
    moe_every: int = 1  # every N-th block (after moe_first_dense) is an MoE block
    moe_first_dense: int = 0  # the first K blocks stay dense
    dense_hidden: Optional[int] = None  # MLP width of the dense blocks of an MoE model; None = 4*n_embd
    # (a dense model, n_experts=1, has expert_hidden wide MLPs, as before)
    expert_hidden: Optional[int] = None  # hidden width of one expert; None = 4*n_embd // granularity
    granularity: int = 1  # DeepSeekMoE's fine-grained split m: experts 1/m as wide (use m x n_experts, top_k)
    activation: str = 'gelu'  # gelu | gelu_tanh (GPT-2's) | relu | silu | swish | tanh | swiglu
    moe_dropout: Optional[float] = None  # dropout on the MoE output; None = use dropout
    capacity_factor: float = 0.0  # 0 = dropless; >0 = Switch capacity, overflow dropped
    eval_capacity_factor: Optional[float] = None  # in eval mode; None = same as capacity_factor
    capacity_priority: str = 'choice'  # which assignments capacity keeps: choice (GShard: all first
    # choices of the batch first; not causal) | position (earlier positions first: causal)
    capacity_scope: str = 'micro_batch'  # capacity counted over the micro_batch (GShard) | per sequence
    # (HF's Switch Transformers: every sequence gets its own ceil(cf*S*K/E) slots per expert)
    norm_topk_prob: bool = True  # renormalise the k gates to sum to 1 (Mixtral); False = Switch
    router_fp32: bool = True  # router matmul + softmax in fp32 even under autocast
    router_init_std: float = 0.01  # small router init: near-uniform routing at step 0 (seed 002)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    z_loss_coef: float = 0.001  # ST-MoE router z-loss weight
    expert_impl: str = 'auto'  # grouped (grouped_mm) | loop (per-expert slices) | auto
    # --- routing and expert designs (docs/routing_zoo.md)
    router: str = 'softmax'  # softmax | noisy_topk | sigmoid | expert_choice | soft
    n_shared_experts: int = 0  # always-on experts (each expert_hidden wide) added to the routed output
    bias_update_rate: float = 0.001  # sigmoid router: expert_bias step per optimizer step (aux-free balancing)
    balance_scope: str = 'micro_batch'  # aux loss over the micro_batch | each sequence | global (all ranks)
    aux_loss_layers: str = 'mean'  # mean of the per-layer aux losses | pooled (HF: the layers' expert
    # counts and probabilities pooled before the f*P product). HF's router_aux_loss_coef c is our
    # aux_loss_coef top_k*c (HF's f sums to top_k, ours to 1; tests/test_hf.py proves it)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared experts' output x sigmoid(x W), W: D -> 1
    routed_scaling_factor: float = 1.0  # DeepSeek-V3: the routed experts' gates x this
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts in n_group equal groups; a token
    topk_group: int = 1  # picks its top_k among the experts of its topk_group best groups (a group's
    # score: the sum of its 2 best scores). Under expert parallelism, bounds each token's fan-out

    def __post_init__(self):
        if self.granularity < 1 or (4 * self.n_embd) % self.granularity:
            raise ValueError(f'MoEGPTConfig.granularity={self.granularity!r} must be >= 1 and divide 4*n_embd={4 * self.n_embd}')
        if self.expert_hidden is None:
            self.expert_hidden = 4 * self.n_embd // self.granularity
        if self.activation == 'swish':
            self.activation = 'silu'
        misaligned = ("must be a multiple of 8 with expert_impl='grouped' (grouped_mm's 16-byte row strides in "
                      "bf16); or use expert_impl='auto', which takes the loop when misaligned")
        checks = [
            ('block_size', self.block_size >= 1, 'must be >= 1'),
            ('vocab_size', self.vocab_size >= 1, 'must be >= 1'),
            ('n_layer', self.n_layer >= 1, 'must be >= 1'),
            ('n_head', self.n_head >= 1, 'must be >= 1'),
            ('n_embd', self.n_embd >= 1 and (self.head_dim is not None or self.n_embd % max(self.n_head, 1) == 0),
             f'must be a positive multiple of n_head={self.n_head} (or set head_dim)'),
            ('norm', self.norm in NORMS, f'must be one of {NORMS}'),
            ('norm_eps', self.norm_eps > 0, 'must be > 0'),
            ('position', self.position in POSITIONS, f'must be one of {POSITIONS}'),
            ('rope_theta', self.rope_theta > 0, 'must be > 0'),
            ('n_kv_head', self.n_kv_head is None or (self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0),
             f'must be None or divide n_head={self.n_head} (a key/value head serves n_head // n_kv_head query heads)'),
            ('head_dim', self.head_dim is None or self.head_dim >= 1, 'must be None or >= 1'),
            ('head_dim', self.position != 'rope' or (self.head_dim or self.n_embd // max(self.n_head, 1)) % 2 == 0,
             'must be even with position=rope (rope rotates pairs of dimensions)'),
            ('qk_norm', self.qk_norm in QK_NORMS, f'must be one of {QK_NORMS}'),
            ('dense_hidden', self.dense_hidden is None or self.dense_hidden >= 1, 'must be None or >= 1'),
            ('dropout', 0.0 <= self.dropout < 1.0, 'must be in [0, 1)'),
            ('n_experts', self.n_experts >= 1, 'must be >= 1'),
            ('top_k', 1 <= self.top_k <= self.n_experts or self.n_experts == 1,
             f'must be in [1, n_experts={self.n_experts}]'),
            ('moe_every', self.moe_every >= 1, 'must be >= 1'),
            ('moe_first_dense', 0 <= self.moe_first_dense, 'must be >= 0'),
            ('expert_hidden', self.expert_hidden >= 1, 'must be >= 1'),
            ('activation', self.activation in ACTIVATIONS, f'must be one of {ACTIVATIONS}'),
            ('moe_dropout', self.moe_dropout is None or 0.0 <= self.moe_dropout < 1.0,
             'must be None or in [0, 1)'),
            ('capacity_factor', self.capacity_factor >= 0, 'must be >= 0 (0 = dropless)'),
            ('eval_capacity_factor', self.eval_capacity_factor is None or self.eval_capacity_factor >= 0,
             'must be None or >= 0 (0 = dropless)'),
            ('capacity_priority', self.capacity_priority in CAPACITY_PRIORITIES, f'must be one of {CAPACITY_PRIORITIES}'),
            ('router_init_std', self.router_init_std >= 0, 'must be >= 0'),
            ('aux_loss_coef', self.aux_loss_coef >= 0, 'must be >= 0'),
            ('z_loss_coef', self.z_loss_coef >= 0, 'must be >= 0'),
            ('expert_impl', self.expert_impl in EXPERT_IMPLS, f'must be one of {EXPERT_IMPLS}'),
            # bf16 grouped_mm rejects row strides that are not multiples of 16 bytes (8 elements)
            ('n_embd', self.expert_impl != 'grouped' or self.n_embd % 8 == 0, misaligned),
            ('expert_hidden', self.expert_impl != 'grouped' or self.expert_hidden % 8 == 0, misaligned),
            ('router', self.router in ROUTERS, f'must be one of {ROUTERS}'),
            ('n_shared_experts', self.n_shared_experts >= 0, 'must be >= 0'),
            ('bias_update_rate', self.bias_update_rate >= 0, 'must be >= 0'),
            ('balance_scope', self.balance_scope in BALANCE_SCOPES, f'must be one of {BALANCE_SCOPES}'),
            ('capacity_scope', self.capacity_scope in CAPACITY_SCOPES, f'must be one of {CAPACITY_SCOPES}'),
            ('aux_loss_layers', self.aux_loss_layers in AUX_LOSS_LAYERS, f'must be one of {AUX_LOSS_LAYERS}'),
            ('aux_loss_layers', self.aux_loss_layers == 'mean' or self.balance_scope != 'sequence',
             "='pooled' pools whole micro-batches (HF's loss): use it with balance_scope='micro_batch' or 'global'"),
            ('aux_loss_layers', self.aux_loss_layers == 'mean' or self.router != 'expert_choice',
             "='pooled' needs a token-choice router (expert choice has no balance loss)"),
            ('shared_expert_gate', not self.shared_expert_gate or self.n_shared_experts >= 1,
             'needs n_shared_experts >= 1 (it gates their output)'),
            ('routed_scaling_factor', self.routed_scaling_factor > 0, 'must be > 0'),
            ('n_group', self.n_group >= 1 and self.n_experts % self.n_group == 0,
             f'must be >= 1 and divide n_experts={self.n_experts}'),
            ('n_group', self.n_group == 1 or self.router in ('softmax', 'noisy_topk', 'sigmoid'),
             f'> 1 (group-limited routing) needs router softmax, noisy_topk or sigmoid, not {self.router!r}'),
            ('topk_group', 1 <= self.topk_group <= self.n_group, f'must be in [1, n_group={self.n_group}]'),
            ('top_k', self.n_group == 1 or self.top_k <= self.topk_group * (self.n_experts // max(self.n_group, 1)),
             f'must be <= topk_group * n_experts // n_group (the experts of the groups a token may use)'),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f'MoEGPTConfig.{name}={getattr(self, name)!r} {why}')
        # None = follow the other fields; resolved here, so a checkpoint's model_args say what was built
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.attn_out_bias is None:
            self.attn_out_bias = self.bias
        if self.dense_hidden is None:
            self.dense_hidden = 4 * self.n_embd
        if self.n_experts == 1:
            self.top_k = 1  # a single expert is the dense MLP; top_k is moot
        if self.router == 'soft':
            self.top_k = self.n_experts  # every token through every expert

    @property
    def causal(self):
        """Whether a token's output depends only on tokens at its position or earlier, in any
        sequence of the micro-batch: what a causal LM needs. Not so for expert choice (each expert
        ranks all tokens, later ones included) and for capacity with capacity_priority='choice' (a
        later token's first choice can drop an earlier token's second choice; with top-1, sequence
        b's later tokens can drop sequence b+1's earlier ones). With capacity_scope='sequence' and
        top-1, choice order is position order inside each sequence: causal again.
        tests/test_causality.py (and tests/test_hf.py, for capacity_scope) probe it."""
        if self.n_experts == 1:
            return True
        if self.router == 'expert_choice':
            return False
        if not self.has_capacity or self.capacity_priority == 'position':
            return True
        return self.capacity_scope == 'sequence' and self.top_k == 1

    @property
    def batch_dependent(self):
        """Whether a token's output depends on the other sequences of its micro-batch (capacity drops
        counted over the micro-batch, expert choice): then the same text can give other logits in
        another batch."""
        return self.n_experts > 1 and (self.router == 'expert_choice'
                                       or (self.has_capacity and self.capacity_scope == 'micro_batch'))

    @property
    def has_capacity(self):
        return self.capacity_factor > 0 or (self.eval_capacity_factor or 0) > 0

    def is_moe_layer(self, i):
        return (self.n_experts > 1 and i >= self.moe_first_dense
                and (i - self.moe_first_dense) % self.moe_every == 0)

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]


def activation_fn(name, h):
    """Apply the named activation; swiglu splits the hidden in two: silu(gate) * up."""
    if name == 'gelu':
        return F.gelu(h)
    if name == 'gelu_tanh':  # GPT-2's "gelu_new"; needed to reproduce pretrained GPT-2 exactly
        return F.gelu(h, approximate='tanh')
    if name == 'relu':
        return F.relu(h)
    if name == 'silu':
        return F.silu(h)
    if name == 'tanh':
        return torch.tanh(h)
    gate, up = h.chunk(2, dim=-1)  # swiglu
    return F.silu(gate) * up


def fused_adamw_supported(device_type):
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: CUDA only
        return device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters


def compute_dtype(x):
    """The dtype matmuls run in: autocast's if it is on, else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# ----------------------------------------------------------------------------- attention

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Llama, Mixtral, Qwen, OLMoE), in fp32 and cast back before
    the weight, in HF's order, so imported checkpoints give HF's numbers."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config, dim):
    if config.norm == 'rmsnorm':
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_cos_sin(pos_S, head_dim, theta):
    """Rotary embedding tables for positions pos_S: cos, sin (S, head_dim), fp32. HF's layout: the
    frequencies repeated over the two halves of a head (rotate_half pairs dim i with i + head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos_S.device).float() / head_dim)
    freqs_SQ = pos_S.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs_SQ, freqs_SQ], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate q or k, (B, heads, S, head_dim), by their positions' angles (HF's rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, one entry per layer (generation only).
    Passed into forward and filled in place: it belongs to the caller, not to the model.
    With rope the keys are cached rotated: a new token's position is the cache length."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def __len__(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention (one c_attn for q, k, v; c_proj out), plus the Llama-family options:
    grouped-query attention (n_kv_head), rope, QK-norm and separate q/k/v and output biases."""

    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        H, G, Q = self.n_head, self.n_kv_head, self.head_dim
        self.c_attn = nn.Linear(config.n_embd, (H + 2 * G) * Q, bias=config.qkv_bias)
        self.c_proj = nn.Linear(H * Q, config.n_embd, bias=config.attn_out_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm != 'none':  # 'head': one weight over head_dim, shared by the heads (Qwen3)
            q_dim, k_dim = (Q, Q) if config.qk_norm == 'head' else (H * Q, G * Q)  # 'proj': OLMoE
            self.q_norm, self.k_norm = RMSNorm(q_dim, config.norm_eps), RMSNorm(k_dim, config.norm_eps)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x_BSD, kv_cache=None, rope=None):
        B, S, D = x_BSD.size()
        H, G, Q = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x_BSD).split([H * Q, G * Q, G * Q], dim=2)
        if self.qk_norm == 'proj':
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, S, heads * Q) -> (B, S, heads, Q)
        q, k, v = q.view(B, S, H, Q), k.view(B, S, G, Q), v.view(B, S, G, Q)
        if self.qk_norm == 'head':
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, Q)
        if rope is not None:  # cos, sin of these S positions (after the cached ones)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None
        if kv_cache is not None:
            i = self.layer_idx
            if kv_cache.k[i] is not None:
                k, v = torch.cat([kv_cache.k[i], k], dim=2), torch.cat([kv_cache.v[i], v], dim=2)
            kv_cache.k[i], kv_cache.v[i] = k, v
            P = k.size(2) - S  # cached positions before these S queries
            if P > 0 and S > 1:  # queries see all of the past and the causal part of the present
                mask = torch.arange(S, device=q.device)[:, None] + P >= torch.arange(P + S, device=q.device)
        if G != H:  # grouped-query: query head h reads key/value head h // (H // G) (HF's repeat_kv)
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        causal = mask is None and k.size(2) == S  # a single new query attends to everything: no mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0)
        y = y.transpose(1, 2).contiguous().view(B, S, H * Q)
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------- router + losses

def load_balancing_loss(probs_TE, topk_ids_TK, n_experts, counts_E=None):
    """Switch Transformer aux loss, E * sum_i f_i * P_i.

    f_i: fraction of the T*K assignments that went to expert i (sums to 1, so uniform routing gives
    exactly 1.0 for every k); P_i: mean router probability of expert i. f is a count (no gradient);
    the gradient reaches the router through P. counts_E, if given, replaces the local assignment
    counts (balance_scope='global' passes the counts summed over all ranks)."""
    if counts_E is None:
        counts_E = torch.zeros(n_experts, device=probs_TE.device, dtype=probs_TE.dtype)
        counts_E.scatter_add_(0, topk_ids_TK.reshape(-1), torch.ones_like(topk_ids_TK.reshape(-1), dtype=probs_TE.dtype))
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum()
    P_E = probs_TE.mean(dim=0)
    return n_experts * (f_E * P_E).sum()


def sequence_balancing_loss(probs_BSE, topk_ids_BSK, n_experts):
    """DeepSeek's sequence-level variant: the Switch loss inside each sequence, averaged over the
    batch. It penalises imbalance within a sequence, not only across the whole batch."""
    B, S, K = topk_ids_BSK.shape
    counts_BE = torch.zeros(B, n_experts, device=probs_BSE.device, dtype=probs_BSE.dtype)
    counts_BE.scatter_add_(1, topk_ids_BSK.reshape(B, -1),
                           torch.ones(B, S * K, device=probs_BSE.device, dtype=probs_BSE.dtype))
    f_BE = counts_BE / (S * K)
    P_BE = probs_BSE.mean(dim=1)
    return (n_experts * (f_BE * P_BE).sum(-1)).mean()


def router_z_loss(logits_TE):
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Router(nn.Module):
    """Scores every (token, expert) pair and, for token-choice routers, picks each token's experts.

    softmax        softmax over experts, top-k (Switch; Mixtral when the k gates are renormalised)
    noisy_topk     softmax of logits + N(0,1)*softplus(x W_noise), the noise in training only
                   (Shazeer et al. 2017)
    sigmoid        independent sigmoid scores (DeepSeek-V3); experts picked by top-k of
                   score + expert_bias, a buffer nudged toward balanced load after every optimizer
                   step (MoEGPT.update_expert_bias); the bias steers selection only, never the gates
    soft           every expert, weighted by its softmax probability (seed 000's dense Soft MoE)
    expert_choice  softmax scores; the experts pick tokens (MoELayer.route_expert_choice)
    """

    def __init__(self, config):
        super().__init__()
        self.kind = config.router
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.noise = nn.Linear(config.n_embd, config.n_experts, bias=False) if self.kind == 'noisy_topk' else None
        if self.kind == 'sigmoid':
            self.register_buffer('expert_bias', torch.zeros(config.n_experts))
        self.top_k = config.n_experts if self.kind == 'soft' else config.top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.router_fp32 = config.router_fp32
        self.routed_scaling_factor = config.routed_scaling_factor
        self.n_group, self.topk_group = config.n_group, config.topk_group

    def forward(self, x_TD):
        """Returns logits_TE, probs_TE (rows sum to 1: the P of the balance loss), topk_ids_TK and
        gates_TK (the weights of the chosen experts' outputs)."""
        if self.router_fp32:  # routing decisions are sensitive to rounding: at least fp32, no autocast
            dt = torch.promote_types(x_TD.dtype, torch.float32)
            with torch.autocast(x_TD.device.type, enabled=False):
                x_TD = x_TD.to(dt)
                logits_TE = F.linear(x_TD, self.gate.weight.to(dt))
                if self.noise is not None and self.training:
                    noise_std_TE = F.softplus(F.linear(x_TD, self.noise.weight.to(dt)))
                    logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        else:
            logits_TE = self.gate(x_TD)
            if self.noise is not None and self.training:
                logits_TE = logits_TE + torch.randn_like(logits_TE) * F.softplus(self.noise(x_TD))
        if self.kind == 'sigmoid':
            scores_TE = torch.sigmoid(logits_TE)
            select_TE = scores_TE + self.expert_bias.to(scores_TE.dtype)
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        else:
            scores_TE = select_TE = probs_TE = F.softmax(logits_TE, dim=-1)
        if self.n_group > 1:
            select_TE = self.limit_to_groups(select_TE)
        _, topk_ids_TK = torch.topk(select_TE, self.top_k, dim=-1)
        topk_probs_TK = scores_TE.gather(1, topk_ids_TK)  # the gates never see expert_bias
        if self.norm_topk_prob:
            gates_TK = topk_probs_TK / topk_probs_TK.sum(dim=-1, keepdim=True)
        else:
            gates_TK = topk_probs_TK
        if self.routed_scaling_factor != 1.0:
            gates_TK = gates_TK * self.routed_scaling_factor
        return logits_TE, probs_TE, topk_ids_TK, gates_TK

    def limit_to_groups(self, select_TE):
        """DeepSeek-V3's group-limited routing: the experts form n_group groups of equal size; a
        group scores the sum of its 2 best selection scores; each token keeps only the experts of its
        topk_group best groups (the others get -inf). With experts laid out by group over the ranks,
        a token's assignments then reach at most topk_group groups of ranks."""
        T, E = select_TE.shape
        select_TGM = select_TE.view(T, self.n_group, E // self.n_group)
        group_scores_TG = select_TGM.topk(min(2, E // self.n_group), dim=-1).values.sum(dim=-1)
        best_TG = group_scores_TG.topk(self.topk_group, dim=-1).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        return select_TGM.masked_fill(~keep_TG.unsqueeze(-1), float('-inf')).view(T, E)


# ----------------------------------------------------------------------------- experts

def use_grouped_mm(expert_impl, device_type, dtype, aligned=True):
    """Whether the experts run as grouped_mm (else the per-expert slice loop). 'auto' takes
    grouped_mm only where it is one kernel that torch.compile can trace: CUDA, bf16 (grouped_mm's
    meta function, what compile traces, accepts bf16 only), 16-byte-aligned row strides. The rest
    takes the loop: CPU (measured faster there), and fp32 / fp16 on CUDA (--dtype=float32, pre-Ampere
    GPUs), where compiled grouped_mm would crash. docs/performance.md: the GPU path."""
    if not HAS_GROUPED_MM or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False  # old torch, or float64 (tests): grouped_mm has no kernel for it
    if expert_impl != 'auto':
        return expert_impl == 'grouped'
    return device_type == 'cuda' and dtype == torch.bfloat16 and aligned



class MLP(nn.Module):
    """nanoGPT's dense MLP: the FFN of dense blocks, and the always-on shared experts of an MoE layer."""

    def __init__(self, config, hidden):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if config.activation == 'swiglu' else hidden,
                              bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x):
        return self.dropout(self.c_proj(activation_fn(self.activation, self.c_fc(x))))


@torch.compiler.disable
def grouped_mm_eager(a, b, offs):
    """grouped_mm outside torch.compile's graph: its meta function (what compile traces) accepts
    bf16 only, while the eager kernels also run fp32 / fp16. expert_impl='grouped' in those dtypes
    compiles with a graph break here instead of crashing."""
    return F.grouped_mm(a, b, offs=offs)


def append_ones(a_NX):
    """(N, X) -> (N, X+8): [a, 1, 0 x 7]. Eight columns, not one: row strides stay multiples of 16 bytes."""
    N = a_NX.shape[0]
    return torch.cat([a_NX, a_NX.new_ones(N, 1), a_NX.new_zeros(N, 7)], dim=1)


def append_bias(w_EXY, b_EY):
    """(E, X, Y) -> (E, X+8, Y): [w; b; 0 x 7], so that append_ones(a) @ append_bias(w, b) = a @ w + b."""
    E, _, Y = w_EXY.shape
    return torch.cat([w_EXY, b_EY.to(w_EXY.dtype).unsqueeze(1), w_EXY.new_zeros(E, 7, Y)], dim=1)


class GroupedExperts(nn.Module):
    """n_experts MLPs with weights stacked along a leading expert dim, applied to expert-sorted rows."""

    def __init__(self, config):
        super().__init__()
        E, D, H = config.n_experts, config.n_embd, config.expert_hidden
        F_ = 2 * H if config.activation == 'swiglu' else H
        self.w1_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.w2_EHD = nn.Parameter(torch.empty(E, H, D))
        # Finite values for a layer built on its own (tests, bench.py), not torch.empty's leftover
        # memory; MoEGPT re-initialises them. fork_rng: the global CPU RNG stream, and so every
        # seeded model init, stays as it was.
        with torch.random.fork_rng(devices=[]):
            torch.nn.init.normal_(self.w1_EDF, std=0.02)
            torch.nn.init.normal_(self.w2_EHD, std=0.02)
        self.b1_EF = nn.Parameter(torch.zeros(E, F_)) if config.bias else None
        self.b2_ED = nn.Parameter(torch.zeros(E, D)) if config.bias else None
        self.activation = config.activation
        self.expert_impl = config.expert_impl
        # bf16 grouped_mm needs every row stride to be a multiple of 16 bytes (8 bf16 elements): D, H
        # and 2H (swiglu). 'auto' takes the loop otherwise; 'grouped' is refused by MoEGPTConfig.
        self.aligned = D % 8 == 0 and H % 8 == 0

    def use_grouped(self, x):
        return use_grouped_mm(self.expert_impl, x.device.type, x.dtype, self.aligned)

    def forward(self, x_ND, counts_E, kept_N1=None):
        """x_ND: rows sorted by expert; counts_E: rows per expert. kept_N1 (capacity mode): False on
        the dropped rows past sum(counts_E).
        CUDA's grouped_mm allocates its output uninitialised and writes only the rows up to offs[-1],
        in forward and in the input gradient of backward: those rows hold garbage (NaN, Inf), and
        0 * NaN is NaN. So every grouped_mm output is masked at once, before activation and
        gate see it, and the activation's output is masked too (its backward input is the next
        grouped_mm's input gradient). tests/test_cuda_rules.py emulates the garbage on CPU."""
        dt = compute_dtype(x_ND)
        x_ND = x_ND.to(dt)
        w1_EDF, w2_EHD = self.w1_EDF.to(dt), self.w2_EHD.to(dt)
        if not self.use_grouped(x_ND):
            return self.forward_loop(x_ND, counts_E.tolist(), w1_EDF, w2_EHD)
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        mm = F.grouped_mm if dt == torch.bfloat16 else grouped_mm_eager

        def grouped_mm(a, b):
            y = mm(a, b, offs=offs_E)
            return y if kept_N1 is None else torch.where(kept_N1, y, 0)

        # Biases inside the grouped_mm: [x 1] @ [w1; b1] = x @ w1 + b1. The bias gradient then comes
        # out of grouped_mm's weight gradient, each expert's rows summed with fp32 accumulation like a
        # dense Linear's bias (a gather b[expert of each row] would sum them by atomic adds, ~N/E per
        # address, slow on GPUs and, in bf16, 7-50% off), and no pass over the N x F activations.
        if self.b1_EF is not None:
            x_ND, w1_EDF = append_ones(x_ND), append_bias(w1_EDF, self.b1_EF)
        h_NF = grouped_mm(x_ND, w1_EDF)
        h_NH = activation_fn(self.activation, h_NF)
        if kept_N1 is not None:
            h_NH = torch.where(kept_N1, h_NH, 0)
        if self.b2_ED is not None:
            h_NH, w2_EHD = append_ones(h_NH), append_bias(w2_EHD, self.b2_ED)
        return grouped_mm(h_NH, w2_EHD)

    def forward_loop(self, x_ND, counts, w1_EDF, w2_EHD):
        """Reference / fallback: one plain matmul per expert on its contiguous slice (biases per
        slice, in the matmul). split / unbind, not x[a:b] / w[e]: each slice or select would get a
        full-size zero gradient in backward (SliceBackward / SelectBackward), O(E) full-size fills and
        adds; split's and unbind's backward is a single cat / stack."""
        dt = x_ND.dtype
        w1s, w2s = w1_EDF.unbind(0), w2_EHD.unbind(0)
        b1s = self.b1_EF.to(dt).unbind(0) if self.b1_EF is not None else None
        b2s = self.b2_ED.to(dt).unbind(0) if self.b2_ED is not None else None
        kept = sum(counts)
        xs = x_ND.split(list(counts) + [x_ND.shape[0] - kept])
        ys = []
        for e, n in enumerate(counts):
            if n == 0:
                continue
            # addmm, like nn.Linear: the bias rides in the matmul call (the CPU recipe's expert loop,
            # forward + backward: 8.3 -> 8.0 ms)
            h = xs[e] @ w1s[e] if b1s is None else torch.addmm(b1s[e], xs[e], w1s[e])
            a = activation_fn(self.activation, h)
            ys.append(a @ w2s[e] if b2s is None else torch.addmm(b2s[e], a, w2s[e]))
        if kept < x_ND.shape[0]:  # rows of dropped assignments (capacity mode): zeros
            ys.append(x_ND.new_zeros(x_ND.shape[0] - kept, w2_EHD.shape[-1]))
        return torch.cat(ys) if ys else x_ND.new_zeros(0, w2_EHD.shape[-1])


# ----------------------------------------------------------------------------- MoE layer

class GatherRows(torch.autograd.Function):
    """x[idx] where every row of x is taken exactly k times: the dispatch (k = top_k, each token to
    its k rows) and the combine (k = 1, a permutation back to token order). Given inv_idx, the rows
    of the output holding row i's copies at inv_idx[i*k : (i+1)*k], the backward is a gather and a
    sum over the k copies. index_select's own backward is an index_add_: atomic adds (slow on GPUs)."""

    @staticmethod
    def forward(ctx, x, idx, inv_idx, k):
        ctx.save_for_backward(inv_idx)
        ctx.k = k
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        inv_idx, = ctx.saved_tensors
        g = grad.index_select(0, inv_idx)
        return (g if ctx.k == 1 else g.view(-1, ctx.k, g.shape[1]).sum(1)), None, None, None


class MoELayer(nn.Module):
    """Router -> rows sorted by expert -> grouped experts -> gate-weighted sum back in the tokens
    (+ shared experts). Every router ends in this one dispatch: it only has to say, for each
    row, which token, which expert and which gate. Returns (output, aux dict)."""

    def __init__(self, config):
        super().__init__()
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        self.shared_experts = (MLP(config, config.n_shared_experts * config.expert_hidden)
                               if config.n_shared_experts > 0 else None)
        # Qwen2-MoE: a per-token sigmoid gate, D -> 1, on the shared experts' output
        self.shared_expert_gate = nn.Linear(config.n_embd, 1, bias=False) if config.shared_expert_gate else None
        self.n_experts, self.top_k = config.n_experts, self.router.top_k
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = (config.capacity_factor if config.eval_capacity_factor is None
                                     else config.eval_capacity_factor)
        self.balance_scope = config.balance_scope
        self.capacity_priority = config.capacity_priority
        self.capacity_scope = config.capacity_scope
        self.aux_loss_layers = config.aux_loss_layers
        self.dropout = nn.Dropout(config.dropout if config.moe_dropout is None else config.moe_dropout)

    @property
    def active_experts(self):
        """Routed experts one token passes through (on average, for expert choice)."""
        if self.router.kind == 'expert_choice':  # C = cf*T/E tokens per expert -> cf experts per token
            return self.capacity_factor or self.top_k
        return self.top_k

    def forward(self, x_BSD, return_intermediate=False):
        B, S, D = x_BSD.shape
        E = self.n_experts
        x_TD = x_BSD.reshape(-1, D)
        T = x_TD.shape[0]
        logits_TE, probs_TE, topk_ids_TK, gates_TK = self.router(x_TD)
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        assign_of_N = rows_of_A = None
        if self.router.kind == 'expert_choice':
            token_of_N, gate_N, counts_E, kept_counts_E, kept_N1, tokens_EC = \
                self.route_expert_choice(probs_TE, capacity_factor)
        else:
            counts_E, kept_counts_E, kept_N1, assign_of_N, rows_of_A = \
                self.route_token_choice(topk_ids_TK, capacity_factor, B, S)

        xc_TD = x_TD.to(compute_dtype(x_TD))  # rows travel in the matmul dtype (half the bytes in bf16)
        if rows_of_A is not None:  # token choice: every token has exactly K rows, gathers both ways
            K = topk_ids_TK.shape[1]
            x_ND = GatherRows.apply(xc_TD, assign_of_N // K, rows_of_A, K)      # (N, D) gather, expert-sorted
        else:
            x_ND = xc_TD.index_select(0, token_of_N)                          # (N, D) gather, expert-sorted
        if kept_N1 is not None:
            x_ND = torch.where(kept_N1, x_ND, 0)
        y_ND = self.experts(x_ND, kept_counts_E, kept_N1)                     # (N, D)
        if kept_N1 is not None:
            y_ND = torch.where(kept_N1, y_ND, 0)                               # dropped rows add exactly 0
        if rows_of_A is not None:
            y_TKD = GatherRows.apply(y_ND, rows_of_A, assign_of_N, 1).view(T, K, D)  # back to token order
            out_TD = (y_TKD * gates_TK.unsqueeze(2).to(y_TKD.dtype)).sum(1)    # (T, D) gate-weighted sum
        else:
            y_ND = y_ND * gate_N.unsqueeze(1).to(y_ND.dtype)                  # gate-weighted rows
            out_TD = y_ND.new_zeros(T, D).index_add_(0, token_of_N, y_ND)     # (T, D) each token's rows summed
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        out_BSD = self.dropout(out_TD.view(B, S, D))

        if self.aux_loss_layers == 'pooled':  # MoEGPT.forward pools counts and P over the layers (HF's loss)
            balance_counts_E = self.balance_counts(counts_E)
            aux = {'aux_loss': load_balancing_loss(probs_TE, topk_ids_TK, E, balance_counts_E),
                   'balance_counts_E': balance_counts_E, 'balance_P_E': probs_TE.mean(dim=0)}
        else:
            aux = {'aux_loss': self.balance_loss(probs_TE, topk_ids_TK, counts_E, B, S)}
        aux['z_loss'] = router_z_loss(logits_TE)
        with torch.no_grad():
            aux['expert_counts'] = counts_E.float()
            if self.router.kind == 'expert_choice':  # dropped: tokens that no expert picked
                picks_T = torch.zeros(T, device=x_TD.device).index_add_(
                    0, token_of_N, torch.ones(token_of_N.numel(), device=x_TD.device))
                aux['drop_frac'] = (picks_T == 0).float().mean()
            else:  # dropped: assignments over capacity
                aux['drop_frac'] = 1.0 - kept_counts_E.sum().float() / (T * self.top_k)
            aux['router_entropy'] = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean().float()
        if return_intermediate:
            aux['routing'] = {'router_logits': logits_TE.view(B, S, E), 'router_probs': probs_TE.view(B, S, E)}
            if self.router.kind == 'expert_choice':
                aux['routing']['expert_choice_tokens'] = tokens_EC  # (E, C) flat token ids each expert took
            else:
                aux['routing'].update(topk_ids=topk_ids_TK.view(B, S, -1), topk_weights=gates_TK.view(B, S, -1))
        return out_BSD, aux

    def route_token_choice(self, topk_ids_TK, capacity_factor, B, S):
        """Each token picked k experts: sort the N = T*K assignments by expert, stably, so that inside
        each expert the assignments keep their priority order (what capacity dropping keeps first).
        capacity_priority 'choice' (GShard/Switch): n = k*T + t, every first choice of the micro-batch
        before any second choice. A token's second choice can then be dropped because of a *later*
        token's first choice, in its own or another sequence: the future leaks into the present.
        'position' (causal): n = s*K*B + k*B + b, all assignments of position s before those of
        s+1, so a token's drops depend only on tokens at its position or earlier.
        Returns the sort as a permutation of the assignments a = t*K + k (token order) and its inverse."""
        E, T, K = self.n_experts, B * S, topk_ids_TK.shape[1]
        a_TK = torch.arange(T * K, device=topk_ids_TK.device).view(T, K)     # assignment a = t*K + k
        if capacity_factor > 0 and self.capacity_priority == 'position':
            perm = lambda v_TK: v_TK.view(B, S, K).permute(1, 2, 0).reshape(-1)  # (S, K, B) order
        else:
            perm = lambda v_TK: v_TK.t().reshape(-1)                             # (K, T) order
        ids_N, a_N = perm(topk_ids_TK), perm(a_TK)                            # (N,) each, priority order
        counts_E = torch.zeros(E, dtype=torch.long, device=ids_N.device)
        counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N))                # (E,) tokens per expert
        kept_counts_E, kept_N1 = counts_E, None
        if capacity_factor > 0 and self.capacity_scope == 'sequence':
            ids_N, kept_counts_E = self.apply_capacity_per_sequence(ids_N, a_N // K, capacity_factor, B, S)
        elif capacity_factor > 0:
            ids_N, kept_counts_E = self.apply_capacity(ids_N, counts_E, capacity_factor, T)
        sorted_ids_N, order_N = torch.sort(ids_N, stable=True)                # (N,) expert of each row, row -> assignment
        if capacity_factor > 0:
            # Dropped rows (expert id E) sort last, past every expert's slice: masked to exactly 0.
            kept_N1 = (sorted_ids_N < E).unsqueeze(1)
        assign_of_N = a_N.index_select(0, order_N)                            # (N,) row -> assignment a
        rows_of_A = torch.empty_like(assign_of_N).scatter_(0, assign_of_N, a_TK.view(-1))  # its inverse
        return counts_E, kept_counts_E, kept_N1, assign_of_N, rows_of_A

    def apply_capacity(self, ids_N, counts_E, capacity_factor, T):
        """Switch/GShard capacity: each expert keeps its first `capacity` assignments in priority
        order; the rest get expert id E so they sort past every expert and are computed as zero."""
        E = self.n_experts
        capacity = math.ceil(capacity_factor * T * self.top_k / E)
        kept_N = self.rank_in_bucket(ids_N, counts_E) < capacity
        return torch.where(kept_N, ids_N, E), counts_E.clamp(max=capacity)

    def apply_capacity_per_sequence(self, ids_N, token_N, capacity_factor, B, S):
        """capacity_scope='sequence' (HF's Switch Transformers): every sequence has its own
        ceil(cf * S * K / E) slots per expert, so no sequence can take another's. The same ranking
        as apply_capacity, with (sequence, expert) pairs as the buckets."""
        E = self.n_experts
        capacity = math.ceil(capacity_factor * S * self.top_k / E)
        bucket_N = (token_N // S) * E + ids_N                                 # (sequence, expert) pair
        counts_BE = torch.zeros(B * E, dtype=torch.long, device=ids_N.device)
        counts_BE.scatter_add_(0, bucket_N, torch.ones_like(bucket_N))
        kept_N = self.rank_in_bucket(bucket_N, counts_BE) < capacity
        return torch.where(kept_N, ids_N, E), counts_BE.clamp(max=capacity).view(B, E).sum(0)

    @staticmethod
    def rank_in_bucket(bucket_N, counts):
        """Each assignment's position among those of its bucket, in priority order (a stable sort)."""
        order_N = torch.argsort(bucket_N, stable=True)
        start = torch.cumsum(counts, 0) - counts
        rank_sorted_N = torch.arange(bucket_N.numel(), device=bucket_N.device) - start[bucket_N[order_N]]
        rank_N = torch.empty_like(rank_sorted_N)
        rank_N[order_N] = rank_sorted_N
        return rank_N

    def route_expert_choice(self, probs_TE, capacity_factor):
        """Expert choice (Zhou et al. 2022): every expert takes its C highest-scoring tokens,
        C = ceil(cf * T / E), cf = capacity_factor (top_k when 0). Rows come out grouped by expert.
        The choice compares tokens across the batch, later positions included, so in a causal LM
        it sees the future (docs/routing_zoo.md)."""
        E, T = self.n_experts, probs_TE.shape[0]
        C = min(T, math.ceil((capacity_factor or self.top_k) * T / E))
        gates_EC, tokens_EC = torch.topk(probs_TE.t(), C, dim=1)              # (E, C) each expert's tokens
        counts_E = torch.full((E,), C, dtype=torch.long, device=probs_TE.device)
        return tokens_EC.reshape(-1), gates_EC.reshape(-1), counts_E, counts_E, None, tokens_EC

    def balance_loss(self, probs_TE, topk_ids_TK, counts_E, B, S):
        """The Switch loss over the micro-batch, per sequence, or with the loads of all DDP ranks
        ('global': Megatron-Core's global-batch balancing). counts_E: this micro-batch's assignments
        per expert, already counted by the routing. Expert choice is balanced by construction: no loss."""
        if self.router.kind == 'expert_choice':
            return probs_TE.new_zeros(())
        E = self.n_experts
        if self.balance_scope == 'sequence':
            return sequence_balancing_loss(probs_TE.view(B, S, E), topk_ids_TK.view(B, S, -1), E)
        return load_balancing_loss(probs_TE, topk_ids_TK, E, self.balance_counts(counts_E))

    def balance_counts(self, counts_E):
        """The loads f is made of: this micro-batch's, or the global batch's (all DDP ranks)."""
        counts_E = counts_E.float()  # a copy: the routing's counts also go to the stats
        if self.balance_scope == 'global' and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_E)  # the global batch's loads; P stays local
        return counts_E


# ----------------------------------------------------------------------------- block

class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2 and the Llama families alike)."""

    def __init__(self, config, is_moe, layer_idx=0):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        dense_hidden = config.dense_hidden if config.n_experts > 1 else config.expert_hidden
        self.mlp = MoELayer(config) if is_moe else MLP(config, dense_hidden)
        self.is_moe = is_moe

    def forward(self, x, return_intermediate=False, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rope)
        if self.is_moe:
            h, aux = self.mlp(self.ln_2(x), return_intermediate)
            return x + h, aux
        return x + self.mlp(self.ln_2(x)), None


# ----------------------------------------------------------------------------- model

class ParamCount(NamedTuple):
    total: int
    active: int  # what one token touches: top_k experts per MoE layer, not n_experts


class MoEGPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == 'learned':  # rope has no table: positions rotate q and k in attention
            modules['wpe'] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, config.is_moe_layer(i), i) for i in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        if config.n_experts > 1 and config.router == 'expert_choice':
            warnings.warn('router=expert_choice: each expert picks tokens across the whole batch, later '
                          'positions included, so a causal LM trained with it sees the future; its '
                          'losses are not comparable with token-choice routers (docs/routing_zoo.md)')
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2*n_layer); expert output projections too.
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=resid_std)
        for moe in self.moe_layers():
            torch.nn.init.normal_(moe.router.gate.weight, mean=0.0, std=config.router_init_std)
            if moe.router.noise is not None:  # Shazeer et al. start the noise weights at zero
                torch.nn.init.zeros_(moe.router.noise.weight)
            torch.nn.init.normal_(moe.experts.w1_EDF, mean=0.0, std=0.02)
            torch.nn.init.normal_(moe.experts.w2_EHD, mean=0.0, std=resid_std)
            for b in (moe.experts.b1_EF, moe.experts.b2_ED):
                if b is not None:
                    torch.nn.init.zeros_(b)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def moe_layers(self):
        return [b.mlp for b in self.transformer.h if b.is_moe]

    def get_num_params(self, non_embedding=True):
        """Total and active parameter counts. non_embedding drops the position embeddings (the token
        embeddings stay counted when tied to lm_head, as in nanoGPT; untied, they are a lookup and
        are dropped too, lm_head stays)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if 'wpe' in self.transformer:
                total -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.transformer.wte.weight.numel()
        inactive = 0
        for moe in self.moe_layers():
            n_local = moe.experts.w1_EDF.shape[0]  # < n_experts under expert parallelism (parallel.py)
            per_expert = sum(p.numel() for p in moe.experts.parameters()) // n_local
            total += (moe.n_experts - n_local) * per_expert  # the experts held by other ranks
            inactive += round((moe.n_experts - moe.active_experts) * per_expert)
        return ParamCount(total=total, active=total - inactive)

    @torch.no_grad()
    def update_expert_bias(self, expert_counts_LE):
        """DeepSeek-V3's auxiliary-loss-free balancing, called after each optimizer step with the
        step's tokens per expert (all micro-steps and ranks, so every rank moves identically):
        bias += rate * sign(mean load - load). Only sigmoid routers have the bias."""
        for moe, counts_E in zip(self.moe_layers(), expert_counts_LE):
            if moe.router.kind == 'sigmoid':
                counts_E = counts_E.to(moe.router.expert_bias.device, torch.float32)
                moe.router.expert_bias += self.config.bias_update_rate * torch.sign(counts_E.mean() - counts_E)

    def forward(self, idx, targets=None, return_intermediate=False, kv_cache=None):
        """Returns (logits, loss, stats). loss = CE + aux_loss_coef*aux + z_loss_coef*z (None without
        targets); stats holds detached tensors for logging: 'ce', 'aux_loss', 'z_loss', and per MoE
        layer 'expert_counts' (L_moe, E), 'drop_frac' (L_moe,), 'router_entropy' (L_moe,), plus
        'routing' (a list, one dict per MoE layer) when return_intermediate=True.
        kv_cache (a KVCache, generation only): idx continues the cached tokens; filled in place."""
        device = idx.device
        b, t = idx.size()
        past = len(kv_cache) if kv_cache is not None else 0
        if past + t > self.config.block_size:
            raise ValueError(f'sequence of length {past + t} is longer than block_size={self.config.block_size}')
        pos = torch.arange(past, past + t, dtype=torch.long, device=device)  # after the cached tokens
        x, rope = self.transformer.wte(idx), None
        if 'wpe' in self.transformer:
            x = x + self.transformer.wpe(pos)
        else:
            rope = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        x = self.transformer.drop(x)
        auxes = []
        for block in self.transformer.h:
            x, aux = block(x, return_intermediate, kv_cache, rope)
            if aux is not None:
                auxes.append(aux)
        x = self.transformer.ln_f(x)

        zero = x.new_zeros((), dtype=torch.float32)
        E = self.config.n_experts
        if auxes and self.config.aux_loss_layers == 'pooled':
            # HF's load_balancing_loss_func: all layers' assignments and probabilities pooled, then
            # E * sum f*P once (every layer routes the same T tokens, so P is the mean of the layers')
            counts_E = torch.stack([a['balance_counts_E'] for a in auxes]).sum(0)
            P_E = torch.stack([a['balance_P_E'] for a in auxes]).mean(0)
            aux_loss = E * (counts_E / counts_E.sum() * P_E).sum()
        else:
            aux_loss = torch.stack([a['aux_loss'] for a in auxes]).mean() if auxes else zero
        z_loss = torch.stack([a['z_loss'] for a in auxes]).mean() if auxes else zero
        stats = {
            'aux_loss': aux_loss.detach(),
            'z_loss': z_loss.detach(),
            'expert_counts': torch.stack([a['expert_counts'] for a in auxes]) if auxes else x.new_zeros(0, E),
            'drop_frac': torch.stack([a['drop_frac'] for a in auxes]) if auxes else x.new_zeros(0),
            'router_entropy': torch.stack([a['router_entropy'] for a in auxes]) if auxes else x.new_zeros(0),
        }
        if return_intermediate:
            stats['routing'] = [a['routing'] for a in auxes]
        if targets is not None:
            logits = self.lm_head(x)
            # CE in at least fp32: bf16 logits lose the small differences the loss is made of
            logits_flat = logits.view(-1, logits.size(-1))
            ce = F.cross_entropy(logits_flat.to(torch.promote_types(logits.dtype, torch.float32)),
                                 targets.view(-1), ignore_index=-1)
            loss = ce
            if auxes:  # not ce + 0 for a dense model: inductor folds it to ce itself, and returning
                # ce.detach() beside it then marks the loss non-differentiable (pytorch PR #194760)
                loss = ce + self.config.aux_loss_coef * aux_loss + self.config.z_loss_coef * z_loss
            stats['ce'] = ce.detach()
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position is needed
            loss = None
        return logits, loss, stats

    @classmethod
    def from_pretrained(cls, name_or_path, upcycle_noise=0.0, **overrides):
        """A pretrained HF checkpoint as an MoEGPT: GPT-2 (nanoGPT's from_pretrained), Llama, Qwen2,
        Qwen3, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE; a hub name ('gpt2', ...) or a save_pretrained
        directory (offline). overrides set MoEGPTConfig fields (dropout, block_size, ...; for a dense
        checkpoint n_experts > 1 is sparse upcycling: every expert a copy of the dense MLP, the same
        function at step 0 with renormalised gates). The key maps live in hf.py (hf.load)."""
        import hf
        return hf.load(name_or_path, upcycle_noise=upcycle_noise, **overrides)

    def crop_block_size(self, block_size):
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if 'wpe' in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, foreach=None):
        """AdamW; matmul weights, stacked experts and embeddings decay, biases and norms don't
        (nanoGPT's rule). Fused wherever torch has the kernel (CUDA; CPU since torch 2.4, where it
        is 8x faster than the per-tensor loop on the stacked experts: 10.9 -> 1.3 ms per step at the
        CPU recipe's 8 experts, torch 2.13, 1 thread). Fused and foreach AdamW update a whole param
        group in one multi-tensor call, which can't mix plain tensors with FSDP2's DTensors
        ("got mixed torch.Tensor and DTensor": FSDP2 + expert parallelism, whose expert shards stay
        plain), so each kind gets param groups of its own. foreach: force it (tests)."""
        groups = {}
        for name, p in self.named_parameters():
            if p.requires_grad:  # the experts' stacked biases are 2-D, and still biases
                decay = p.dim() >= 2 and not name.endswith(('.b1_EF', '.b2_ED'))
                groups.setdefault((decay, type(p).__name__ == 'DTensor'), []).append(p)
        optim_groups = [{'params': ps, 'weight_decay': weight_decay if decay else 0.0}
                        for (decay, _), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
        extra = dict(fused=True) if fused_adamw_supported(device_type) and not foreach else dict(foreach=foreach)
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self):
        """Training FLOPs (forward + backward) per token of a full block_size sequence: 6 x the
        active parameters plus attention's 12*L*H*Q*T (PaLM appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
        return 6 * self.get_num_params().active + 12 * L * H * Q * T

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation on *active* parameters against peak_flops (hardware.py)."""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 return_routing=False):
        """Sample max_new_tokens after idx (B, S). temperature=0 is greedy. top_k / top_p filter the
        distribution. use_cache: a KV cache, so the prompt is processed once and then one token per
        step. Past block_size, learned absolute positions can't slide in place: the uncached path
        recomputes the last block_size tokens every step (nanoGPT); the cached path refills the cache
        with the last block_size//2 tokens and goes on from there (each token then sees between
        block_size//2 and block_size tokens; rope models too, their positions restarting at 0).
        Both agree token for token while the sequence fits.
        return_routing: also return the top-k expert ids of every generated token in every MoE layer,
        a LongTensor (max_new_tokens, n_moe_layers, B, top_k)."""
        bs = self.config.block_size
        routing = []
        if any(m.router.kind == 'expert_choice' for m in self.moe_layers()):
            # Expert choice ranks tokens across the whole sequence; one cached token at a time can't
            # reproduce that, so rerun the context every step: the same batch-level rule as training.
            if return_routing:
                raise ValueError('return_routing: expert-choice routing has no per-token top-k experts')
            use_cache = False

        def step(tokens, cache):
            logits, _, stats = self(tokens, kv_cache=cache, return_intermediate=return_routing)
            if return_routing:  # routing of the last input position, i.e. the newest token
                routing.append(torch.stack([r['topk_ids'][:, -1] for r in stats['routing']]))
            return logits[:, -1, :]

        cache = KVCache(self.config.n_layer) if use_cache else None
        logits = step(idx[:, -bs:], cache)
        routing.clear()  # the prompt's routing is not asked for
        for i in range(max_new_tokens):
            idx_next = self.sample_next(logits, temperature, top_k, top_p)
            idx = torch.cat((idx, idx_next), dim=1)
            if i == max_new_tokens - 1 and not return_routing:
                break  # the last token needs a forward only to report its routing
            if not use_cache:
                logits = step(idx[:, -bs:], None)
            elif len(cache) + 1 > bs:  # cache full: refill with the last half block
                cache = KVCache(self.config.n_layer)
                logits = step(idx[:, -(bs // 2):], cache)
            else:
                logits = step(idx_next, cache)
        if return_routing:
            return idx, torch.stack(routing) if routing else idx.new_zeros(0, len(self.moe_layers()), idx.size(0), self.config.top_k)
        return idx

    @staticmethod
    def sample_next(logits_BV, temperature=1.0, top_k=None, top_p=None):
        """One token per row from logits: greedy at temperature 0, else top-k / nucleus sampling."""
        if temperature == 0:
            return logits_BV.argmax(dim=-1, keepdim=True)
        logits_BV = logits_BV.float() / temperature
        if top_k is not None:
            v, _ = torch.topk(logits_BV, min(top_k, logits_BV.size(-1)))
            logits_BV[logits_BV < v[:, [-1]]] = -float('Inf')
        if top_p is not None and top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(logits_BV, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            remove = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
            sorted_logits[remove] = -float('Inf')
            logits_BV = torch.full_like(logits_BV, -float('Inf')).scatter(1, sorted_idx, sorted_logits)
        return torch.multinomial(torch.softmax(logits_BV, dim=-1), num_samples=1)

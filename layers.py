"""
The dense transformer's parts, kept out of model.py so that it reads like the MoE: LayerNorm or
RMSNorm, rotary position embeddings, and nanoGPT's causal self-attention with the Llama-family options
of MoEGPTConfig (grouped-query attention, QK-norm, q/k/v and output biases). An attention idea is an
edit here; an MoE idea an edit in model.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
        if kv_cache is not None:  # generation: the cached keys and values before these S positions
            k, v, mask = kv_cache.update(self.layer_idx, k, v)
        if G != H:  # grouped-query: query head h reads key/value head h // (H // G) (HF's repeat_kv)
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        causal = mask is None and k.size(2) == S  # a single new query attends to everything: no mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0)
        y = y.transpose(1, 2).contiguous().view(B, S, H * Q)
        return self.resid_dropout(self.c_proj(y))

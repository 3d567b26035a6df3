"""
MoEGPT: nanoGPT's GPT-2 decoder whose feed-forward blocks can be Mixture-of-Experts layers. The defaults
are GPT-2's block; block options (RMSNorm, rope, grouped-query attention, QK-norm: layers.py, with the
attention) build Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE (hf.py maps their checkpoints in and out).

Reading order: config -> router and its losses -> experts -> MoE layer -> block -> model.
A router returns flat (token, expert, gate) rows, any number per token; the MoE layer sorts them by
expert, applies capacity (if any), runs each expert on its contiguous slice and sums the gated outputs
back into the tokens: dropless by default, losses returned, never stored. To try an idea: a router is
one function in ROUTERS, a loss term one function in LOSSES plus its <name>_loss_coef field
(docs/hacking.md). Shape suffixes (torchtitan's): B batch, S sequence, T tokens (B*S), D n_embd,
E n_experts, K top_k, N assignment rows, F expert hidden (2*expert_hidden for swiglu), G groups.
"""
import contextlib
import math
import warnings
from dataclasses import InitVar, dataclass, fields
from typing import Callable, Literal, NamedTuple, Optional, get_args, get_origin, get_type_hints

import torch
import torch.nn as nn
import torch.nn.functional as F

import generation
from kernels import (HAS_GROUPED_MM, CastOnce, SoftmaxTopK, SortRows, UnsortRows, chunked_lm_head,  # noqa: F401
                     grouped_mlp, use_grouped_mm)
from layers import CausalSelfAttention, make_norm, rope_cos_sin

# ----------------------------------------------------------------------------- config

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
    norm: Literal['layernorm', 'rmsnorm'] = 'layernorm'  # rmsnorm: Llama's (no mean, no bias, in fp32)
    norm_eps: float = 1e-5  # epsilon of every norm (GPT-2 and nn.LayerNorm: 1e-5)
    position: Literal['learned', 'rope'] = 'learned'  # learned: GPT-2's wpe table; rope: rotary q and k
    rope_theta: float = 10000.0  # rope: the base of the rotation frequencies
    n_kv_head: Optional[int] = None  # grouped-query attention: key/value heads; None = n_head
    head_dim: Optional[int] = None  # width of one head; None = n_embd // n_head (Qwen3-MoE sets its own)
    qk_norm: Literal['none', 'head', 'proj'] = 'none'  # head: RMSNorm per head (Qwen3); proj: per projection (OLMoE)
    qkv_bias: Optional[bool] = None  # bias of the q/k/v projection; None = bias (Qwen2: True, bias=False)
    attn_out_bias: Optional[bool] = None  # bias of attention's output projection; None = bias
    tie_embeddings: bool = True  # lm_head shares wte's weight (GPT-2); False = its own matrix
    # --- Mixture of Experts
    n_experts: int = 1  # 1 = plain dense GPT (exactly nanoGPT's parameters)
    top_k: int = 2
    moe_every: int = 1  # every N-th block (after moe_first_dense) is an MoE block
    moe_first_dense: int = 0  # the first K blocks stay dense
    dense_hidden: Optional[int] = None  # MLP width of an MoE model's dense blocks; None = 4*n_embd
    expert_hidden: Optional[int] = None  # hidden width of one expert; None = 4*n_embd // granularity
    granularity: int = 1  # DeepSeekMoE's fine-grained split m: experts 1/m as wide (use m x n_experts, top_k)
    activation: Literal['gelu', 'gelu_tanh', 'relu', 'silu', 'swish', 'tanh', 'swiglu'] = 'gelu'
    moe_dropout: Optional[float] = None  # dropout on the MoE output; None = use dropout
    capacity_factor: float = 0.0  # 0 = dropless; >0 = Switch capacity, overflow dropped
    eval_capacity_factor: Optional[float] = None  # in eval mode; None = same as capacity_factor
    capacity_priority: Literal['position', 'choice'] = 'position'  # what capacity keeps first: earlier
    # positions (causal) | GShard's first choices of the whole batch (a token's future can drop it: warned)
    capacity_scope: Literal['micro_batch', 'sequence'] = 'micro_batch'  # slots per micro-batch | per sequence (HF)
    norm_topk_prob: Optional[bool] = None  # renormalise the k gates (Mixtral); None = if top_k > 1 (a lone
    # renormalised gate is 1.0, and the router would get no gradient from the LM loss)
    router_fp32: bool = True  # router matmul + softmax in fp32 even under autocast
    router_init_std: float = 0.01  # small router init: near-uniform routing at step 0 (seed 002)
    aux_loss_coef: float = 0.01  # weight of LOSSES['aux'], the Switch load-balancing loss
    z_loss_coef: float = 0.001  # weight of LOSSES['z'], the ST-MoE router z-loss
    expert_impl: Literal['auto', 'grouped', 'loop'] = 'auto'  # grouped_mm | per-expert slices | auto
    # --- routing and expert designs (docs/routing_zoo.md)
    router: str = 'softmax'  # a name in ROUTERS: softmax | noisy_topk | sigmoid | expert_choice | soft
    n_shared_experts: int = 0  # always-on experts (each expert_hidden wide) added to the routed output
    bias_update_rate: float = 0.001  # aux-free balancing: expert_bias step per optimizer step
    balance_scope: Literal['micro_batch', 'sequence', 'global', 'pooled'] = 'micro_batch'  # the aux loss's
    # f over the micro-batch | each sequence | the global batch (all ranks' counts) | HF's loss: the
    # micro-batch's counts and probabilities pooled over the layers (HF's router_aux_loss_coef c = our top_k*c)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared experts' output x sigmoid(x W), W: D -> 1
    routed_scaling_factor: float = 1.0  # DeepSeek-V3: the routed experts' gates x this
    n_group: int = 1  # group-limited routing (DeepSeek-V3): experts in n_group equal groups; a token
    topk_group: int = 1  # picks its top_k among the experts of its topk_group best groups
    aux_loss_layers: InitVar[Optional[str]] = None  # read from older checkpoints only: 'pooled' is balance_scope

    def __post_init__(self, aux_loss_layers=None):
        if aux_loss_layers == 'pooled' and self.balance_scope == 'micro_batch':  # an older checkpoint's HF loss
            self.balance_scope = 'pooled'
        elif aux_loss_layers not in (None, 'mean'):
            raise ValueError(f'MoEGPTConfig.aux_loss_layers={aux_loss_layers!r} with balance_scope={self.balance_scope!r}'
                             " (an older checkpoint's): only 'pooled' with 'micro_batch' maps to balance_scope='pooled'")
        if self.activation == 'swish':
            self.activation = 'silu'
        hints = get_type_hints(type(self))
        for f in fields(self):  # typed choices: one rule for every Literal field
            if get_origin(hints[f.name]) is Literal and getattr(self, f.name) not in get_args(hints[f.name]):
                raise ValueError(f'MoEGPTConfig.{f.name}={getattr(self, f.name)!r} must be one of '
                                 f'{get_args(hints[f.name])}')
        E, G = self.n_experts, max(self.n_group, 1)
        hd = self.head_dim or (self.n_embd // self.n_head if self.n_head >= 1 else 0)
        spec = ROUTERS.get(self.router)
        checks = [  # (field, ok, why): ranges first, then the rules that join fields
            *[(k, getattr(self, k) >= 1, 'must be >= 1') for k in (
                'block_size', 'vocab_size', 'n_layer', 'n_head', 'n_experts', 'moe_every', 'granularity')],
            *[(k, getattr(self, k) is None or getattr(self, k) >= 1, 'must be None or >= 1')
              for k in ('n_kv_head', 'head_dim', 'dense_hidden', 'expert_hidden')],
            *[(k, getattr(self, k) >= 0, 'must be >= 0') for k in (
                'moe_first_dense', 'capacity_factor', 'router_init_std', 'aux_loss_coef', 'z_loss_coef',
                'n_shared_experts', 'bias_update_rate')],
            *[(k, getattr(self, k) is None or 0 <= getattr(self, k) < 1, 'must be in [0, 1)')
              for k in ('dropout', 'moe_dropout')],
            *[(k, getattr(self, k) > 0, 'must be > 0') for k in ('norm_eps', 'rope_theta', 'routed_scaling_factor')],
            ('eval_capacity_factor', (self.eval_capacity_factor or 0) >= 0, 'must be None or >= 0 (0 = dropless)'),
            ('router', spec is not None, f'must be one of {tuple(ROUTERS)}'),
            *[('router', hasattr(self, f'{n}_loss_coef'), f"uses the loss term '{n}', which needs a config field "
               f'{n}_loss_coef (its weight)') for n in LOSSES if spec and n not in spec.skip_losses],
            ('n_embd', self.n_embd >= 1 and (self.head_dim is not None or self.n_embd % max(self.n_head, 1) == 0),
             f'must be a positive multiple of n_head={self.n_head} (or set head_dim)'),
            ('n_kv_head', self.n_kv_head is None or self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0,
             f'must divide n_head={self.n_head} (a key/value head serves n_head // n_kv_head query heads)'),
            ('head_dim', self.position != 'rope' or hd % 2 == 0, 'must be even with position=rope'),
            ('granularity', (4 * self.n_embd) % max(self.granularity, 1) == 0, f'must divide 4*n_embd={4 * self.n_embd}'),
            ('top_k', 1 <= self.top_k <= E or E == 1, f'must be in [1, n_experts={E}]'),
            ('moe_first_dense', E == 1 or self.moe_first_dense < self.n_layer,  # n_experts > 1 asks for an MoE
             f'must be < n_layer={self.n_layer}, else no block is MoE (a dense model: n_experts=1)'),
            ('capacity_factor', not (self.capacity_factor or self.eval_capacity_factor) or not spec or spec.capacity
             or spec.reads_capacity_factor, f'(or eval_) means nothing: router={self.router!r} declares no capacity'),
            ('balance_scope', self.balance_scope != 'pooled' or 'aux' not in (spec and spec.skip_losses or ()),
             f"='pooled' needs a router with a balance loss, not {self.router!r}"),
            ('shared_expert_gate', not self.shared_expert_gate or self.n_shared_experts >= 1,
             'needs n_shared_experts >= 1 (it gates their output)'),
            ('n_group', self.n_group >= 1 and E % G == 0, f'must be >= 1 and divide n_experts={E}'),
            ('n_group', self.n_group == 1 or (spec and spec.groups), f'> 1 needs a top-k router, not {self.router!r}'),
            ('topk_group', 1 <= self.topk_group <= G, f'must be in [1, n_group={self.n_group}]'),
            ('top_k', G == 1 or self.top_k <= self.topk_group * (E // G), 'must be <= topk_group * n_experts // n_group'),
            *[(k, self.expert_impl != 'grouped' or (getattr(self, k) or 4 * self.n_embd // max(self.granularity, 1)) % 8 == 0,
               "must be a multiple of 8 with expert_impl='grouped' (grouped_mm's 16-byte row strides in bf16); "
               "or use expert_impl='auto', which takes the loop when misaligned") for k in ('n_embd', 'expert_hidden')],
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f'MoEGPTConfig.{name}={getattr(self, name)!r} {why}')
        # None = follow the other fields; resolved here, so a checkpoint's model_args say what was built
        self.expert_hidden = self.expert_hidden or 4 * self.n_embd // self.granularity
        self.n_kv_head, self.head_dim = self.n_kv_head or self.n_head, hd
        self.qkv_bias, self.attn_out_bias = (self.bias if b is None else b for b in (self.qkv_bias, self.attn_out_bias))
        self.dense_hidden = self.dense_hidden or 4 * self.n_embd
        self.top_k = 1 if E == 1 else spec.top_k(self)  # soft: every expert
        self.norm_topk_prob = self.top_k > 1 if self.norm_topk_prob is None else self.norm_topk_prob

    @property
    def has_capacity(self):
        return self.n_experts > 1 and ROUTERS[self.router].capacity and (
            self.capacity_factor > 0 or (self.eval_capacity_factor or 0) > 0)

    @property
    def causal(self):
        """Whether a token's output depends only on tokens at its position or earlier (in any sequence). The
        router declares its own; capacity_priority='choice' breaks it, except per sequence with top-1."""
        return self.n_experts == 1 or ROUTERS[self.router].causal and (
            not self.has_capacity or self.capacity_priority == 'position'
            or (self.capacity_scope == 'sequence' and self.top_k == 1))

    @property
    def batch_dependent(self):
        """Whether a token's output depends on the other sequences of its micro-batch."""
        return self.n_experts > 1 and (ROUTERS[self.router].batch_dependent
                                       or (self.has_capacity and self.capacity_scope == 'micro_batch'))

    def is_moe_layer(self, i):
        return self.n_experts > 1 and i >= self.moe_first_dense and (i - self.moe_first_dense) % self.moe_every == 0

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]


# The fields a resumed run (or a model loaded from a native directory) may change: training settings.
# A checkpoint fixes every other field. train.py and hf.py derive their rules from this one set.
TUNABLE = frozenset({
    'dropout', 'moe_dropout', 'capacity_factor', 'eval_capacity_factor', 'capacity_priority', 'capacity_scope',
    'aux_loss_coef', 'z_loss_coef', 'balance_scope', 'expert_impl', 'router_fp32',
    'router_init_std', 'bias_update_rate'})


def activation_fn(name, h):
    """Apply the named activation; swiglu splits the hidden in two: silu(gate) * up. gelu_tanh is
    GPT-2's "gelu_new", needed to reproduce pretrained GPT-2 exactly."""
    if name == 'swiglu':
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return {'gelu': F.gelu, 'gelu_tanh': lambda v: F.gelu(v, approximate='tanh'), 'relu': F.relu,
            'silu': F.silu, 'tanh': torch.tanh}[name](h)


def compute_dtype(x):
    """The dtype matmuls run in: autocast's if it is on, else the input's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# ----------------------------------------------------------------------------- router and its losses

class Routing(NamedTuple):
    """What every router returns. Rows are (token, expert, gate) assignments, any number per token,
    a token's rows in its order of preference (what capacity keeps first). k > 0 says every token has
    exactly k rows, token-major (row t*k + j): the layer then takes its gather fast path."""
    token_N: Optional[torch.Tensor]  # (N,) int64: the token of each row, in 0..T-1 (None when k > 0: t = row // k)
    expert_N: torch.Tensor  # (N,) int64: its expert, in 0..E-1
    gate_N: torch.Tensor    # (N,) the weight of that expert's output in the token's sum
    logits_TE: torch.Tensor  # (T, E) router logits (z-loss, logs)
    probs_TE: torch.Tensor   # (T, E) rows sum to 1: the P of the balance losses
    k: int = 0
    dropped: Optional[torch.Tensor] = None  # routers that leave tokens out (expert choice): their fraction
    lse_T: Optional[torch.Tensor] = None  # logsumexp(logits_TE) where the router made it (the z-loss's)

    def topk(self):
        """(ids_TK, gates_TK) of a fixed-k routing."""
        return self.expert_N.view(-1, self.k), self.gate_N.view(-1, self.k)

    def tokens(self):  # token_N, built only when something needs it (the k fast path does not)
        return self.token_N if self.token_N is not None else torch.arange(
            self.expert_N.shape[0], device=self.expert_N.device) // self.k


@dataclass(frozen=True)
class RouterSpec:
    """A router and what is specific to it, declared once here instead of tested by name elsewhere."""
    route: Callable  # route(router: Router, x_TD) -> Routing
    causal: bool = True  # a token's rows depend on that token alone (tests/test_causality.py probes it)
    batch_dependent: bool = False  # its rows depend on the other tokens of the micro-batch
    capacity: bool = True  # the layer's Switch capacity (capacity_factor) applies to its rows
    reads_capacity_factor: bool = False  # without capacity: the router reads capacity_factor itself
    groups: bool = False  # supports group-limited routing (n_group > 1)
    noise: bool = False  # has noise weights (Router.noise)
    expert_bias: bool = False  # has the aux-free bias buffer, moved by MoEGPT.update_expert_bias
    skip_losses: tuple = ()  # LOSSES terms that do not apply to it
    top_k: Callable = lambda cfg: cfg.top_k  # rows per token (config.top_k is resolved with it)
    experts_per_token: Callable = lambda cfg: cfg.top_k  # routed experts a token passes through: FLOPs


ROUTERS = {}  # name -> RouterSpec


def register_router(name, **declared):
    def add(route):
        ROUTERS[name] = RouterSpec(route, **declared)
        return route
    return add


class Router(nn.Module):
    """The router's weights (gate; noise, expert_bias where declared); the routing is ROUTERS[name].route."""

    def __init__(self, config):
        super().__init__()
        self.spec, self.config = ROUTERS[config.router], config
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.noise = nn.Linear(config.n_embd, config.n_experts, bias=False) if self.spec.noise else None
        if self.spec.expert_bias:
            self.register_buffer('expert_bias', torch.zeros(config.n_experts))
        self.top_k, self.norm_topk_prob, self.capacity_factor = config.top_k, config.norm_topk_prob, config.capacity_factor
        self.eval_capacity_factor = config.capacity_factor if config.eval_capacity_factor is None else config.eval_capacity_factor

    def forward(self, x_TD):
        return self.spec.route(self, x_TD)

    def logits(self, x_TD, weight=None):
        """x_TD @ weight.T (the gate's by default); with router_fp32 in at least fp32, autocast off:
        routing decisions are sensitive to rounding."""
        weight = self.gate.weight if weight is None else weight
        if not self.config.router_fp32:
            return F.linear(x_TD, weight.to(compute_dtype(x_TD)))
        dt = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dt), weight.to(dt))

    def current_capacity_factor(self):
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def topk(self, logits_TE, probs_TE=None, scores_TE=None, select_TE=None):
        """Each token's top_k experts by select (default: probs; group-limited if n_group > 1), gated
        by scores (default: probs), renormalised (norm_topk_prob) and scaled (routed_scaling_factor).
        probs_TE=None: the softmax of the logits."""
        lse_T, plain = None, probs_TE is None and scores_TE is None and select_TE is None and self.config.n_group == 1
        if plain and self.norm_topk_prob:  # Mixtral's form: renormalised top-k probabilities = softmax of the
            # top-k logits. kernels.py: that, probs and the z-loss's lse as one autograd node (a shorter backward)
            probs_TE, ids_TK, gates_TK, lse_T = SoftmaxTopK.apply(logits_TE, self.top_k)
        else:
            probs_TE = F.softmax(logits_TE, dim=-1) if probs_TE is None else probs_TE
            scores_TE = probs_TE if scores_TE is None else scores_TE
            select_TE = scores_TE if select_TE is None else select_TE
            if self.config.n_group > 1:
                select_TE = limit_to_groups(select_TE, self.config.n_group, self.config.topk_group)
            best_TK, ids_TK = torch.topk(select_TE, self.top_k, dim=-1)
            gates_TK = best_TK if select_TE is scores_TE else scores_TE.gather(1, ids_TK)
            if self.norm_topk_prob:
                gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
        if self.config.routed_scaling_factor != 1.0:
            gates_TK = gates_TK * self.config.routed_scaling_factor
        return Routing(None, ids_TK.reshape(-1), gates_TK.reshape(-1), logits_TE, probs_TE, k=self.top_k, lse_T=lse_T)


@register_router('softmax', groups=True)
def softmax_topk(router, x_TD):
    """Switch (top-1) and Mixtral (top-2, renormalised): softmax over experts, top-k."""
    return router.topk(router.logits(x_TD))


@register_router('noisy_topk', groups=True, noise=True)
def noisy_topk(router, x_TD):
    """Shazeer et al. 2017: softmax of logits + N(0,1) * softplus(x W_noise), the noise in training only."""
    logits_TE = router.logits(x_TD)
    if router.training:
        logits_TE = logits_TE + torch.randn_like(logits_TE) * F.softplus(router.logits(x_TD, router.noise.weight))
    return router.topk(logits_TE)


@register_router('sigmoid', groups=True, expert_bias=True)
def sigmoid_topk(router, x_TD):
    """DeepSeek-V3: independent sigmoid scores; experts picked by top-k of score + expert_bias, a buffer
    nudged toward balanced load after every optimizer step; the bias steers selection, never the gates."""
    logits_TE = router.logits(x_TD)
    scores_TE = torch.sigmoid(logits_TE)
    probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    return router.topk(logits_TE, probs_TE, scores_TE, scores_TE + router.expert_bias.to(scores_TE.dtype))


@register_router('soft', capacity=False, top_k=lambda cfg: cfg.n_experts,
                 experts_per_token=lambda cfg: cfg.n_experts)
def soft_mixture(router, x_TD):
    """Every expert, weighted by its softmax probability (seed 000's dense Soft MoE)."""
    return router.topk(router.logits(x_TD))


@register_router('expert_choice', causal=False, batch_dependent=True, capacity=False, skip_losses=('aux',),
                 reads_capacity_factor=True, experts_per_token=lambda cfg: cfg.capacity_factor or cfg.top_k)
def expert_choice(router, x_TD):
    """Zhou et al. 2022: every expert takes its C highest-scoring tokens, C = ceil(cf * T / E),
    cf = capacity_factor (top_k when 0). It ranks tokens across the batch, later positions included,
    so a causal LM trained with it sees the future (docs/routing_zoo.md). Balanced by construction."""
    logits_TE = router.logits(x_TD)
    probs_TE = F.softmax(logits_TE, dim=-1)
    (T, E), cf = probs_TE.shape, router.current_capacity_factor() or router.top_k
    C = min(T, math.ceil(cf * T / E))
    gates_EC, tokens_EC = torch.topk(probs_TE.t(), C, dim=1)                  # (E, C) each expert's tokens
    picked_T = torch.zeros(T, device=x_TD.device).index_fill_(0, tokens_EC.reshape(-1), 1.0)
    expert_N = torch.arange(E, device=x_TD.device).repeat_interleave(C)
    return Routing(tokens_EC.reshape(-1), expert_N, gates_EC.reshape(-1), logits_TE, probs_TE,
                   dropped=1.0 - picked_T.mean())


def limit_to_groups(select_TE, n_group, topk_group):
    """DeepSeek-V3's group-limited routing: the experts form n_group groups of equal size; a group
    scores the sum of its 2 best selection scores; each token keeps only the experts of its topk_group
    best groups (the others get -inf). Under expert parallelism this bounds a token's fan-out."""
    T, E = select_TE.shape
    select_TGM = select_TE.view(T, n_group, E // n_group)
    group_scores_TG = select_TGM.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
    best_TG = group_scores_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    return select_TGM.masked_fill(~keep_TG.unsqueeze(-1), float('-inf')).view(T, E)


def count_rows(bucket_N, n, dtype=torch.long):  # (n,) rows per bucket; not bincount: it reads n on the host
    return torch.zeros(n, dtype=dtype, device=bucket_N.device).index_add_(0, bucket_N, torch.ones_like(bucket_N, dtype=dtype))


# A loss term is a function of the layer and its routing, registered by name; MoEGPT's loss is
# ce + sum over terms of config.<name>_loss_coef * (the term's mean over the MoE layers).
LOSSES = {}  # name -> term(moe, r: Routing, counts_E, S) -> scalar


def register_loss(name):
    def add(term):
        LOSSES[name] = term
        return term
    return add


def load_balancing_loss(probs_TE, counts_E, n_rows=None):
    """Switch Transformer aux loss, E * sum_i f_i * P_i. f_i: the fraction of the n_rows assignments
    (default: counts_E.sum()) that went to expert i (a count: no gradient); P_i: the mean router
    probability of expert i. Uniform routing gives exactly 1.0 for any number of experts per token.
    E / (T * n_rows) goes to the side with no gradient, as one number where n_rows is: one op each way."""
    (T, E), c_E = probs_TE.shape, counts_E.to(probs_TE.dtype)
    scale = E / T / (c_E.sum() if n_rows is None else n_rows)
    return torch.dot(c_E * scale, probs_TE.sum(dim=0))


def sequence_balancing_loss(probs_BSE, counts_BE):
    """DeepSeek's sequence-level variant: the Switch loss inside each sequence, averaged over the batch.
    It penalises imbalance within a sequence, not only across the whole batch."""
    f_BE = counts_BE.to(probs_BSE.dtype) / counts_BE.sum(dim=-1, keepdim=True)
    return (probs_BSE.shape[-1] * (f_BE * probs_BSE.mean(dim=1)).sum(-1)).mean()


@register_loss('aux')
def balance_loss(moe, r, counts_E, S):
    """The Switch loss over the micro-batch, inside each sequence (DeepSeek's sequence-level variant,
    averaged over the batch), or with the loads of all ranks ('global': Megatron-Core's global batch)."""
    E = moe.n_experts
    if moe.balance_scope == 'sequence':
        B = r.probs_TE.shape[0] // S
        token_N = r.tokens()
        counts_BE = count_rows(token_N // S * E + r.expert_N, B * E, r.probs_TE.dtype)  # (B*E,) per (sequence, expert)
        return sequence_balancing_loss(r.probs_TE.view(B, S, E), counts_BE.view(B, E))
    n_rows = None if moe.balance_scope == 'global' else r.expert_N.shape[0]  # global: all ranks' rows
    return load_balancing_loss(r.probs_TE, moe.balance_counts(counts_E), n_rows)


def router_z_loss(logits_TE, lse_T=None):
    """ST-MoE z-loss: the mean over tokens of logsumexp(logits)^2 (an MSE against 0: one fused op each
    way, where square().mean() is three backward); keeps router logits small. lse_T: the router's own."""
    lse_T = torch.logsumexp(logits_TE, dim=-1) if lse_T is None else lse_T
    return F.mse_loss(lse_T, lse_T.new_zeros(lse_T.shape))


@register_loss('z')
def z_loss(moe, r, counts_E, S):
    return router_z_loss(r.logits_TE, r.lse_T)


def pooled_balance_loss(counts_LE, P_LE):
    """HF's load_balancing_loss_func (balance_scope='pooled'): all layers' assignments and
    probabilities pooled, then E * sum f*P once (every layer routes the same tokens)."""
    f_E = counts_LE.sum(0) / counts_LE.sum()
    return counts_LE.shape[-1] * (f_E * P_LE.mean(0)).sum()


# ----------------------------------------------------------------------------- experts

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


class GroupedExperts(nn.Module):
    """n_experts MLPs with weights stacked along a leading expert dim, applied to expert-sorted rows."""

    def __init__(self, config):
        super().__init__()
        E, D, H = config.n_experts, config.n_embd, config.expert_hidden
        F_ = 2 * H if config.activation == 'swiglu' else H
        self.w1_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.w2_EHD = nn.Parameter(torch.empty(E, H, D))
        # finite values for a layer built alone (tests, bench.py); fork_rng: seeded model inits stay as they were
        with torch.random.fork_rng(devices=[]):
            torch.nn.init.normal_(self.w1_EDF, std=0.02)
            torch.nn.init.normal_(self.w2_EHD, std=0.02)
        self.b1_EF = nn.Parameter(torch.zeros(E, F_)) if config.bias else None
        self.b2_ED = nn.Parameter(torch.zeros(E, D)) if config.bias else None
        self.activation = config.activation
        self.expert_impl = config.expert_impl
        self.aligned = D % 8 == 0 and H % 8 == 0  # bf16 grouped_mm: row strides in multiples of 16 bytes
        self.cast_cache = None  # (w1, w2) in the matmul dtype while MoEGPT.train_step holds them

    def use_grouped(self, x):
        return use_grouped_mm(self.expert_impl, x.device.type, x.dtype, self.aligned)

    def forward(self, x_ND, offs_E1, expert_N, kept_N1=None):
        """x_ND: rows sorted by expert; offs_E1 (E+1,) int32: each expert's first row, then the end of
        the kept rows; expert_N: each row's expert. kept_N1 (capacity): False on the dropped rows past
        offs_E1[-1], whose output must be exactly 0."""
        dt = compute_dtype(x_ND)
        x_ND = x_ND.to(dt)
        ws = (self.w1_EDF, self.w2_EHD)
        if self.cast_cache is not None and self.cast_cache[0].dtype == dt:  # cast once for all micro-steps
            w1_EDF, w2_EHD = (CastOnce.apply(w, w_cast) for w, w_cast in zip(ws, self.cast_cache))
        else:
            w1_EDF, w2_EHD = (w.to(dt) for w in ws)
        if self.use_grouped(x_ND):  # kernels.py: the same math in two grouped_mm calls, CUDA's rules kept
            act = lambda h: activation_fn(self.activation, h)
            return grouped_mlp(x_ND, w1_EDF, self.b1_EF, w2_EHD, self.b2_ED, offs_E1, expert_N, kept_N1, act)
        b1_EF, b2_ED = (b.to(dt) if b is not None else None for b in (self.b1_EF, self.b2_ED))
        return self.forward_loop(x_ND, offs_E1.diff().tolist(), w1_EDF, b1_EF, w2_EHD, b2_ED)

    def forward_loop(self, x_ND, counts, w1_EDF, b1_EF, w2_EHD, b2_ED):
        """The reference: one plain matmul per expert on its contiguous slice. split / unbind, not
        x[a:b] / w[e]: each slice or select would get a full-size zero gradient in backward; split's
        and unbind's backward is a single cat / stack."""
        w1s, w2s = w1_EDF.unbind(0), w2_EHD.unbind(0)
        b1s = b1_EF.unbind(0) if b1_EF is not None else None
        b2s = b2_ED.unbind(0) if b2_ED is not None else None
        kept = sum(counts)
        xs = x_ND.split(list(counts) + [x_ND.shape[0] - kept])
        ys = []
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = xs[e] @ w1s[e] if b1s is None else torch.addmm(b1s[e], xs[e], w1s[e])  # addmm: nn.Linear's
            a = activation_fn(self.activation, h)
            ys.append(a @ w2s[e] if b2s is None else torch.addmm(b2s[e], a, w2s[e]))
        if kept < x_ND.shape[0]:  # the rows of dropped assignments (capacity): zeros
            ys.append(x_ND.new_zeros(x_ND.shape[0] - kept, w2_EHD.shape[-1]))
        return torch.cat(ys) if ys else x_ND.new_zeros(0, w2_EHD.shape[-1])


# ----------------------------------------------------------------------------- MoE layer

class MoELayer(nn.Module):
    """Router -> rows sorted by expert -> capacity (if any) -> grouped experts -> gate-weighted sum back
    into the tokens (+ shared experts). One dispatch for every router. Returns (output, aux dict)."""

    def __init__(self, config):
        super().__init__()
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        self.shared_experts = (MLP(config, config.n_shared_experts * config.expert_hidden)
                               if config.n_shared_experts > 0 else None)
        # Qwen2-MoE: a per-token sigmoid gate, D -> 1, on the shared experts' output
        self.shared_expert_gate = nn.Linear(config.n_embd, 1, bias=False) if config.shared_expert_gate else None
        self.n_experts, self.top_k, self.balance_scope = config.n_experts, config.top_k, config.balance_scope
        self.capacity_priority, self.capacity_scope = config.capacity_priority, config.capacity_scope
        self.losses = [n for n in LOSSES if n not in self.router.spec.skip_losses]  # each has a coef (config)
        self.dropout = nn.Dropout(config.dropout if config.moe_dropout is None else config.moe_dropout)
        self.active_experts = self.router.spec.experts_per_token(config)  # routed experts per token: FLOPs
        self.statistics = True  # dropped fraction and router entropy in the aux dict (MoEGPT.train_step)

    def forward(self, x_BSD, return_intermediate=False):
        (B, S, D), E = x_BSD.shape, self.n_experts
        x_TD, T = x_BSD.reshape(-1, D), B * S
        r = self.router(x_TD)                                                 # Routing: (token, expert, gate) rows
        N = r.expert_N.shape[0]
        cf = self.router.current_capacity_factor() if self.router.spec.capacity else 0
        expert_N, counts_E = r.expert_N, None
        if cf > 0:                                                            # over capacity: expert E, sorts last
            counts_E = count_rows(r.expert_N, E)                              # (E,) demand, before capacity
            expert_N = self.apply_capacity(r, counts_E, cf, B, S)
        sorted_expert_N, order_N = torch.sort(expert_N, stable=True)          # (N,) row n of the sort <- row order_N[n]
        experts_E1 = torch.arange(E + 1, device=x_TD.device)
        offs_E1 = torch.searchsorted(sorted_expert_N, experts_E1, out_int32=True)  # (E+1,) first row of each; [E]: kept
        counts_E = offs_E1.diff() if counts_E is None else counts_E           # (E,) rows per expert
        kept_N1 = (sorted_expert_N < E).unsqueeze(1) if cf > 0 else None      # (N, 1) False on dropped rows
        xc_TD = x_TD.to(compute_dtype(x_TD))  # rows travel in the matmul dtype (half the bytes in bf16)
        if r.k:  # fast path, every token has k rows: permutations both ways (no atomic adds in backward)
            x_ND = SortRows.apply(xc_TD, order_N, r.k)                       # (N, D) expert-sorted
        else:
            token_N = r.token_N.index_select(0, order_N)                      # (N,) token of each sorted row
            x_ND = xc_TD.index_select(0, token_N)                             # (N, D) expert-sorted
        if kept_N1 is not None:
            x_ND = torch.where(kept_N1, x_ND, 0)
        y_ND = self.experts(x_ND, offs_E1, sorted_expert_N, kept_N1)          # (N, D)
        if kept_N1 is not None:
            y_ND = torch.where(kept_N1, y_ND, 0)                               # dropped rows add exactly 0
        if r.k:
            y_TKD = UnsortRows.apply(y_ND, order_N).view(T, r.k, D)          # back to token order
            out_TD = torch.bmm(r.gate_N.view(T, 1, r.k).to(y_TKD.dtype), y_TKD).view(T, D)  # (T, D) gate-weighted sum
        else:
            y_ND = y_ND * r.gate_N.index_select(0, order_N).unsqueeze(1).to(y_ND.dtype)
            out_TD = y_ND.new_zeros(T, D).index_add_(0, token_N, y_ND)        # (T, D) each token's rows summed
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        out_BSD = self.dropout(out_TD.view(B, S, D))

        counts_E = counts_E.to(torch.promote_types(r.probs_TE.dtype, torch.float32))  # for losses and logs
        aux = {'losses': {name: LOSSES[name](self, r, counts_E, S) for name in self.losses}}
        if self.balance_scope == 'pooled':  # MoEGPT pools counts and P over the layers (HF's loss)
            aux['balance'] = (self.balance_counts(counts_E), r.probs_TE.mean(dim=0))
        aux['expert_counts'] = counts_E  # demand per expert (made for the loss terms anyway)
        if self.statistics:  # dropped fraction and router entropy (train.py: on the steps that log)
            with torch.no_grad():
                drop = r.dropped if r.dropped is not None else 1.0 - offs_E1[E] / N if cf > 0 else x_TD.new_zeros(())
                aux.update(drop_frac=drop.float(),
                           router_entropy=torch.special.entr(r.probs_TE).sum(-1).mean().float())
        if return_intermediate:
            aux['routing'] = {'router_logits': r.logits_TE.view(B, S, E), 'router_probs': r.probs_TE.view(B, S, E),
                              'token_N': r.tokens(), 'expert_N': r.expert_N, 'gate_N': r.gate_N}
            if r.k:
                ids_TK, gates_TK = r.topk()
                aux['routing'].update(topk_ids=ids_TK.view(B, S, -1), topk_weights=gates_TK.view(B, S, -1))
        return out_BSD, aux

    def apply_capacity(self, r, counts_E, capacity_factor, B, S):
        """Switch/GShard capacity: each expert (per sequence with capacity_scope='sequence') keeps its first
        ceil(cf * rows / slots) rows in priority order: 'position' (all of position s before s+1: causal)
        or 'choice' (GShard: every first choice of the micro-batch before any second, so a *later* token
        can drop an earlier token's second choice). Returns each row's expert (E if dropped, so it sorts
        past every expert and computes zero)."""
        E, T, N = self.n_experts, B * S, r.expert_N.shape[0]
        token_N = r.tokens() if not r.k or self.capacity_scope == 'sequence' else None
        if r.k:  # k rows per token, token-major: the priority order is a transpose
            a_BSK = torch.arange(N, device=r.expert_N.device).view(B, S, r.k)
            order_P = (a_BSK.permute(1, 2, 0) if self.capacity_priority == 'position'   # (s, j, b) order
                       else a_BSK.view(T, r.k).t()).reshape(-1)                         # (j, t) order
        else:  # j: which choice of its token a row is (0 = first)
            j_N = self.rank_in_bucket(token_N, count_rows(token_N, T))
            key_N = ((token_N % S) * E + j_N) * B + token_N // S if self.capacity_priority == 'position' else j_N * T + token_N
            order_P = torch.argsort(key_N)                                     # rows in priority order
        bucket_N, counts_K = r.expert_N, counts_E                                # slots: (expert) or (sequence, expert)
        if self.capacity_scope == 'sequence':
            bucket_N = token_N // S * E + r.expert_N
            counts_K = count_rows(bucket_N, B * E)
        capacity = min(math.ceil(capacity_factor * N / counts_K.numel()), N)  # past N rows: none dropped
        bucket_P = bucket_N.index_select(0, order_P)
        kept_P = self.rank_in_bucket(bucket_P, counts_K) < capacity
        kept_N = torch.empty_like(kept_P).scatter_(0, order_P, kept_P)
        return torch.where(kept_N, r.expert_N, E)

    @staticmethod
    def rank_in_bucket(bucket_N, counts):
        """Each row's position among the rows of its bucket, in row order (a stable sort)."""
        order_N = torch.argsort(bucket_N, stable=True)
        start = torch.cumsum(counts, 0) - counts
        rank_sorted_N = torch.arange(bucket_N.numel(), device=bucket_N.device) - start[bucket_N[order_N]]
        return torch.empty_like(rank_sorted_N).scatter_(0, order_N, rank_sorted_N)

    def balance_counts(self, counts_E):
        """The loads f is made of: this micro-batch's, or the global batch's (all ranks)."""
        if self.balance_scope == 'global' and torch.distributed.is_available() and torch.distributed.is_initialized():
            counts_E = counts_E.clone()  # the statistics keep this micro-batch's demand
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
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == 'learned':  # rope has no table: positions rotate q and k in attention
            modules['wpe'] = nn.Embedding(config.block_size, config.n_embd)
        blocks = [Block(config, config.is_moe_layer(i), i) for i in range(config.n_layer)]
        modules.update(drop=nn.Dropout(config.dropout), h=nn.ModuleList(blocks), ln_f=make_norm(config, config.n_embd))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        if not config.causal:  # what makes it so is declared: by the router, or by capacity's priority
            why = ('each expert picks tokens across the whole batch, later positions included' if not
                   ROUTERS[config.router].causal else "capacity_priority='choice': a later token's first "
                   "choice can drop an earlier token's second")
            warnings.warn(f'router={config.router}: {why}, so a causal LM trained with it sees the future; its '
                          'losses are not comparable with causal settings (docs/routing_zoo.md)')
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
            torch.nn.init.normal_(moe.experts.w2_EHD, mean=0.0, std=resid_std)  # (biases: zeros, as built)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def moe_layers(self):
        return [b.mlp for b in self.transformer.h if b.is_moe]

    def get_num_params(self, non_embedding=True, experts_per_token=None):
        """Total and active parameter counts. non_embedding drops the position embeddings (and untied
        token embeddings, a lookup; tied ones count as lm_head, as in nanoGPT). experts_per_token: a
        measured mean (dynamic-k routers) instead of what the router declares."""
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
            inactive += round((moe.n_experts - (experts_per_token or moe.active_experts)) * per_expert)
        return ParamCount(total=total, active=total - inactive)

    @torch.no_grad()
    def update_expert_bias(self, expert_counts_LE):
        """DeepSeek-V3's auxiliary-loss-free balancing, called after each optimizer step with the
        step's tokens per expert (all micro-steps and ranks, so every rank moves identically):
        bias += rate * sign(mean load - load). Only routers that declare expert_bias have it."""
        for moe, counts_E in zip(self.moe_layers(), expert_counts_LE):
            if moe.router.spec.expert_bias:
                counts_E = counts_E.to(moe.router.expert_bias.device, torch.float32)
                moe.router.expert_bias += self.config.bias_update_rate * torch.sign(counts_E.mean() - counts_E)

    @contextlib.contextmanager
    def train_step(self, cast_dtype=None, statistics=True):
        """train.py runs an optimizer step's micro-steps inside. cast_dtype: the experts' weights cast to
        it once, here, not at every forward (the weights change only after the micro-steps; gradients
        still reach the fp32 weights). statistics=False: the MoE layers leave out their statistics
        (dropped fraction, router entropy: train.py computes them on the steps that log). Undone on exit."""
        for moe in self.moe_layers():
            moe.statistics = statistics
            if cast_dtype is not None:
                moe.experts.cast_cache = tuple(w.detach().to(cast_dtype) for w in (moe.experts.w1_EDF,
                                                                                   moe.experts.w2_EHD))
        try:
            yield
        finally:
            for moe in self.moe_layers():
                moe.statistics, moe.experts.cast_cache = True, None

    @property
    def uses_expert_bias(self):
        """Whether train.py must call update_expert_bias after each optimizer step."""
        return any(moe.router.spec.expert_bias for moe in self.moe_layers())

    def forward(self, idx, targets=None, return_intermediate=False, kv_cache=None, return_logits=True):
        """Returns (logits, loss, stats). loss = ce + sum of config.<name>_loss_coef * losses[name] (None
        without targets). return_logits=False (training): on CUDA the LM head + CE run in chunks (torch's
        linear_cross_entropy; the (B*S, vocab) logits never exist at once) and logits is None. stats: detached
        tensors for logging, 'ce', 'loss', 'losses' ({name: term}, empty for a dense model), per MoE layer
        'expert_counts' (L_moe, E), 'drop_frac' (L_moe,) and 'router_entropy' (L_moe,) (these two not inside
        train_step(statistics=False)), and 'routing' (a dict per MoE layer) with return_intermediate.
        kv_cache (a KVCache, generation only): idx continues the cached tokens; filled in place."""
        device, (b, t) = idx.device, idx.size()
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

        stack = lambda key, *shape: torch.stack([a[key] for a in auxes]) if auxes else x.new_zeros(0, *shape)
        stats = {'expert_counts': stack('expert_counts', self.config.n_experts),  # drops and entropy: if computed
                 **{k: stack(k) for k in ('drop_frac', 'router_entropy') if not auxes or k in auxes[0]}}
        # each loss term: its mean over the MoE layers, or HF's pooled balance loss (balance_scope='pooled')
        losses = {name: torch.stack([a['losses'][name] for a in auxes]).mean() for name in auxes[0]['losses']} if auxes else {}
        if auxes and 'balance' in auxes[0]:
            losses['aux'] = pooled_balance_loss(*(torch.stack(t) for t in zip(*[a['balance'] for a in auxes])))
        stats['losses'] = {name: v.detach() for name, v in losses.items()}
        if return_intermediate:
            stats['routing'] = [a['routing'] for a in auxes]
        logits = loss = None
        if targets is None:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position is needed
        elif return_logits or not chunked_lm_head(x.device):  # kernels.py: CUDA, torch >= 2.13
            logits = self.lm_head(x)
            # CE in at least fp32: bf16 logits lose the small differences the loss is made of
            ce = F.cross_entropy(logits.view(b * t, -1).to(torch.promote_types(logits.dtype, torch.float32)),
                                 targets.view(-1), ignore_index=-1)
        else:
            ce = F.linear_cross_entropy(x.view(b * t, -1), self.lm_head.weight, targets.view(-1), ignore_index=-1,
                                        options=nn.LinearCrossEntropyOptions())
        if targets is not None:
            # The one loss: ce + each term x its coefficient. A dense model's is ce itself (not ce + 0:
            # inductor folds that to ce, and returning ce.detach() beside it marks it non-differentiable)
            loss = ce
            for name, term in losses.items():
                loss = loss + getattr(self.config, f'{name}_loss_coef') * term
            stats['loss'], stats['ce'] = loss.detach(), ce.detach()
        return logits, loss, stats

    def crop_block_size(self, block_size):
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if 'wpe' in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, experts_per_token=None):
        """Training FLOPs (forward + backward) per token of a full block_size sequence: 6 x the active
        parameters plus attention's 12*L*H*Q*T (PaLM appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.block_size
        return 6 * self.get_num_params(experts_per_token=experts_per_token).active + 12 * L * H * Q * T

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops, experts_per_token=None):
        """Model FLOPs utilisation on *active* parameters against peak_flops (hardware.py)."""
        flops_per_iter = self.flops_per_token(experts_per_token) * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    def generate(self, idx, max_new_tokens, **kw):
        """Sample max_new_tokens after idx (B, S), with a KV cache by default: generation.generate's options."""
        return generation.generate(self, idx, max_new_tokens, **kw)

    sample_next = staticmethod(generation.sample_next)

"""
The optimizer set-up: which parameters get which optimizer and which decay. One file, so a new
optimizer (or a new parameter group) is an edit here, not in model.py or train.py.

optimizer='adamw' (the default): torch's AdamW on everything. optimizer='muon': Muon (Keller Jordan;
Moonshot's "Muon is Scalable") on the hidden matrices (attention, dense MLPs, shared experts) and on each
routed expert's matrices, AdamW on the rest, in one torch Optimizer (MuonAdamW) so that GradScaler, the
NaN guard, the checkpoint and expert parallelism see what they see with AdamW (docs/training.md,
"The optimizer: AdamW or Muon").
"""
import inspect

import torch
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_scalar_dtype

try:  # torch's Muon (its Newton-Schulz, coefficients and lr rule); a torch without it trains with AdamW only
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr, \
        _zeropower_via_newtonschulz
    OPTIMIZERS = ('adamw', 'muon')
except ImportError:
    DEFAULT_A = DEFAULT_B = DEFAULT_C = DEFAULT_NS_STEPS = EPS = None
    OPTIMIZERS = ('adamw',)


def fused_adamw_supported(device_type):
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: CUDA only
        return device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters


def decays(name, p):
    """nanoGPT's rule: matmul weights, stacked experts and embeddings decay, biases and norms don't."""
    return p.dim() >= 2 and not name.endswith(('.b1_EF', '.b2_ED'))  # the experts' stacked biases are 2-D


def uses_muon(name, p):
    """Muon's matrices: the 2-D weights of the blocks (attention, dense MLPs, shared experts) and the routed
    experts' stacked (E, D, F) weights, each expert's matrix its own. Not the embeddings and lm_head (a
    lookup and a classifier over the vocabulary: Muon's paper keeps them on AdamW), not the router (a
    classifier over the experts, E x D: orthogonalising its update would give every expert's logit a step
    of the same size whatever its gradient, the opposite of what load balancing needs; docs/training.md)
    nor the shared-expert gate (1 x D: a vector), and not biases and norms (vectors)."""
    return (name.startswith('transformer.h.') and decays(name, p) and '.router.' not in name
            and not name.endswith('shared_expert_gate.weight'))


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, foreach=None, optimizer='adamw',
                         muon_lr=0.0, muon_momentum=0.95):
    """AdamW, decaying what decays() says. Fused wherever torch has the kernel (the CPU too:
    docs/performance.md). A fused or foreach call can't mix plain tensors with FSDP2's DTensors (FSDP2 +
    expert parallelism, whose expert shards stay plain), so each kind gets param groups of its own.
    foreach: force it (tests). optimizer='muon': MuonAdamW, Muon's peak lr muon_lr (0 = learning_rate)."""
    if optimizer == 'muon':
        return muon_adamw(model, weight_decay, learning_rate, betas, muon_lr or learning_rate, muon_momentum)
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((decays(name, p), type(p).__name__ == 'DTensor'), []).append(p)
    optim_groups = [{'params': ps, 'weight_decay': weight_decay if decay else 0.0}
                    for (decay, _), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    extra = dict(fused=True) if fused_adamw_supported(device_type) and not foreach else dict(foreach=foreach)
    return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra)


def from_config(model, c, device_type):
    """train.py's optimizer, from its config dict c."""
    return configure_optimizers(model, c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']), device_type,
                                optimizer=c['optimizer'], muon_lr=c['muon_lr'], muon_momentum=c['muon_momentum'])


def muon_adamw(model, weight_decay, learning_rate, betas, muon_lr, momentum):
    """Three groups, in model order: Muon's matrices, AdamW with decay, AdamW without. Muon decays too
    (decoupled, as AdamW: Moonshot's recipe). train.py's schedule sets every group's lr; a Muon group steps
    with lr x lr_ratio, so muon_lr follows the same warmup and cosine as learning_rate."""
    groups = {'muon': [], 'decay': [], 'no_decay': []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups['muon' if uses_muon(name, p) else 'decay' if decays(name, p) else 'no_decay'].append(p)
    ratio = muon_lr / learning_rate if learning_rate else 1.0  # (train_config: muon_lr > 0 needs learning_rate > 0)
    settings = dict(muon=dict(muon=True, lr_ratio=ratio), decay={}, no_decay=dict(weight_decay=0.0))
    param_groups = [dict(params=ps, **settings[k]) for k, ps in groups.items() if ps]  # none empty: EP's load
    return MuonAdamW(param_groups, lr=learning_rate, weight_decay=weight_decay, betas=betas, momentum=momentum)


def zeropower_via_newtonschulz_batched(G, ns_coefficients, ns_steps, eps, dtype=torch.bfloat16):
    """torch's _zeropower_via_newtonschulz (the same quintic iteration, coefficients and steps, in bf16 by
    default) on each matrix of a stack G (E, A, B) at once. What torch's lacks: it takes one 2-D matrix,
    it scales by the whole tensor's norm where each expert's matrix needs its own, and it runs in bf16 only."""
    a, b, c = ns_coefficients
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # each matrix's spectral norm <= 1
    for _ in range(ns_steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X.mT if G.size(-2) > G.size(-1) else X


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the param groups marked muon=True, AdamW (torch's functional adamw) for the others: one
    optimizer, one state_dict, one step. A Muon parameter of 2-D takes exactly torch.optim.Muon's step
    (torch's Newton-Schulz); a stacked (E, D, F) expert weight takes it for each of its E matrices, in one
    batched Newton-Schulz, with the lr adjustment of one (D, F) matrix (match_rms_adamw: 0.2 sqrt(max(D, F)),
    the RMS of an AdamW update, so learning_rate keeps its meaning). ns_dtype: the Newton-Schulz's dtype;
    'auto' is torch's bf16 on a GPU and float32 elsewhere (a CPU without bf16 matmul units takes ~100x
    longer in bf16: 0.2-0.9 s per 128 x 512 matrix here, more than the whole fp32 training step). Not for
    FSDP2's DTensors (a shard is not a matrix): train_config refuses optimizer='muon' with fsdp=True."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                 nesterov=True, ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), ns_steps=DEFAULT_NS_STEPS,
                 ns_eps=EPS, ns_dtype='auto', adjust_lr_fn='match_rms_adamw'):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                                      nesterov=nesterov, ns_coefficients=ns_coefficients, ns_steps=ns_steps,
                                      ns_eps=ns_eps, ns_dtype=ns_dtype, adjust_lr_fn=adjust_lr_fn, muon=False,
                                      lr_ratio=1.0))
        for g in self.param_groups:
            for p in g['params']:
                if g['muon'] and (p.dim() not in (2, 3) or type(p).__name__ == 'DTensor'):
                    raise ValueError(f'Muon takes 2-D matrices and (E, D, F) stacks of them (plain tensors), '
                                     f'not {type(p).__name__} {tuple(p.shape)}')

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, 'no closure: train.py never passes one'
        for g in self.param_groups:
            ps = [p for p in g['params'] if p.grad is not None]
            if g['muon']:
                self._muon(g, ps)
            else:
                self._adamw(g, ps)

    def _muon(self, g, ps):
        """torch's _single_tensor_muon, for 2-D and stacked 3-D parameters."""
        lr, mu = g['lr'] * g['lr_ratio'], g['momentum']
        for p in ps:
            grad, state = p.grad, self.state[p]
            if 'momentum_buffer' not in state:
                state['momentum_buffer'] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buf = state['momentum_buffer']
            buf.lerp_(grad, 1 - mu)
            update = grad.lerp(buf, mu) if g['nesterov'] else buf
            dtype = g['ns_dtype'] if g['ns_dtype'] != 'auto' else 'bfloat16' if p.is_cuda else 'float32'
            args = (g['ns_coefficients'], g['ns_steps'], g['ns_eps'])
            if p.dim() == 2 and dtype == 'bfloat16':  # torch's own
                update = _zeropower_via_newtonschulz(update, *args)
            else:  # a stack of experts, or a matrix as a stack of one
                update = zeropower_via_newtonschulz_batched(update.view(-1, *p.shape[-2:]), *args,
                                                            getattr(torch, dtype)).view(p.shape)
            p.mul_(1 - lr * g['weight_decay'])
            p.add_(update, alpha=-_adjust_lr(lr, g['adjust_lr_fn'], p.shape[-2:]))  # one matrix's shape

    def _adamw(self, g, ps):
        """torch.optim.AdamW's (non-fused) step: the same state, so its checkpoint reads like AdamW's."""
        for p in ps:
            state = self.state[p]
            if not state:
                state['step'] = torch.tensor(0.0, dtype=_get_scalar_dtype())  # on the CPU, as torch's
                state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st = [self.state[p] for p in ps]
        adamw(ps, [p.grad for p in ps], [s['exp_avg'] for s in st], [s['exp_avg_sq'] for s in st], [],
              [s['step'] for s in st], amsgrad=False, beta1=g['betas'][0], beta2=g['betas'][1], lr=g['lr'],
              weight_decay=g['weight_decay'], eps=g['eps'], maximize=False)

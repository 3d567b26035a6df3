"""
Beyond one GPU: expert parallelism (EP) and FSDP2 for MoEGPT, on torch.distributed only.

Expert parallelism needs no change to model.py. MoELayer.forward routes and sorts its N token->expert
rows by expert and hands them to `self.experts(x_ND, offs_E1, expert_N, kept_N1)`; here that
module is swapped for ExpertParallelExperts, a GroupedExperts holding only this rank's contiguous
shard of experts (EP rank r of N holds experts [r*E/N, (r+1)*E/N)). Its forward
  1. exchanges the per-expert row counts with all_to_all_single (so every rank knows how many rows of
     each of its local experts each source sends), the split sizes follow from them,
  2. sends the kept rows to their experts' ranks with all_to_all_single (variable splits; an autograd
     Function whose backward is the reverse all_to_all),
  3. groups the received rows by local expert (stable), runs the local experts with GroupedExperts'
     very own code (grouped_mm or the slice loop), and restores the received order,
  4. sends the results back (the reverse all_to_all, differentiable too) and returns them in the
     original row order, zeros for the dropped rows (capacity mode).
Gate weighting and the scatter-add back to the tokens stay in MoELayer, on the source rank.

Gradients. Every rank computes the gradient of its own local loss L_r; the training loss is the mean
over the W = world_size ranks, L = (1/W) sum_r L_r.
  - Non-expert parameters are replicated: average their gradients over all ranks, with DDP
    (ddp_ignore_expert_params keeps DDP away from the expert shards; DDP buckets and overlaps the
    all-reduce with backward, which is why train.py keeps it) or manually (reduce_gradients).
  - An expert shard receives, through the backward all_to_all, d L_q / dW from every source rank q of
    its EP group: the *sum* over sources. Summed again over the replicas holding the same experts (the
    ranks with the same EP rank in the other EP groups: `replica_group`) it is sum over all W ranks;
    divided by W it is exactly the single-process gradient of the mean loss
    (reduce_expert_gradients).
The EP all_to_alls run on their own process group (init_expert_parallel creates it), never on the
default group DDP uses, so the two never have to agree on an order of collectives.

Single-file checkpoints hold the full model whatever N: full_state_dict gathers the expert shards (same keys and
shapes as the single-process model), load_full_state_dict slices them; full_optim_state_dict /
load_full_optim_state_dict do the same for the AdamW moments, so a run resumes exactly with another N.
DCP checkpoints gather nothing: dcp_state_dict / dcp_load give torch.distributed.checkpoint each rank's
own shards under global names and shapes, and DCP reshards on load (checkpoint.py).

FSDP2 (apply_fsdp): torch.distributed.fsdp.fully_shard on every Block, then on the root. It composes
with EP: the expert shards are passed as ignored_params (FSDP shards and reduces only the dense
parameters, over all ranks; EP shards the experts), and their gradients are reduced with
reduce_expert_gradients as without FSDP. clip_grad_norm_ here computes the global norm over
replicated, FSDP-sharded (DTensor) and EP-sharded gradients alike.
"""
import os
import warnings
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.constants import default_pg_timeout

from model import GroupedExperts

EXPERT_PARAM_NAMES = ('w1_EDF', 'w2_EHD', 'b1_EF', 'b2_ED')


def _is_dtensor(t):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(t, DTensor)


def unwrap(model):
    """The plain MoEGPT under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------- process groups

class EPGroups(NamedTuple):
    ep: Optional[dist.ProcessGroup]  # the N ranks that split the experts between them
    replica: Optional[dist.ProcessGroup]  # the W/N ranks holding the same experts (None when W == N)
    ep_size: int


def init_expert_parallel(ep_size):
    """Create the EP groups (contiguous blocks of ep_size ranks, so EP all-to-alls stay inside a node
    when ep_size <= GPUs per node) and the expert-replica groups (ranks r, r+N, r+2N, ...). Every rank
    must call it (new_group is collective). world_size must be a multiple of ep_size."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f'expert_parallel={ep_size} must divide the world size ({world})')
    ep = replica = None
    for g in range(world // ep_size):
        ranks = list(range(g * ep_size, (g + 1) * ep_size))
        pg = dist.new_group(ranks)
        if rank in ranks:
            ep = pg
    if world > ep_size:
        for i in range(ep_size):
            ranks = list(range(i, world, ep_size))
            pg = dist.new_group(ranks)
            if rank in ranks:
                replica = pg
    return EPGroups(ep, replica, ep_size)


# ----------------------------------------------------------------------------- the all-to-all

class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits along dim 0; backward sends the gradients back the
    way the rows came (the same call with the splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x, out_splits, in_splits, group):
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all(x, out_splits, in_splits, group):
    """Differentiable all_to_all_single: x's rows, in_splits[j] of them for rank j, are sent; the
    result holds out_splits[i] rows from rank i."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


# ----------------------------------------------------------------------------- EP experts

class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts holding only this rank's shard of the experts (same parameter names, so
    state_dict keys match the single-process model; shapes have E/N experts); forward has the same
    signature and result as GroupedExperts.forward on the full set of experts."""

    def __init__(self, experts: GroupedExperts, ep_group, replica_group=None):
        E = experts.w1_EDF.shape[0]
        N = dist.get_world_size(ep_group)
        if E % N:
            raise ValueError(f'n_experts={E} must be divisible by expert_parallel={N}')
        world = dist.get_world_size()
        if replica_group is None and world != N:
            raise ValueError(f'world size {world} != expert_parallel={N}: pass the replica group '
                             '(init_expert_parallel makes both)')
        E_local = E // N
        r = dist.get_rank(ep_group)
        D, F_ = experts.w1_EDF.shape[1:]
        H = experts.w2_EHD.shape[1]
        sliced = SimpleNamespace(n_experts=E_local, n_embd=D, expert_hidden=H, activation=experts.activation,
                                 bias=experts.b1_EF is not None, expert_impl=experts.expert_impl)
        super().__init__(sliced)  # same class, sliced config: the local experts run GroupedExperts' code
        lo, hi = r * E_local, (r + 1) * E_local
        with torch.no_grad():
            for name in EXPERT_PARAM_NAMES:
                src = getattr(experts, name)
                if src is not None:  # a fresh Parameter holding a copy of this rank's slice
                    setattr(self, name, nn.Parameter(src.detach()[lo:hi].clone(), requires_grad=src.requires_grad))
        self.n_experts_total, self.ep_size, self.ep_rank = E, N, r
        self.expert_offset = lo
        self.ep_group, self.replica_group = ep_group, replica_group

    def extra_repr(self):
        return (f'experts [{self.expert_offset}, {self.expert_offset + self.w1_EDF.shape[0]}) of '
                f'{self.n_experts_total}, ep rank {self.ep_rank}/{self.ep_size}')

    def forward(self, x_ND, offs_E1, expert_N, kept_N1=None):
        N_ranks, E_local = self.ep_size, self.w1_EDF.shape[0]
        N, D = x_ND.shape  # the rows come in the matmul dtype (MoELayer casts before its gather)
        # 1. rows per (destination rank, local expert) -> (source rank, local expert) on the receiver
        send_RE = offs_E1.diff().long().view(N_ranks, E_local)
        recv_RE = _all_to_all(send_RE.reshape(-1), [E_local] * N_ranks, [E_local] * N_ranks,
                              self.ep_group).view(N_ranks, E_local)
        counts = torch.stack([send_RE, recv_RE]).cpu()  # one device->host sync for all split sizes
        send_R, recv_R = counts[0].sum(1).tolist(), counts[1].sum(1).tolist()
        n_kept = sum(send_R)  # rows past the kept ones were dropped (capacity mode): zeros below
        # 2. dispatch: the kept rows are already contiguous per destination rank
        x_MD = all_to_all(x_ND[:n_kept], recv_R, send_R, self.ep_group)         # (M, D) by source
        # 3. group the received rows by local expert (stable: source order inside an expert)
        local_M = torch.arange(E_local, device=x_ND.device).repeat(N_ranks).repeat_interleave(
            recv_RE.reshape(-1), output_size=x_MD.shape[0])
        order_M = torch.argsort(local_M, stable=True)
        if x_MD.shape[0]:
            offs_local = F.pad(torch.cumsum(recv_RE.sum(0), 0, dtype=torch.int32), (1, 0))  # (E_local+1,)
            y_sorted_MD = super().forward(x_MD[order_M], offs_local, local_M[order_M])
        else:  # nothing for my experts: still a graph node, so this rank takes part in the backward all_to_all
            y_sorted_MD = x_MD * 0
        y_MD = torch.empty_like(y_sorted_MD).index_copy(0, order_M, y_sorted_MD)  # back to source order
        # 4. combine: results go back to the ranks the rows came from, in their original order
        y_ND = all_to_all(y_MD, send_R, recv_R, self.ep_group)
        if n_kept < N:
            y_ND = torch.cat([y_ND, y_ND.new_zeros(N - n_kept, y_ND.shape[1])])
        return y_ND


def expert_parallel_modules(model):
    """(qualified name, module) of every ExpertParallelExperts in the (unwrapped) model."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, ExpertParallelExperts)]


def expert_params(model):
    return [p for _, m in expert_parallel_modules(model) for p in m.parameters()]


def enable_expert_parallel(model, ep_group, replica_group=None):
    """Swap the experts of every MoE layer for this rank's shard. ep_group: a process group or the
    EPGroups of init_expert_parallel. Every rank must start from the same full model (same seed, or
    the same checkpoint loaded before; or load_full_state_dict afterwards). Call it before DDP /
    FSDP wrapping, torch.compile and building the optimizer."""
    if isinstance(ep_group, EPGroups):
        ep_group, replica_group = ep_group.ep, ep_group.replica
    raw = unwrap(model)
    for moe in raw.moe_layers():
        if isinstance(moe.experts, ExpertParallelExperts):
            raise ValueError('expert parallelism is already enabled on this model')
        moe.experts = ExpertParallelExperts(moe.experts, ep_group, replica_group)  # same slot: same param order
    return model


# ----------------------------------------------------------------------------- gradients

def ddp_ignore_expert_params(module):
    """Tell DDP to leave the expert shards alone (they differ between ranks: DDP would broadcast
    rank 0's over them and all-reduce shards of different experts). Call on the exact module that
    is then wrapped by DDP (the compiled one if compiled: names carry its _orig_mod. prefix)."""
    ids = {id(p) for p in expert_params(module)}
    names = [n for n, p in module.named_parameters() if id(p) in ids]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


def _all_reduce_flat(tensors, group, scale=None):
    """Sum the tensors in place over the group (one flat buffer per dtype; group None: no
    reduction, only the scale), then multiply by scale."""
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        if scale is not None:
            flat.mul_(scale)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def reduce_expert_gradients(model):
    """Expert shards: sum over the ranks holding the same experts, divided by the world size (each
    holder already has the sum over its EP group's sources, see the module docstring). The result is
    the single-process gradient of the mean loss. Call after the last backward of the step."""
    mods = expert_parallel_modules(model)
    if not mods:
        return
    world = dist.get_world_size()
    groups = {}
    for _, m in mods:
        for p in m.parameters():
            if p.grad is None:  # no rows reached these experts: a zero gradient, as in the single process
                p.grad = torch.zeros_like(p)  # (AdamW still steps them; replicas flatten the same list)
            groups.setdefault(m.replica_group, []).append(p.grad)
    for group, grads in groups.items():
        _all_reduce_flat(grads, group, 1.0 / world)


@torch.no_grad()
def reduce_gradients(model):
    """Manual gradient reduction without DDP: non-expert gradients averaged over all ranks (one
    flat all-reduce per dtype, after backward; DDP would overlap it with backward instead), expert
    gradients as in reduce_expert_gradients. Skips FSDP-managed (DTensor) parameters."""
    ex = {id(p) for p in expert_params(model)}
    dense = [p.grad for p in unwrap(model).parameters()
             if p.grad is not None and id(p) not in ex and not _is_dtensor(p)]
    if dense:
        _all_reduce_flat(dense, dist.group.WORLD, 1.0 / dist.get_world_size())
    reduce_expert_gradients(model)


@torch.no_grad()
def grad_norm(model):
    """The global 2-norm of the whole distributed model's gradients: replicated gradients count once,
    FSDP shards (DTensor) and expert shards are summed over their ranks, so every rank gets the same
    norm (a per-rank norm would give each rank its own clip factor and make the replicated parameters
    drift apart). A float32 tensor; no host read."""
    raw = unwrap(model)
    ex = {id(p) for p in expert_params(raw)}
    ep_group = next((m.ep_group for _, m in expert_parallel_modules(raw)), None)
    grads = [p.grad for p in raw.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    dev = grads[0].to_local().device if _is_dtensor(grads[0]) else grads[0].device
    replicated = torch.zeros((), device=dev, dtype=torch.float64)
    ep_local = torch.zeros((), device=dev, dtype=torch.float64)
    fsdp_local = torch.zeros((), device=dev, dtype=torch.float64)
    for p in raw.parameters():
        g = p.grad
        if g is None:
            continue
        if _is_dtensor(g):  # FSDP2: sharded over all ranks of its mesh (dim-0 shards, no overlap)
            fsdp_local += g.to_local().double().pow(2).sum()
        elif id(p) in ex:
            ep_local += g.double().pow(2).sum()
        else:
            replicated += g.double().pow(2).sum()
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(ep_local, group=ep_group)  # the replicas of a shard hold the same gradient
    if any(_is_dtensor(g) for g in grads):
        dist.all_reduce(fsdp_local)
    return (replicated + ep_local + fsdp_local).sqrt().float()


def clip_coef(total, max_norm):
    """torch.nn.utils.clip_grad_norm_'s factor, as a device tensor: max_norm / (norm + 1e-6), at most 1."""
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


@torch.no_grad()
def clip_grad_norm_(model, max_norm):
    """torch.nn.utils.clip_grad_norm_ (2-norm) over the whole distributed model (grad_norm). Returns
    the total norm (a tensor)."""
    total = grad_norm(model)
    coef = clip_coef(total, max_norm)
    for g in [p.grad for p in unwrap(model).parameters() if p.grad is not None]:
        (g.to_local() if _is_dtensor(g) else g).mul_(coef.to(g.dtype))
    return total


# ----------------------------------------------------------------------------- checkpoints

def _full(t):
    return t.full_tensor() if _is_dtensor(t) else t


def _gather_experts(t, m):
    parts = [torch.empty_like(t) for _ in range(m.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=m.ep_group)
    return torch.cat(parts)


def _shard_like(full, like, m=None):
    """The local piece of a full tensor: the expert slice for EP, the DTensor shard for FSDP."""
    if m is not None:
        if full.shape[0] != m.n_experts_total:
            raise ValueError(f'expert tensor of {full.shape[0]} experts, the model has {m.n_experts_total}')
        full = full[m.expert_offset:m.expert_offset + m.w1_EDF.shape[0]]
    if _is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full


def full_state_dict(model, ep_group=None):
    """The state_dict of the single-process model (same keys, full expert tensors) whatever the EP
    size or FSDP: expert shards are all-gathered over their EP group, FSDP's DTensors made full.
    Collective: every rank must call it (every rank gets the full dict). ep_group is accepted for
    symmetry; each expert module knows its own group."""
    raw = unwrap(model)
    sd = {k: _full(v) for k, v in raw.state_dict().items()}
    for name, m in expert_parallel_modules(raw):
        for pn in EXPERT_PARAM_NAMES:
            key = f'{name}.{pn}'
            if key in sd:
                sd[key] = _gather_experts(sd[key], m)
    return sd


def load_full_state_dict(model, sd, ep_group=None, strict=True):
    """Load a full (single-process) state_dict into an EP-sharded and/or FSDP model: every rank
    takes its own expert slice / FSDP shard. The inverse of full_state_dict, for any EP size."""
    raw = unwrap(model)
    mods = dict(expert_parallel_modules(raw))
    own = raw.state_dict()
    local = {}
    for k, v in sd.items():
        mod_name, _, pn = k.rpartition('.')
        m = mods.get(mod_name) if pn in EXPERT_PARAM_NAMES else None
        local[k] = _shard_like(v, own[k], m) if k in own else v
    return raw.load_state_dict(local, strict=strict)


def _canonical_groups(model, optimizer):
    """The optimizer's param groups as the single-process optimizer has them: groups with the same
    settings merged (optim.configure_optimizers splits plain tensors from FSDP's DTensors, which fused /
    foreach AdamW can't mix), parameters in model order. Returns [(settings, [param, ...])]."""
    order = {id(p): i for i, p in enumerate(unwrap(model).parameters())}
    merged = {}
    for g in optimizer.param_groups:
        settings = {k: v for k, v in g.items() if k != 'params'}
        merged.setdefault(repr(sorted(settings.items())), (settings, []))[1].extend(g['params'])
    return [(st, sorted(ps, key=lambda p: order[id(p)])) for st, ps in merged.values()]


def _flat_index(groups):
    """{id(param): its index in the flattened groups} (state_dict's integer keys)."""
    return {id(p): i for i, p in enumerate(p for _, ps in groups for p in ps)}


def full_optim_state_dict(model, optimizer):
    """optimizer.state_dict() of the single-process optimizer: the per-parameter state (AdamW's
    exp_avg, exp_avg_sq) of expert shards gathered to full experts, FSDP DTensors made full, and
    the param groups in the single-process layout, so it loads into the single-process optimizer or
    any other EP size / FSDP. Collective."""
    owner = {id(p): m for _, m in expert_parallel_modules(model) for p in m.parameters()}
    actual = [p for g in optimizer.param_groups for p in g['params']]
    canon = _canonical_groups(model, optimizer)
    to_canon = _flat_index(canon)
    osd = optimizer.state_dict()
    state = {}
    for i, st in osd['state'].items():
        p, m = actual[i], owner.get(id(actual[i]))
        st = dict(st)
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0:
                v = _full(v)
                st[k] = _gather_experts(v, m) if m is not None else v
        state[to_canon[id(p)]] = st
    groups, start = [], 0
    for settings, ps in canon:
        groups.append(dict(settings, params=list(range(start, start + len(ps)))))
        start += len(ps)
    return {'state': state, 'param_groups': groups}


def load_full_optim_state_dict(model, optimizer, osd):
    """Load a full optimizer state_dict (from full_optim_state_dict or a single-process run) into
    this rank's optimizer: expert moments sliced to the local shard, FSDP ones to the local DTensor
    shard, the single-process param groups mapped onto this optimizer's groups."""
    owner = {id(p): m for _, m in expert_parallel_modules(model) for p in m.parameters()}
    canon_groups = _canonical_groups(model, optimizer)
    canon, to_canon = [p for _, ps in canon_groups for p in ps], _flat_index(canon_groups)
    if sum(len(g['params']) for g in osd['param_groups']) != len(canon):
        raise ValueError(f'optimizer state for {sum(len(g["params"]) for g in osd["param_groups"])} '
                         f'parameters, this model has {len(canon)}')
    to_actual = _flat_index([(None, g['params']) for g in optimizer.param_groups])
    settings_of = {}  # canonical index -> the settings (lr, betas, ...) of its saved group
    for g in osd['param_groups']:
        settings_of.update({i: {k: v for k, v in g.items() if k != 'params'} for i in g['params']})
    state = {}
    for c, st in osd['state'].items():
        p = canon[int(c)]
        m = owner.get(id(p))
        state[to_actual[id(p)]] = {k: (_shard_like(v, p, m) if m is not None or _is_dtensor(p) else v)
                                   if torch.is_tensor(v) and v.dim() > 0 else v for k, v in st.items()}
    groups, start = [], 0
    for g in optimizer.param_groups:
        groups.append(dict(settings_of[to_canon[id(g['params'][0])]], params=list(range(start, start + len(g['params'])))))
        start += len(g['params'])
    optimizer.load_state_dict({'state': state, 'param_groups': groups})


# ----------------------------------------------------------------------------- DCP (sharded checkpoints)
# torch.distributed.checkpoint writes each rank's shard and reshards on load when every tensor says
# where it sits in the global tensor. FSDP2's DTensors do. EP's expert shards are plain tensors, so
# they are presented as DTensors over a (replica, ep) mesh that mirrors init_expert_parallel's groups:
# Shard(0) over the EP ranks (experts [r*E/N, (r+1)*E/N)), Replicate over the replicas (DCP writes one
# copy). Keys are the single-process names, shapes global: any layout, or one process, reads any other.

_EP_MESHES = {}


def _ep_mesh(m, device_type):
    """The (replica, ep) DeviceMesh of EP size m.ep_size: row g holds EP group g (ranks g*N..g*N+N-1),
    column r the replica group of EP rank r. Created once (collective: the first call on every rank)."""
    key = (device_type, m.ep_size)
    if key not in _EP_MESHES:
        from torch.distributed.device_mesh import init_device_mesh
        world = dist.get_world_size()
        _EP_MESHES[key] = init_device_mesh(device_type, (world // m.ep_size, m.ep_size),
                                           mesh_dim_names=('replica', 'ep'))
    return _EP_MESHES[key]


def _global(t, m):
    """DCP's view of t: an EP shard (m: its module) as a DTensor with the global expert count; else t."""
    if m is None or _is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard
    shape = torch.Size((m.n_experts_total, *t.shape[1:]))
    return DTensor.from_local(t, _ep_mesh(m, t.device.type), [Replicate(), Shard(0)], run_check=False,
                              shape=shape, stride=torch.empty(shape, device='meta').stride())


def _expert_owner(raw):
    """name -> its ExpertParallelExperts module (None for everything that is not an EP shard)."""
    mods = dict(expert_parallel_modules(raw))

    def owner(name):
        mod, _, pn = name.rpartition('.')
        return mods.get(mod) if pn in EXPERT_PARAM_NAMES else None
    return owner


def dcp_state_dict(model, optimizer=None):
    """This rank's state for torch.distributed.checkpoint: {'model.<name>': tensor, 'optim.<param
    name>.<exp_avg|exp_avg_sq|step>': tensor}, single-process names, the tensors this rank's own
    (aliases, no copy; plain when replicated, DTensors when sharded), and AdamW's param groups as
    [(settings, [param names])] in the single-process order (None without an optimizer)."""
    raw = unwrap(model)
    owner = _expert_owner(raw)
    sd = {f'model.{k}': _global(v, owner(k)) for k, v in raw.state_dict().items()}
    if optimizer is None:
        return sd, None
    names = {id(p): n for n, p in raw.named_parameters()}
    for p, st in optimizer.state.items():
        n = names[id(p)]
        for k, v in st.items():
            v = v if torch.is_tensor(v) else torch.tensor(v)
            sd[f'optim.{n}.{k}'] = _global(v, owner(n)) if v.dim() else v
    groups = [(settings, [names[id(p)] for p in ps]) for settings, ps in _canonical_groups(raw, optimizer)]
    return sd, groups


def dcp_load(model, optimizer, path, groups, reader):
    """Load a DCP checkpoint (dcp_state_dict's keys, any saving layout) into this rank's model and AdamW,
    in this rank's layout: DCP reads just the pieces this rank holds. groups: the saved param groups.
    Collective under torchrun (every rank asks for the same keys); works in one process too."""
    import torch.distributed.checkpoint as dcp
    raw = unwrap(model)
    owner = _expert_owner(raw)
    saved = reader.read_metadata().state_dict_metadata
    sd, _ = dcp_state_dict(raw)  # the model's own tensors: loaded in place
    local_params = {}  # AdamW's state, fresh tensors of this rank's layout to load into
    for n, p in raw.named_parameters():
        for key in [k for k in saved if k.startswith(f'optim.{n}.') and '.' not in k[len(n) + 7:]]:
            m = saved[key]
            t = torch.zeros_like(p, dtype=m.properties.dtype) if len(m.size) else torch.zeros((), dtype=m.properties.dtype)
            sd[key] = _global(t, owner(n)) if len(m.size) else t
            local_params.setdefault(n, {})[key[len(n) + 7:]] = t
    with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
        warnings.filterwarnings('ignore', 'torch.distributed is disabled')
        dcp.load(sd, storage_reader=reader, no_dist=not dist.is_initialized())
    raw.load_state_dict({k[6:]: v.to_local() if owner(k[6:]) else v for k, v in sd.items() if k.startswith('model.')})
    params = {n: p for n, p in raw.named_parameters()}
    actual = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g['params'])}
    settings_of = {n: settings for settings, ns in groups for n in ns}
    names = {id(p): n for n, p in params.items()}
    optimizer.load_state_dict({
        'state': {actual[id(params[n])]: st for n, st in local_params.items()},
        'param_groups': [dict(settings_of[names[id(g['params'][0])]],
                              params=[actual[id(p)] for p in g['params']]) for g in optimizer.param_groups]})


# ----------------------------------------------------------------------------- FSDP2

def apply_fsdp(model, mesh=None, reshard_after_forward=True, mp_policy=None):
    """FSDP2: fully_shard every transformer Block, then the root (embeddings, tied lm_head, ln_f).
    Parameters, gradients and optimizer state are sharded over `mesh` (default: all ranks);
    gradients are reduce-scattered (averaged) by FSDP itself. Expert shards of an EP model are left
    out (ignored_params): EP already shards them; reduce them with reduce_expert_gradients. Build
    the optimizer after this call (it must see the sharded DTensor parameters)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    raw = unwrap(model)
    ignored = set(expert_params(raw)) or None
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    if mp_policy is not None:
        kw['mp_policy'] = mp_policy if isinstance(mp_policy, MixedPrecisionPolicy) else \
            MixedPrecisionPolicy(param_dtype=mp_policy, reduce_dtype=torch.float32)
    for block in raw.transformer.h:
        fully_shard(block, **kw)
    fully_shard(raw, **kw)
    return model


# ----------------------------------------------------------------------------- train.py's wiring

def restart_safe_store():
    """init_process_group's store, safe under an elastic restart (`torchrun --max-restarts=N`). torchrun's workers
    share its rendezvous TCPStore (TORCHELASTIC_USE_AGENT_STORE), which outlives a restart with the previous
    launch's keys in it, so a relaunched rank can read a dead rank's address as its peer's and fail to connect
    (pytorch#135712; seen with gloo in torch 2.13). Each launch gets keys of its own: every rank counts its
    own launches in the store, and as torchrun relaunches every rank each time (a fixed number of nodes), the
    counts agree (TORCHELASTIC_RESTART_COUNT need not: each node's agent keeps its own). Returns
    init_process_group's keyword arguments; {} outside torchrun's shared store (env:// as usual)."""
    if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return {}
    rank = int(os.environ['RANK'])
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), is_master=False,
                          timeout=default_pg_timeout)  # env://'s timeout: a slow node may take minutes
    launch = store.add(f'moegpt/launches/rank{rank}', 1)  # 1, 2, ...: the same on every rank of a (re)launch
    return dict(store=dist.PrefixStore(f'moegpt/launch{launch}', store), rank=rank,
                world_size=int(os.environ['WORLD_SIZE']))


def setup(backend, device, expert_parallel):
    """A torchrun process joins the process group (and the EP groups when expert_parallel > 1).
    Returns the EPGroups, or None."""
    if str(device).startswith('cuda'):
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, **restart_safe_store())
    return init_expert_parallel(expert_parallel) if expert_parallel > 1 else None


def shard(model, ep_groups=None, fsdp=False):
    """Keep this rank's experts (EP) and shard the rest (FSDP2): on the full (loaded) model, before the
    optimizer is built (it must see the sharded parameters) and before torch.compile."""
    if ep_groups is not None:
        enable_expert_parallel(model, ep_groups)
    if fsdp:
        apply_fsdp(model)
    return model


def wrap(model, ddp, fsdp, device_ids=None):
    """DDP around the (compiled) model of a data-parallel run. Not with FSDP, which reduces its own
    gradients; EP's expert shards are left to reduce_expert_gradients (DDP would mix shards)."""
    if not ddp or fsdp:
        return model
    if expert_params(model):
        ddp_ignore_expert_params(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def sync_gradients(model, on):
    """Reduce gradients in this backward or not: on only for the last micro-step of an iteration
    (nanoGPT's no_sync). FSDP2's switch, DDP's flag; nothing to do on a single process."""
    if hasattr(model, 'set_requires_gradient_sync'):
        model.set_requires_gradient_sync(on)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = on


def finish_gradients(model, grad_clip, sharded, fold=False):
    """After an iteration's last backward (and the GradScaler's unscale): reduce the expert shards, then
    the global grad norm, clipped to grad_clip (0: measured, not clipped). sharded: EP or FSDP, whose
    norm is taken over all ranks' shards. fold (fused AdamW): the clip factor is returned for the
    optimizer kernel to apply (its grad_scale), not multiplied into every gradient here: one pass over
    the gradients less. Not with FSDP's DTensors (a fused step over DTensors takes no plain grad_scale)
    or a torch without get_total_norm. Returns (norm, clip factor or None: applied here, or no clip)."""
    raw = unwrap(model)
    reduce_expert_gradients(raw)  # no-op without EP
    has_norm = hasattr(torch.nn.utils, 'get_total_norm')  # torch >= 2.6
    fold = fold and has_norm and not any(_is_dtensor(p) for p in raw.parameters())
    if (grad_clip == 0.0 and (sharded or has_norm)) or fold:  # the norm alone: one read pass over the gradients
        norm = grad_norm(raw) if sharded else torch.nn.utils.get_total_norm(
            [p.grad for p in raw.parameters() if p.grad is not None])
        return norm, clip_coef(norm, grad_clip) if grad_clip != 0.0 else None
    max_norm = grad_clip if grad_clip != 0.0 else float('inf')
    if sharded:
        return clip_grad_norm_(raw, max_norm), None
    return torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm), None


def all_to_all_bytes_per_layer(tokens_local, top_k, n_embd, bytes_per_elem, ep_size):
    """Paper estimate of what one rank sends per MoE layer per training step: dispatch + combine in
    forward, their two reverses in backward, each ~T_local*K*D*bytes*(N-1)/N (uniform routing, no
    drops; the (N-1)/N share leaves the rank, the rest stays local)."""
    one = tokens_local * top_k * n_embd * bytes_per_elem * (ep_size - 1) / ep_size
    return {'dispatch': one, 'forward': 2 * one, 'backward': 2 * one, 'step': 4 * one}


__all__ = ['EPGroups', 'init_expert_parallel', 'all_to_all', 'ExpertParallelExperts', 'enable_expert_parallel',
           'expert_parallel_modules', 'expert_params', 'ddp_ignore_expert_params', 'reduce_expert_gradients',
           'reduce_gradients', 'grad_norm', 'clip_coef', 'clip_grad_norm_', 'full_state_dict', 'load_full_state_dict',
           'full_optim_state_dict', 'load_full_optim_state_dict', 'dcp_state_dict', 'dcp_load', 'apply_fsdp', 'all_to_all_bytes_per_layer',
           'unwrap', 'setup', 'shard', 'wrap', 'sync_gradients', 'finish_gradients']

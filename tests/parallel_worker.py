"""
Worker for tests/test_parallel.py, launched with
    torchrun --standalone --nproc_per_node=2 tests/parallel_worker.py OUT.json
and again with --nproc_per_node=4 (CPU, gloo; each world size runs its own list of checks, main()). Every check runs the single-process model beside the distributed one, on the same
weights and the same global batch (the single process accumulates the ranks' micro-batches, exactly
what train.py's gradient accumulation does), and records the measured differences; rank 0 writes
them to OUT.json and the pytest side asserts on them. Checks: EP forward/backward (dropless,
capacity with drops, experts replicated over a replica group), an EP training run with DDP for the
dense parameters, checkpoints EP=2 -> EP=1 and EP=1 -> EP=2 (model + AdamW state, through
checkpoint.save/load), FSDP2 and FSDP2 + EP training runs. At 4 ranks: EP=4 forward/backward, EP=2 x DP=2
(two EP groups, each expert on 2 replicas) forward/backward, training and checkpoints, FSDP2 over 4 ranks and
FSDP2 x EP=2, and plain DDP x 4 with gradient accumulation.
"""
import copy
import datetime
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
from model import MoEGPT, MoEGPTConfig  # noqa: E402

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, dropout=0.0, n_experts=4, top_k=2)
CONFIGS = {
    # dropless, biases, grouped_mm (F.grouped_mm runs on CPU in fp32)
    'dropless': dict(TINY, bias=True, expert_impl='grouped'),
    # capacity mode: overflow dropped; swiglu, no biases, a shared expert, the slice loop, 8 experts
    'capacity': dict(TINY, n_experts=8, bias=False, activation='swiglu', capacity_factor=1.0,
                     n_shared_experts=1, expert_impl='loop', router_init_std=0.5),
    # every token to experts 0 and 1 (sigmoid router, selection bias): rank 1's experts get no rows
    'skewed': dict(TINY, bias=True, router='sigmoid', expert_impl='grouped'),
}
B = 4  # micro-batch per rank


def batch(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(cfg.vocab_size, (n, B, cfg.block_size), generator=g)
    y = torch.randint(cfg.vocab_size, (n, B, cfg.block_size), generator=g)
    return x, y


def max_over_ranks(d):
    t = torch.tensor([d[k] for k in sorted(d)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(sorted(d), t.tolist()))


def grad_diffs(dist_model, ref):
    """max |g_dist - g_ref| and that over max |g_ref|, every parameter (expert shards against their
    slice of the reference); grads of FSDP parameters are made full first."""
    ref_p = dict(ref.named_parameters())
    owner = {id(p): m for _, m in parallel.expert_parallel_modules(dist_model) for p in m.parameters()}
    abs_d, ref_max, n = 0.0, 0.0, 0
    for name, p in parallel.unwrap(dist_model).named_parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, 'full_tensor') else g
        r = ref_p[name].grad
        m = owner.get(id(p))
        if m is not None:
            r = r[m.expert_offset:m.expert_offset + m.w1_EDF.shape[0]]
        assert g.shape == r.shape, (name, g.shape, r.shape)
        abs_d = max(abs_d, (g - r).abs().max().item())
        ref_max = max(ref_max, r.abs().max().item())
        n += 1
    return abs_d, abs_d / ref_max, n


def check_equivalence(name, ep_groups):
    """One forward + backward of the EP model vs the single-process model on the same weights."""
    cfg = MoEGPTConfig(**CONFIGS[name])
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = MoEGPT(cfg)
    if name == 'skewed':
        for moe in ref.moe_layers():
            moe.router.expert_bias.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))
    ep = parallel.enable_expert_parallel(copy.deepcopy(ref), ep_groups)
    X, Y = batch(cfg, W, seed=1)
    ref_logits, ref_losses, ref_drop = None, [], []
    for r in range(W):  # the single process accumulates the W micro-batches
        logits, loss, stats = ref(X[r], Y[r])
        (loss / W).backward()
        ref_losses.append(loss.item())
        ref_drop.append(stats['drop_frac'])
        if r == rank:
            ref_logits, ref_stats = logits, stats
    logits, loss, stats = ep(X[rank], Y[rank])
    loss.backward()
    parallel.reduce_gradients(ep)  # dense: averaged over ranks; experts: the replica rule
    g_abs, g_rel, n_params = grad_diffs(ep, ref)
    loss_mean = loss.detach().clone()
    dist.all_reduce(loss_mean)
    out = max_over_ranks({
        'logits_abs': (logits - ref_logits).abs().max().item(),
        'logits_rel': ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
        'loss_abs': abs(loss_mean.item() / W - sum(ref_losses) / W),
        'grad_abs': g_abs, 'grad_rel': g_rel,
        'counts_diff': (stats['expert_counts'] - ref_stats['expert_counts']).abs().max().item(),
        # total / active parameter counts (MFU) include the experts held by the other ranks
        'num_params_diff': max(abs(a - b) for a, b in zip(ep.get_num_params(), ref.get_num_params())),
        'drop_frac': stats['drop_frac'].max().item(),
        'idle_expert_grad_max': max(p.grad.abs().max().item() for _, m in parallel.expert_parallel_modules(ep)
                                    for p in m.parameters()) if name == 'skewed' and rank == 1 else 0.0,
    })
    out['counts'] = stats['expert_counts'].tolist()
    out['n_params'] = n_params
    out['loss'] = sum(ref_losses) / W
    out['experts_per_rank'] = parallel.expert_parallel_modules(ep)[0][1].w1_EDF.shape[0]
    return out


def make_opt(model, foreach=None):
    """foreach=True groups tensors by device and dtype in one multi-tensor call, as fused AdamW does
    on CUDA: a group mixing plain tensors with FSDP's DTensors fails there."""
    return optim.configure_optimizers(parallel.unwrap(model), 0.1, 1e-2, (0.9, 0.99), 'cpu', foreach=foreach)


def step_single(model, opt, X, Y, clip):
    """One optimizer step of the single process over all W*ga micro-batches of X."""
    n = X.shape[0]
    tot = 0.0
    for i in range(n):
        _, loss, _ = model(X[i], Y[i])
        (loss / n).backward()
        tot += loss.item() / n
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return tot, norm.item()


def step_dist(model, opt, X, Y, clip, ddp):
    """One optimizer step of this rank on its rows of X (train.py's split); expert gradients reduced
    after the last micro-step, the global norm clipped."""
    rank, W = dist.get_rank(), dist.get_world_size()
    ga = X.shape[0] // W
    tot = torch.zeros((), dtype=torch.float64)
    for i in range(ga):
        if ddp:
            model.require_backward_grad_sync = i == ga - 1
        _, loss, _ = model(X[rank * ga + i], Y[rank * ga + i])
        (loss / ga).backward()
        tot += loss.item() / ga
    parallel.reduce_expert_gradients(model)
    norm = parallel.clip_grad_norm_(model, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    dist.all_reduce(tot)
    return tot.item() / W, norm.item()


def wrap_ddp(model):
    parallel.ddp_ignore_expert_params(model)
    return DDP(model)


def train_and_checkpoint(ep_groups, tmpdir, steps=5, more=2, ga=2, clip=0.5):
    """EP=2 (+ DDP for the dense parameters) vs the single process: `steps` AdamW steps with grad
    accumulation and clipping; then checkpoints both ways through files, and `more` steps after each
    resume compared with the run that never stopped."""
    cfg = MoEGPTConfig(**CONFIGS['dropless'])
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = MoEGPT(cfg)
    ep_raw = parallel.enable_expert_parallel(copy.deepcopy(ref), ep_groups)
    ep = wrap_ddp(ep_raw)
    opt_ref, opt_ep = make_opt(ref), make_opt(ep_raw, foreach=True)
    batches = [batch(cfg, W * ga, seed=100 + s) for s in range(steps + more)]
    out = {'ref_losses': [], 'ep_losses': [], 'ref_norms': [], 'ep_norms': []}
    for s in range(steps):
        l, n = step_single(ref, opt_ref, *batches[s], clip)
        out['ref_losses'].append(l)
        out['ref_norms'].append(n)
        l, n = step_dist(ep, opt_ep, *batches[s], clip, ddp=True)
        out['ep_losses'].append(l)
        out['ep_norms'].append(n)
    full = parallel.full_state_dict(ep)
    ref_sd = ref.state_dict()
    out['keys_match'] = sorted(full) == sorted(ref_sd) and all(full[k].shape == ref_sd[k].shape for k in full)
    out['param_abs_after_train'] = max_over_ranks(
        {'d': max((full[k] - ref_sd[k]).abs().max().item() for k in full)})['d']

    # --- EP=2 checkpoint -> single process (EP=1)
    path_ep = os.path.join(tmpdir, 'ckpt_ep2.pt')
    full_osd = parallel.full_optim_state_dict(ep, opt_ep)
    if rank == 0:
        checkpoint.save({'format_version': checkpoint.FORMAT_VERSION, 'model': full,
                         'optimizer': full_osd, 'model_args': {}}, path_ep)
    dist.barrier()
    ck = checkpoint.load(path_ep)
    torch.manual_seed(123)  # different init: the load must do all the work
    single = MoEGPT(cfg)
    single.load_state_dict(ck['model'])
    opt_single = make_opt(single)
    opt_single.load_state_dict(ck['optimizer'])
    Xe, _ = batches[0]
    with torch.no_grad():
        ep_logits, _, _ = ep_raw(Xe[rank])
        s_logits, _, _ = single(Xe[rank])
    d = {'ep2_to_1_logits_abs': (ep_logits - s_logits).abs().max().item()}
    # single-process resume vs the EP run going on
    res_single, res_ep = [], []
    for s in range(steps, steps + more):
        res_single.append(step_single(single, opt_single, *batches[s], clip)[0])
        res_ep.append(step_dist(ep, opt_ep, *batches[s], clip, ddp=True)[0])
    d['ep2_to_1_resume_loss_abs'] = max(abs(a - b) for a, b in zip(res_single, res_ep))

    # --- single-process checkpoint (ref after `steps`) -> EP=2
    path_1 = os.path.join(tmpdir, 'ckpt_ep1.pt')
    if rank == 0:
        checkpoint.save({'format_version': checkpoint.FORMAT_VERSION, 'model': ref.state_dict(),
                         'optimizer': opt_ref.state_dict(), 'model_args': {}}, path_1)
    dist.barrier()
    ck = checkpoint.load(path_1)
    torch.manual_seed(456)
    ep2_raw = parallel.enable_expert_parallel(MoEGPT(cfg), ep_groups)
    parallel.load_full_state_dict(ep2_raw, ck['model'])
    opt_ep2 = make_opt(ep2_raw, foreach=True)
    parallel.load_full_optim_state_dict(ep2_raw, opt_ep2, ck['optimizer'])
    ep2 = wrap_ddp(ep2_raw)
    with torch.no_grad():
        a, _, _ = ep2_raw(Xe[rank])
        b, _, _ = ref(Xe[rank])
    d['ep1_to_2_logits_abs'] = (a - b).abs().max().item()
    res_ep2, res_ref = [], []
    for s in range(steps, steps + more):
        res_ep2.append(step_dist(ep2, opt_ep2, *batches[s], clip, ddp=True)[0])
        res_ref.append(step_single(ref, opt_ref, *batches[s], clip)[0])
    d['ep1_to_2_resume_loss_abs'] = max(abs(a - b) for a, b in zip(res_ep2, res_ref))
    out.update(max_over_ranks(d))
    out['resume_losses'] = {'ep2_to_1': res_single, 'ep_continued': res_ep, 'ep1_to_2': res_ep2,
                            'ref_continued': res_ref}
    return out


def fsdp_train(ep_groups, steps=3, clip=0.5):
    """FSDP2 over both ranks (fully_shard per Block + root), alone and with EP=2 (experts left to EP
    via ignored_params), vs the single process; plus full_state_dict of the FSDP+EP model."""
    cfg = MoEGPTConfig(**CONFIGS['dropless'])
    rank, W = dist.get_rank(), dist.get_world_size()
    out = {}
    for mode in ('fsdp', 'fsdp_ep'):
        torch.manual_seed(0)
        ref = MoEGPT(cfg)
        m = copy.deepcopy(ref)
        if mode == 'fsdp_ep':
            parallel.enable_expert_parallel(m, ep_groups)
        parallel.apply_fsdp(m)
        opt_ref, opt_m = make_opt(ref), make_opt(m, foreach=True)
        batches = [batch(cfg, W, seed=200 + s) for s in range(steps)]
        ref_l, m_l = [], []
        for s in range(steps):
            ref_l.append(step_single(ref, opt_ref, *batches[s], clip)[0])
            m_l.append(step_dist(m, opt_m, *batches[s], clip, ddp=False)[0])
        full = parallel.full_state_dict(m)
        ref_sd = ref.state_dict()
        # AdamW moments: gathered full they equal the single process's; loading them back round-trips
        osd, ref_osd = parallel.full_optim_state_dict(m, opt_m), opt_ref.state_dict()
        moments = lambda o: [v for i in sorted(o['state']) for k, v in sorted(o['state'][i].items()) if k != 'step']
        optim_abs = max((a - b).abs().max().item() for a, b in zip(moments(osd), moments(ref_osd)))
        parallel.load_full_optim_state_dict(m, opt_m, ref_osd)
        optim_roundtrip = max((a - b).abs().max().item()
                              for a, b in zip(moments(parallel.full_optim_state_dict(m, opt_m)), moments(ref_osd)))
        sharded = sum(1 for p in m.parameters() if hasattr(p, 'full_tensor'))
        out[mode] = {'ref_losses': ref_l, 'losses': m_l,
                     'loss_abs': max(abs(a - b) for a, b in zip(ref_l, m_l)),
                     'param_abs': max((full[k] - ref_sd[k]).abs().max().item() for k in ref_sd),
                     'keys_match': sorted(full) == sorted(ref_sd),
                     'n_moments': len(moments(osd)), 'optim_roundtrip_abs': optim_roundtrip,
                     'dtensor_params': sharded, 'param_groups': len(opt_m.param_groups),
                     'mixed_groups': sum(len({hasattr(p, 'full_tensor') for p in g['params']}) > 1
                                         for g in opt_m.param_groups),
                     'plain_params': sum(1 for p in m.parameters() if not hasattr(p, 'full_tensor'))}
        out[mode].update(max_over_ranks({'param_abs': out[mode]['param_abs'], 'optim_abs': optim_abs}))
    return out


def ddp_train(steps=3, ga=2, clip=0.2):
    """Plain DDP over every rank (all parameters replicated, experts included; no EP) with `ga` micro-steps
    per rank, the gradient all-reduce only on the last one (no_sync before), vs the single process
    accumulating all W * ga micro-batches."""
    cfg = MoEGPTConfig(**CONFIGS['capacity'])  # 8 experts, drops, a shared expert: every kind of parameter
    W = dist.get_world_size()
    torch.manual_seed(0)
    ref = MoEGPT(cfg)
    m = DDP(copy.deepcopy(ref))
    opt_ref, opt_m = make_opt(ref), make_opt(m, foreach=True)
    out = {'ref_losses': [], 'losses': [], 'ref_norms': [], 'norms': []}
    for s in range(steps):
        X, Y = batch(cfg, W * ga, seed=300 + s)
        l, n = step_single(ref, opt_ref, X, Y, clip)
        out['ref_losses'].append(l)
        out['ref_norms'].append(n)
        l, n = step_dist(m, opt_m, X, Y, clip, ddp=True)
        out['losses'].append(l)
        out['norms'].append(n)
    ref_sd, sd = ref.state_dict(), m.module.state_dict()
    out['param_abs'] = max_over_ranks({'d': max((sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd)})['d']
    return out


def config_errors(ep_groups):
    """The clear errors: experts not divisible by the EP size, world not divisible by it."""
    out = {}
    try:
        parallel.enable_expert_parallel(MoEGPT(MoEGPTConfig(**dict(TINY, n_experts=3))), ep_groups)
    except ValueError as e:
        out['experts'] = str(e)
    try:
        parallel.init_expert_parallel(3)
    except ValueError as e:
        out['world'] = str(e)
    return out


def main():
    out_path, tmpdir = sys.argv[1], os.path.dirname(os.path.abspath(sys.argv[1]))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=60))  # a failure can't hang CI
    rank, W = dist.get_rank(), dist.get_world_size()
    ep2 = parallel.init_expert_parallel(2)  # 2 ranks: both experts shards, no replicas; 4 ranks: EP=2 x DP=2
    res, t0 = {}, time.perf_counter()
    if W == 2:
        ep1 = parallel.init_expert_parallel(1)  # every rank holds all experts: the replica-group path
        jobs = [('ep_dropless', lambda: check_equivalence('dropless', ep2)),
                ('ep_capacity', lambda: check_equivalence('capacity', ep2)),
                ('ep_skewed', lambda: check_equivalence('skewed', ep2)),
                ('ep1_replicas', lambda: check_equivalence('dropless', ep1)),
                ('train', lambda: train_and_checkpoint(ep2, tmpdir)),
                ('fsdp', lambda: fsdp_train(ep2)),
                ('errors', lambda: config_errors(ep2))]
    else:  # 4 ranks: the layouts 2 ranks cannot have (few steps: 4 processes share CI's 2 cores)
        ep4 = parallel.init_expert_parallel(4)  # 1 expert per rank (dropless), 2 (capacity: 8 experts)
        jobs = [('ep4_dropless', lambda: check_equivalence('dropless', ep4)),
                ('ep4_capacity', lambda: check_equivalence('capacity', ep4)),
                ('ep2_dp2', lambda: check_equivalence('dropless', ep2)),
                ('train', lambda: train_and_checkpoint(ep2, tmpdir, steps=3)),
                ('fsdp', lambda: fsdp_train(ep2, steps=2)),
                ('ddp_ga', lambda: ddp_train())]
    for name, fn in jobs:
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception:  # recorded, so the test shows the exact error
            res[name] = {'error': traceback.format_exc()}
        res[name]['seconds'] = round(time.perf_counter() - t, 2)
        dist.barrier()
    res['seconds'] = round(time.perf_counter() - t0, 2)
    res['torch'] = torch.__version__
    if rank == 0:
        with open(out_path, 'w') as f:
            json.dump(res, f, indent=1, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else str(o))
    dist.barrier()  # no rank tears gloo down while another is still busy (it can abort at exit)
    dist.destroy_process_group()


if __name__ == '__main__':
    main()

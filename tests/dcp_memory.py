"""Rank 0's peak memory during one checkpoint save, single file vs DCP (docs/distributed.md), under EP.

    torchrun --standalone --nproc_per_node=4 tests/dcp_memory.py single
    torchrun --standalone --nproc_per_node=4 tests/dcp_memory.py dcp
    torchrun --standalone --nproc_per_node=2 tests/dcp_memory.py async   # DCP with async_save=True
    python tests/dcp_memory.py checksums      # what the checksums cost: save and load, with and without

Each rank builds the same model, keeps its experts (expert_parallel = world size), takes one AdamW step
(so the moments exist), then saves once through checkpoint.save_run, as train.py does. Measured per rank:
the resident set's growth during the save (Linux VmHWM, reset just before, minus VmRSS then) and the
save's wall time (async: how long save_run blocked the caller, and when the checkpoint was written and
committed, checkpoint.wait_for_saves returning). One format per launch: freed memory that the allocator keeps would hide the second
save's growth. --n_layer/--n_embd/--n_experts size the model (the defaults: 38M expert parameters).
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
from model import MoEGPT, MoEGPTConfig  # noqa: E402


def status_kb(key):
    with open('/proc/self/status') as f:
        return int(next(l for l in f if l.startswith(key)).split()[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('format', choices=['single', 'dcp', 'async', 'checksums'])
    ap.add_argument('--n_layer', type=int, default=4)
    ap.add_argument('--n_embd', type=int, default=384)
    ap.add_argument('--n_experts', type=int, default=8)
    ap.add_argument('--out', default=None, help='folder to save into (default: a temp dir, removed)')
    a = ap.parse_args()
    if a.format == 'checksums':
        return checksum_cost(a)
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = MoEGPTConfig(n_layer=a.n_layer, n_head=4, n_embd=a.n_embd, block_size=64, vocab_size=256,
                       n_experts=a.n_experts, top_k=2)
    torch.manual_seed(0)
    model = MoEGPT(cfg)
    parallel.shard(model, parallel.init_expert_parallel(world))
    opt = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), 'cpu')
    x = torch.randint(256, (2, 64), generator=torch.Generator().manual_seed(rank))
    _, loss, _ = model(x, x)
    loss.backward()
    parallel.reduce_gradients(model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    full_mb = model.get_num_params().total * 4 / 2**20
    state = dict(iter_num=1, model_args={}, config={}, best_val_loss=0.0, evaluated=True, scaler={},
                 meta_vocab_size=256, sampler_state=torch.Generator().get_state(), rng=checkpoint.rng_state())
    out = a.out or (tempfile.mkdtemp() if rank == 0 else None)
    objs = [out]
    dist.broadcast_object_list(objs, src=0)
    out = objs[0]
    path = os.path.join(out, 'ckpt.pt' if a.format == 'single' else 'ckpt.dcp')
    dist.barrier()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # VmHWM := VmRSS now
    rss0 = status_kb('VmRSS')
    t0 = time.perf_counter()
    checkpoint.save_run(path, model, opt, state, sharded=True, master=rank == 0, async_save=a.format == 'async')
    blocked = time.perf_counter() - t0
    checkpoint.wait_for_saves()
    secs = time.perf_counter() - t0
    grown = (status_kb('VmHWM') - rss0) / 1024
    got = [None] * world
    dist.all_gather_object(got, (grown, secs, blocked))
    if rank == 0:
        on_disk = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.realpath(path))
                      for f in fs) if a.format != 'single' else os.path.getsize(path)
        print(f'{a.format}: {world} ranks, model {full_mb:.0f} MB fp32 ({full_mb * 3:.0f} MB with AdamW), '
              f'checkpoint {on_disk / 2**20:.0f} MB on disk')
        for r, (g, s, b) in enumerate(got):
            print(f'  rank {r}: peak RSS growth during the save {g:7.1f} MB, save {s:5.2f} s'
                  + (f' (the caller blocked {b:5.2f} s)' if a.format == 'async' else ''))
        if not a.out:
            import shutil
            shutil.rmtree(out)
    dist.barrier()
    dist.destroy_process_group()


def checksum_cost(a):
    """One process: a single-file checkpoint of a tiny and of a bigger model (with AdamW moments), saved
    and loaded with and without checksums; best of 3."""
    import shutil
    for name, kw in (('tiny', dict(n_layer=2, n_head=2, n_embd=32, n_experts=4)),
                     ('bigger', dict(n_layer=a.n_layer, n_head=4, n_embd=a.n_embd, n_experts=a.n_experts))):
        model = MoEGPT(MoEGPTConfig(block_size=64, vocab_size=256, top_k=2, **kw))
        sd = model.state_dict()
        obj = {'format_version': 1, 'model': sd, 'model_args': {}, 'moments': [{k: v.clone() for k, v in sd.items()}
                                                                              for _ in range(2)]}
        d = tempfile.mkdtemp()
        p = os.path.join(d, 'ckpt.pt')

        def best(f):
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            return min(ts)
        plain_save = best(lambda: checkpoint.save(obj, p))
        sums_save = best(lambda: checkpoint.save(dict(obj, checksums=checkpoint.tensor_checksums(obj)), p))
        sums_load = best(lambda: checkpoint.load(p))
        plain_load = best(lambda: torch.load(p, weights_only=True))
        mb = os.path.getsize(p) / 2**20
        print(f'{name} ({mb:.1f} MB): save {plain_save * 1e3:.1f} ms -> {sums_save * 1e3:.1f} ms with checksums, '
              f'load {plain_load * 1e3:.1f} ms -> {sums_load * 1e3:.1f} ms verified')
        shutil.rmtree(d)


if __name__ == '__main__':
    main()

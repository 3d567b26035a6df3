"""
Worker for tests/test_dcp.py::test_async_save_stages_a_copy_training_may_change, launched with
    torchrun --standalone --nproc_per_node=2 tests/async_save_worker.py OUT_DIR ep|fsdp
(CPU, gloo). ep: expert_parallel=2 (each rank's expert shards are DTensors to DCP, the rest replicated);
fsdp: FSDP2 (every parameter and AdamW moment a DTensor shard). One AdamW step, then one save through checkpoint.save_run with async_save=True, as train.py makes it. DCP's
writes are held back (FileSystemWriter.write_data patched to sleep first), so nothing is written yet when
save_run returns; then every weight, every AdamW moment and step, and the lr are changed in place, as the
next training steps would. After checkpoint.wait_for_saves the checkpoint must hold the state as it was
when save_run was called, bitwise, not the changed one. Rank 0 writes its findings to OUT_DIR/result.json.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
from model import MoEGPT, MoEGPTConfig  # noqa: E402

WRITE_DELAY = 1.0  # seconds DCP's write waits in its thread: the window in which training changes the weights
_write_data = FileSystemWriter.write_data


def slow_write_data(self, *args, **kwargs):
    time.sleep(WRITE_DELAY)
    return _write_data(self, *args, **kwargs)


FileSystemWriter.write_data = slow_write_data


def clone(o):
    """A deep copy of the tensors in o (parallel.full_*_state_dict alias what is not sharded)."""
    if torch.is_tensor(o):
        return o.clone()
    if isinstance(o, dict):
        return {k: clone(v) for k, v in o.items()}
    return type(o)(map(clone, o)) if isinstance(o, (list, tuple)) else o

out, layout = sys.argv[1:3]
dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = MoEGPT(MoEGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                            dropout=0.0))
parallel.shard(model, parallel.init_expert_parallel(world) if layout == 'ep' else None, fsdp=layout == 'fsdp')
opt = optim.configure_optimizers(model, 0.1, 1e-3, (0.9, 0.99), 'cpu')
x = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(rank))
model(x, x)[1].backward()
parallel.reduce_gradients(model)
opt.step()
opt.zero_grad(set_to_none=True)
before_model, before_optim = clone(parallel.full_state_dict(model)), clone(parallel.full_optim_state_dict(model, opt))
state = dict(iter_num=1, model_args={}, config={}, best_val_loss=0.0, evaluated=True, scaler={},
             meta_vocab_size=64, sampler_state=torch.Generator().get_state(), rng=checkpoint.rng_state())
path = os.path.join(out, 'ckpt.dcp')
t0 = time.perf_counter()
checkpoint.save_run(path, model, opt, state, sharded=True, master=rank == 0, async_save=True)
returned_s = time.perf_counter() - t0
committed_at_return = os.path.lexists(path)
with torch.no_grad():  # what training does next: every tensor of the state changes in place
    for p in model.parameters():
        p.add_(1.0)
    for st in opt.state.values():
        for v in st.values():
            v.add_(1) if torch.is_tensor(v) else None
for g in opt.param_groups:
    g['lr'] = 0.5
changed_model = clone(parallel.full_state_dict(model))
checkpoint.wait_for_saves()
done_s = time.perf_counter() - t0
if rank == 0:
    ck = checkpoint.load(path)
    so, sb = ck['optimizer']['state'], before_optim['state']
    result = dict(
        returned_s=returned_s, done_s=done_s, committed_at_return=committed_at_return,
        committed=os.readlink(path), keys=sorted(ck['model']) == sorted(before_model),
        model_equal={k: torch.equal(ck['model'][k], before_model[k]) for k in before_model},
        model_changed={k: not torch.equal(changed_model[k], before_model[k]) for k in before_model},
        optim_equal={f'{i}.{k}': torch.equal(so[i][k], sb[i][k]) for i in sb for k in sb[i]},
        optim_keys=so.keys() == sb.keys(), groups_equal=ck['optimizer']['param_groups'] == before_optim['param_groups'])
    with open(os.path.join(out, 'result.json'), 'w') as f:
        json.dump(result, f)
dist.barrier()
dist.destroy_process_group()

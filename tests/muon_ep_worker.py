"""
Worker for tests/test_muon.py, launched with
    torchrun --standalone --nproc_per_node=2 tests/muon_ep_worker.py OUT.json
(CPU, gloo). optimizer='muon' under expert parallelism, the update alone: each rank holds the full model
(the single-process reference) and an expert_parallel=2 copy of it; the copy's parameters get the
reference's gradients (its experts: their slice), then both take 3 optimizer steps. Each rank's experts
must equal their slice of the reference's, and every other parameter the reference's, bitwise (each expert
is orthogonalised on its own: no communication, no other expert involved); and the checkpoint's gathered
optimizer state (parallel.full_optim_state_dict) must equal the single-process optimizer's state_dict.
Rank 0 writes {name: bitwise equal on every rank} and the state check to OUT.json.
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optim  # noqa: E402
import parallel  # noqa: E402
from model import MoEGPT, MoEGPTConfig  # noqa: E402

dist.init_process_group('gloo')
groups = parallel.init_expert_parallel(2)
torch.manual_seed(0)
full = MoEGPT(MoEGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, n_experts=4, top_k=2,
                           n_shared_experts=1, dropout=0.0, bias=True))
ep = parallel.enable_expert_parallel(copy.deepcopy(full), groups)
opts = [optim.configure_optimizers(m, 0.1, 1e-2, (0.9, 0.95), 'cpu', optimizer='muon', muon_lr=2e-2) for m in (full, ep)]
owner = {id(p): m for _, m in parallel.expert_parallel_modules(ep) for p in m.parameters()}
names = [n for n, _ in full.named_parameters()]
assert names == [n for n, _ in ep.named_parameters()]
init = [p.detach().clone() for p in full.parameters()]
for step in range(3):
    b = torch.randint(64, (4, 17), generator=torch.Generator().manual_seed(step))
    full(b[:, :-1].contiguous(), b[:, 1:].contiguous())[1].backward()
    for p, q in zip(full.parameters(), ep.parameters()):
        m = owner.get(id(q))
        q.grad = (p.grad[m.expert_offset:m.expert_offset + q.shape[0]] if m else p.grad).clone()
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
equal = {}
for n, p, q in zip(names, full.parameters(), ep.parameters()):
    m = owner.get(id(q))
    ok = torch.tensor(float(torch.equal(p[m.expert_offset:m.expert_offset + q.shape[0]] if m else p, q)))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    equal[n] = bool(ok)
gathered, ref = parallel.full_optim_state_dict(ep, opts[1]), opts[0].state_dict()
state_equal = gathered['param_groups'] == ref['param_groups'] and gathered['state'].keys() == ref['state'].keys() \
    and all(gathered['state'][i].keys() == ref['state'][i].keys()
            and all(torch.equal(gathered['state'][i][k], ref['state'][i][k]) for k in ref['state'][i])
            for i in ref['state'])
moved = [n for n, p, p0 in zip(names, full.parameters(), init) if not torch.equal(p, p0)]
if dist.get_rank() == 0:
    with open(sys.argv[1], 'w') as f:
        json.dump(dict(equal=equal, state_equal=state_equal, moved=moved,
                       local_experts=[q.shape[0] for q in ep.parameters() if id(q) in owner]), f)
dist.barrier()
dist.destroy_process_group()

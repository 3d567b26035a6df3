"""No host read of a device value on a training step (issue 21, docs/reliability.md "What the host waits for").

train.py's real loop runs (in a subprocess, through this file's probe) under a TorchDispatchMode that counts
every op which, were the training device a GPU, would make the host wait for it. sync_debug=True marks the
steps: train.py calls guard.sync_debug_mode(device_type, strict) around them, the same calls that put CUDA
in set_sync_debug_mode('error') on a GPU, and the probe hooks that function to know when a step runs.

What counts, emulated on a CPU where host and device memory are the same:
- aten._local_scalar_dense: .item(), float(t), int(t), bool(t) (a device->host copy, then a wait);
- Tensor.tolist(), .numpy(), .cpu(), __array__: device->host reads that dispatch nothing on a CPU tensor;
- torch.tensor(...) / torch.as_tensor(...) with a device=: a host->device copy of Python data (pageable: blocking).
Host tensors don't count: a tensor is host-side when made from host data (aten.lift_fresh: from_numpy,
torch.tensor without a device), drawn from an explicit generator (the data sampler's), or computed from host
tensors only. That is the data pipeline on a GPU too (CPU tensors, copied non_blocking from pinned memory).
Not detectable here: Tensor.to('cpu') of a device tensor (a no-op on CPU), which nothing in a step calls.

The runs use expert_impl='grouped' (grouped_mm, the GPU path): the CPU's per-expert slice loop needs the
counts on the host by design (docs/performance.md) and is not what a GPU runs.
"""
import json
import os
import runpy
import subprocess
import sys
import traceback
import weakref
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ARGS = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--dropout=0.1', '--eval_iters=2', '--warmup_iters=0', '--n_experts=4', '--top_k=2',
        '--expert_impl=grouped', '--max_iters=9', '--eval_interval=4', '--log_interval=3',
        '--always_save_checkpoint=True', '--sync_debug=True']


# ----------------------------------------------------------------------------- the probe (runs train.py)

def probe(out_json, inject, argv):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    sys.path.insert(0, str(REPO))
    import guard
    aten = torch.ops.aten
    host_ids = weakref.WeakValueDictionary()  # id -> tensor, of those that live in host memory on a GPU run too
    is_host = lambda t: host_ids.get(id(t)) is t
    state = {'strict': False, 'zones': [], 'outside': 0}

    def record(what, tensors=()):
        if tensors and all(map(is_host, tensors)):
            return
        if not state['strict']:
            state['outside'] += 1
            return
        where = [f'{Path(f.filename).name}:{f.lineno} {f.line}' for f in traceback.extract_stack()
                 if str(REPO) in f.filename and 'test_host_sync' not in f.filename][-3:]
        state['zones'][-1]['syncs'].append(f'{what} at ' + ' <- '.join(reversed(where)))

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if func is aten._local_scalar_dense.default:
                record('aten._local_scalar_dense', ins)
            if state['strict']:
                state['zones'][-1]['ops'].add(str(func.overloadpacket))
                if func is aten._to_copy.default and ins[0].dim() == 3 and ins[0].dtype == torch.float32 != out.dtype:
                    state['zones'][-1]['casts_3d'].append(list(ins[0].shape))  # the experts' weights among them
            if (func in (aten.lift_fresh.default, aten.lift_fresh_copy.default) or kwargs.get('generator') is not None
                    or (ins and all(map(is_host, ins)))):
                host_ids.update((id(t), t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    def reads(name):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, **k):
            record(f'Tensor.{name}', [self])
            return orig(self, *a, **k)
        setattr(torch.Tensor, name, wrapped)
    for name in ('tolist', 'numpy', 'cpu', '__array__'):
        reads(name)

    def made_on_device(name):
        orig = getattr(torch, name)

        def wrapped(*a, **k):
            if k.get('device') is not None:
                record(f'torch.{name}(python data, device=...)')
            return orig(*a, **k)
        setattr(torch, name, wrapped)
    for name in ('tensor', 'as_tensor'):
        made_on_device(name)

    def mode(device_type, strict):  # train.py's sync_debug zones: one per step, from the 3rd on
        state['strict'] = strict
        if strict:
            state['zones'].append({'syncs': [], 'ops': set(), 'casts_3d': []})
    guard.sync_debug_mode = mode
    if inject != 'clean':  # the bugs this test exists for: the old guard's float(t), .tolist(), torch.tensor(device=)
        step, read = guard.Guard.step, INJECT[inject]
        guard.Guard.step = lambda self, it, loss, *a: (read(loss), step(self, it, loss, *a))[1]
    sys.argv = ['train.py', *argv]
    with Count():
        runpy.run_path(str(REPO / 'train.py'), run_name='__main__')
    zones = [{**z, 'ops': sorted(z['ops'])} for z in state['zones']]
    rank = os.environ.get('RANK', '0')
    Path(f'{out_json}.{rank}').write_text(json.dumps({'zones': zones, 'outside': state['outside']}))


INJECT = {'float': lambda t: float(t), 'tolist': lambda t: t.tolist(),
          'tensor': lambda t: __import__('torch').tensor(1.0, device=t.device)}

if __name__ == '__main__':
    probe(sys.argv[1], sys.argv[2], sys.argv[4:])  # argv[3] is '--'
    sys.exit(0)


# ----------------------------------------------------------------------------- the tests

def run_probe(tmp_path, args, inject='clean', nproc=0):
    out = tmp_path / 'counts'
    cmd = [__file__, str(out), inject, '--', *ARGS, *args,
           f'--out_dir={tmp_path / "out"}']
    if nproc:
        cmd = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *cmd]
    r = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, f'exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r, [json.loads(Path(f'{out}.{rank}').read_text()) for rank in range(max(nproc, 1))]


CASES = {  # name: (extra args, processes)
    'single': (['--debug_nan_at_iters=[5]'], 0),  # a poisoned step, skipped on the device, read at the log line
    'grad_accumulation': (['--gradient_accumulation_steps=3'], 0),
    'ddp_gloo': (['--gradient_accumulation_steps=4'], 2),  # 2 micro-steps a rank: no_sync, then the reduce
    # DeepSeek-V3's expert_bias update after each step, under bf16 autocast (the GPU's dtype)
    'aux_free_bf16': (['--router=sigmoid', '--dtype=bfloat16'], 0),
    # bf16 with 3 micro-steps: the experts' weights are cast once a step (MoEGPT.train_step)
    'grad_accumulation_bf16': (['--gradient_accumulation_steps=3', '--dtype=bfloat16'], 0),
}


@pytest.mark.parametrize('case', CASES)
def test_no_host_read_on_a_step(case, shakespeare_char_dir, tmp_path):
    """Steps 2..8 (the probe's zones: every step from the 3rd, log iters 3 and 6 included) run forward,
    backward, the norm, the guard and fused AdamW with zero host reads; the log lines, evals and saves
    between them do read (the count sees them, so it is live)."""
    extra, nproc = CASES[case]
    r, ranks = run_probe(tmp_path, [f'--data_dir={shakespeare_char_dir}', *extra], nproc=nproc)
    for counts in ranks:
        zones = counts['zones']
        assert len(zones) == 9 - 2
        for z in zones:  # each zone is a whole step: the model, the backward and the optimizer ran in it
            assert {'aten._grouped_mm', 'aten._fused_adamw_'} <= set(z['ops']) and len(z['ops']) > 30, z['ops']
        assert [s for z in zones for s in z['syncs']] == []
        # the router entropy and drops only on the steps that log (iters 3 and 6 of 2..8): MoEGPT.train_step
        assert [('aten.special_entr' in z['ops']) for z in zones] == [it % 3 == 0 for it in range(2, 9)]
        assert counts['outside'] > 0
        if case == 'aux_free_bf16':  # update_expert_bias (bias += rate * sign(...)) ran in every step
            assert all('aten.sign' in z['ops'] for z in zones)
        if case == 'grad_accumulation_bf16':  # w1 (E, D, F) and w2 (E, F, D) of both MoE layers, once a step
            w_shapes = [[4, 32, 128], [4, 128, 32]]
            assert all(sorted(c for c in z['casts_3d'] if c in w_shapes) == sorted(w_shapes * 2) for z in zones), zones
    if case == 'single':
        assert 'iter 5: non-finite loss nan' in r.stdout  # read late, still printed with its iter


@pytest.mark.parametrize('case, inject', [('single', 'float'), ('single', 'tolist'), ('single', 'tensor'),
                                          ('ddp_gloo', 'float')])
def test_a_host_read_in_the_step_is_caught(case, inject, shakespeare_char_dir, tmp_path):
    """The same runs with one host read added to the guard's step (float(loss), loss.tolist(), or
    torch.tensor(1.0, device=...) as the old guard made its preemption flag): every zone reports it, with where."""
    extra, nproc = CASES[case]
    _, ranks = run_probe(tmp_path, [f'--data_dir={shakespeare_char_dir}', *extra], inject=inject, nproc=nproc)
    what = {'float': 'aten._local_scalar_dense', 'tolist': 'Tensor.tolist', 'tensor': 'torch.tensor'}[inject]
    for counts in ranks:
        syncs = [z['syncs'] for z in counts['zones']]
        assert len(syncs) == 7 and all(len(s) == 1 and s[0].startswith(what) for s in syncs), syncs
        assert 'train.py' in syncs[0][0]


def test_guard_reads_600_steps_of_flags_at_once(capsys, tmp_path):
    """A long log_interval: the guard keeps 600 steps' flags on the device (packed every 256) and reads them
    in one go, in order: every skipped step printed with its iter and counted, AdamW stepped only on the rest."""
    import torch
    sys.path.insert(0, str(REPO))
    from guard import Guard
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    g = Guard(max_bad_steps=3, device='cpu', ddp=False, master=True, ckpt_path=str(tmp_path / 'ckpt.pt'))
    bad_iters = [7, 8, 255, 256, 556, 599]
    for it in range(600):
        p.grad = torch.full((3,), float('nan') if it in bad_iters else 1.0)
        g.step(it, (p.grad.sum() * 0).detach(), p.grad.norm(), None, opt, scaler)
    assert len(g.packed) == 2 and len(g.pending) == 600 - 512
    assert g.settle() is True and g.bad_since_log == len(bad_iters) and g.bad_in_a_row == 1
    printed = [line.split(':')[0] for line in capsys.readouterr().out.splitlines() if 'step skipped' in line]
    assert printed == [f'iter {i}' for i in bad_iters]
    assert opt.state[p]['step'].item() == 600 - len(bad_iters)

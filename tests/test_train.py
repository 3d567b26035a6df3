"""train.py end to end, on CPU with tiny models: each test runs the real script in a subprocess."""
import ast
import glob
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import configurator  # noqa: E402
import hardware  # noqa: E402
from model import MoEGPT, MoEGPTConfig  # noqa: E402

TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--dropout=0.0', '--eval_iters=4', '--warmup_iters=0', '--log_interval=1']
MOE = ['--n_experts=4', '--top_k=2']


@pytest.fixture(scope='session')
def char_data(tmp_path_factory, tinyshakespeare):
    """A data_dir holding shakespeare_char, made by the prepare.py command line from the real text."""
    d = tmp_path_factory.mktemp('data')
    r = subprocess.run([sys.executable, 'prepare.py', 'shakespeare_char', '--input', str(tinyshakespeare),
                        '--data_dir', str(d)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope='session')
def no_wandb(tmp_path_factory):
    """A PYTHONPATH entry whose `wandb` fails on import: proves train.py doesn't import it when off."""
    d = tmp_path_factory.mktemp('fake_wandb')
    (d / 'wandb').mkdir()
    (d / 'wandb' / '__init__.py').write_text("raise ImportError('wandb imported although wandb_log=False')\n")
    return d


def train(args, env=None, torchrun=0, timeout=300):
    cmd = [sys.executable, 'train.py', *map(str, args)]
    if torchrun:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}',
               *cmd[1:]]
    # one thread: tiny models gain nothing from more, and spinning OpenMP threads crawl on a busy CI box
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


def ok(r):
    assert r.returncode == 0, f'exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}'
    return r


def records(out_dir, kind):
    lines = (Path(out_dir) / 'log.jsonl').read_text().splitlines()
    return [r for r in map(json.loads, lines) if r['type'] == kind]


@pytest.fixture(scope='module')
def run30(char_data, no_wandb, tmp_path_factory):
    out = tmp_path_factory.mktemp('run30') / 'out'
    r = ok(train([*TINY, *MOE, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=30',
                  '--eval_interval=10', '--log_interval=5', '--learning_rate=3e-3', '--lr_decay_iters=30',
                  '--always_save_checkpoint=True'], env={'PYTHONPATH': str(no_wandb)}))
    return out, r


def test_30_iters_learns_and_writes_everything(run30):
    out, r = run30
    for f in ('ckpt.pt', 'log.jsonl', 'expert_usage.png', 'config.json'):
        assert (out / f).is_file(), f
    assert (out / 'expert_usage.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    tr, ev = records(out, 'train'), records(out, 'eval')
    assert [t['iter'] for t in tr] == [0, 5, 10, 15, 20, 25]
    assert [e['iter'] for e in ev] == [0, 10, 20, 30]
    assert tr[-1]['ce'] < tr[0]['ce'] - 0.3, [t['ce'] for t in tr]
    assert ev[-1]['val_ce'] < ev[0]['val_ce'] - 0.3, [e['val_ce'] for e in ev]
    assert ev[0]['val_ce'] == pytest.approx(np.log(65), abs=0.1)  # untrained: uniform over 65 chars
    for rec in tr + ev:
        assert [l['layer'] for l in rec['layers']] == [0, 1]
        for l in rec['layers']:
            assert len(l['frac']) == 4 and sum(l['frac']) == pytest.approx(1.0, abs=1e-5)
            assert l['max_over_mean'] == pytest.approx(4 * max(l['frac']), rel=1e-4)
            assert l['min_load'] <= 1.0 <= l['max_over_mean'] and l['drop_frac'] == 0.0
            assert 0 < l['router_entropy'] <= np.log(4) + 1e-6
    # counts are summed over the whole log interval: 5 iters x 4 x 32 tokens x top-2 (iter 0: one iter)
    assert [l['routed'] for l in tr[0]['layers']] == [256, 256]
    assert all(l['routed'] == 5 * 256 for t in tr[1:] for l in t['layers'])
    assert all(np.isfinite(t[k]) and t[k] >= 0 for t in tr for k in ('aux', 'z', 'ms_per_iter', 'tokens_per_s'))
    assert tr[0]['loss'] == pytest.approx(tr[0]['ce'] + 0.01 * tr[0]['aux'] + 0.001 * tr[0]['z'])
    # console: one line per interval with the expert summary, the per-layer table at evals
    lines = [l for l in r.stdout.splitlines() if l.startswith('iter ')]
    assert len(lines) == 6 and all('ms/iter' in l and 'load max/mean' in l and 'dead:' in l for l in lines)
    # no datasheet peak for a CPU (hardware.py): no MFU at all, never a percentage of some GPU's peak
    assert all(t['mfu'] is None for t in tr) and not any('mfu' in l for l in lines)
    assert r.stdout.count('expert load on val at iter') == 4
    # the checkpoint: weights_only-loadable, plain config, resumable at iter 30
    ck = checkpoint.load(out / 'ckpt.pt')
    assert ck['format_version'] == 1 and ck['iter_num'] == 30
    assert ck['best_val_loss'] == pytest.approx(min(e['val_ce'] for e in ev))
    assert set(ck['model_args']) == set(MoEGPTConfig.field_names())
    assert ck['config'] == json.loads((out / 'config.json').read_text())
    assert ck['config']['n_experts'] == 4 and ck['config']['device'] == 'cpu'
    assert not any(k.startswith('_orig_mod.') for k in ck['model'])
    assert {'model', 'optimizer', 'scaler', 'config', 'best_val_loss', 'sampler_state', 'rng'} <= set(ck)


def test_fresh_run_in_used_out_dir_starts_its_own_log(char_data, tmp_path):
    """A second run from scratch in an out_dir that holds a run: log.jsonl is that second run alone
    (appended, the two runs' curves mixed: compare.py read them as one); the first run moved whole to
    prev-run-1, its log byte for byte (tests/test_bad_input_train.py: the checkpoints too)."""
    out = tmp_path / 'out'
    args = [*TINY, *MOE, f'--data_dir={char_data}', f'--out_dir={out}', '--eval_interval=4', '--log_interval=2']
    ok(train([*args, '--max_iters=4']))
    first = (out / 'log.jsonl').read_bytes()
    r = ok(train([*args, '--max_iters=6', '--seed=7']))
    assert (out / 'prev-run-1' / 'log.jsonl').read_bytes() == first
    assert [e['iter'] for e in records(out, 'eval')] == [0, 4, 6]
    assert [t['iter'] for t in records(out, 'train')] == [0, 2, 4]
    assert 'prev-run-1' in r.stdout


def test_resume_continues_at_right_iter_and_matches(char_data, tmp_path):
    """Stop at iter 4 and resume to 8 == run straight to 8 (same losses at iters 4..7, same weights)."""
    common = [*TINY, *MOE, f'--data_dir={char_data}', '--eval_interval=4', '--lr_decay_iters=8',
              '--always_save_checkpoint=True']
    a, b = tmp_path / 'a', tmp_path / 'b'
    ok(train([*common, f'--out_dir={a}', '--max_iters=8']))
    ok(train([*common, f'--out_dir={b}', '--max_iters=4']))
    assert checkpoint.load(b / 'ckpt.pt')['iter_num'] == 4
    with open(b / 'log.jsonl', 'a') as f:  # a crashed run logged past its checkpoint, then tore a line
        f.write(json.dumps({'type': 'train', 'iter': 5, 'loss': 0.0, 'layers': []}) + '\n{"type": "tr')
    r = ok(train([*common, f'--out_dir={b}', '--max_iters=8', '--init_from=resume']))
    assert 'resumed from' in r.stdout and 'at iter 4' in r.stdout
    tb = records(b, 'train')
    assert [t['iter'] for t in tb] == list(range(8))  # 0..3 before, 4..7 after resuming
    ta = records(a, 'train')
    assert [t['loss'] for t in ta[4:]] == [t['loss'] for t in tb[4:]]  # bitwise: fp32 on CPU
    assert [e['iter'] for e in records(b, 'eval')] == [0, 4, 8]  # no duplicate eval at the resume point
    ca, cb = checkpoint.load(a / 'ckpt.pt'), checkpoint.load(b / 'ckpt.pt')
    assert ca['iter_num'] == cb['iter_num'] == 8
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k


def test_grad_accumulation_matches_bigger_batch(char_data, tmp_path):
    """2 micro-steps of batch 4 == 1 step of batch 8 (dense model): after one AdamW step the first
    moment is exactly (1 - beta1) * grad, so the checkpointed exp_avg compares the gradients."""
    common = ['config/dense.py', *TINY, f'--data_dir={char_data}', '--max_iters=1', '--eval_interval=1',
              '--always_save_checkpoint=True', '--grad_clip=0.0']
    a, b = tmp_path / 'ga2', tmp_path / 'ga1'
    ra = ok(train([*common, f'--out_dir={a}', '--batch_size=4', '--gradient_accumulation_steps=2',
                   '--mfu_peak_flops=1e12']))
    ok(train([*common, f'--out_dir={b}', '--batch_size=8', '--gradient_accumulation_steps=1']))
    assert records(a, 'train')[0]['layers'] == []  # dense: no MoE layers
    # a dense model has no loss terms: none is logged or printed (no 'aux 0.0000 z 0.0000')
    assert not {'aux', 'z'} & set(records(a, 'train')[0]) and not {'val_aux', 'val_z'} & set(records(a, 'eval')[0])
    assert not any(' aux ' in line or 'val aux' in line for line in ra.stdout.splitlines()), ra.stdout
    assert not (a / 'expert_usage.png').exists()
    sa, sb = (checkpoint.load(d / 'ckpt.pt')['optimizer']['state'] for d in (a, b))
    assert len(sa) == len(sb) > 10
    for i in sa:
        ga, gb = sa[i]['exp_avg'] / 0.1, sb[i]['exp_avg'] / 0.1
        assert gb.abs().max() > 0
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-4 * gb.abs().max().item())
    assert records(a, 'train')[0]['ce'] == pytest.approx(records(b, 'train')[0]['ce'], rel=1e-6)
    # an explicit mfu_peak_flops gives an MFU (on CPU too): 2 x 4 rows of (6 x active params + attention)
    # x block_size FLOPs per iteration, over ms_per_iter, against 1e12
    [t] = records(a, 'train')
    cfg = checkpoint.load(a / 'ckpt.pt')['model_args']
    n = MoEGPT(MoEGPTConfig(**cfg)).get_num_params().active
    flops = (6 * n + 12 * cfg['n_layer'] * cfg['n_embd'] * cfg['block_size']) * cfg['block_size'] * 2 * 4
    assert t['mfu'] == pytest.approx(flops / (t['ms_per_iter'] / 1000) / 1e12, rel=1e-6)
    assert f"tok/s mfu {100 * t['mfu']:.2f}%" in ra.stdout


def test_ddp_two_cpu_processes_match_single_process(char_data, tmp_path):
    """torchrun 2 procs (gloo) x 1 micro-step == 1 proc x 2 micro-steps: same global batch, same losses."""
    common = [*TINY, *MOE, f'--data_dir={char_data}', '--max_iters=5', '--eval_interval=5',
              '--gradient_accumulation_steps=2', '--lr_decay_iters=5', '--learning_rate=3e-3']
    single, ddp = tmp_path / 'single', tmp_path / 'ddp'
    ok(train([*common, f'--out_dir={single}']))
    r = ok(train([*common, f'--out_dir={ddp}'], torchrun=2))
    assert ('world size 2: 2 x 4 = 8 rows per iteration (gradient_accumulation_steps x batch_size), 4 per process '
            'as 1 micro-step of 4; tokens per iteration 256') in r.stdout
    ts, td = records(single, 'train'), records(ddp, 'train')
    assert [t['iter'] for t in td] == [0, 1, 2, 3, 4]
    assert [t['loss'] for t in td] == pytest.approx([t['loss'] for t in ts], rel=1e-5)
    assert ts[-1]['loss'] < ts[0]['loss'] - 0.05  # it trained (so equal losses mean equal updates)
    for a, b in zip(ts, td):  # expert counts summed across ranks: the same tokens were routed
        for la, lb in zip(a['layers'], b['layers']):
            assert la['routed'] == lb['routed'] == 2 * 4 * 32 * 2
            # float reordering across ranks (thread counts, all-reduce vs accumulation) may flip a
            # near-tie routing decision; one flip moves two fractions by 1/512: allow two flips
            assert la['frac'] == pytest.approx(lb['frac'], abs=2 / 512 + 1e-6)


def test_ddp_two_processes_split_one_accumulation_step(char_data, tmp_path):
    """The README's `torchrun --nproc_per_node=2 train.py config/moe_8e_cpu.py` (gradient_accumulation_steps=1):
    the 8 rows of an iteration are split 4 + 4 over the 2 processes, which train on exactly the rows the
    single process does. aux_loss_coef=0: the balance loss is per micro-batch (a nonlinear function of
    it), the only term whose gradient depends on how rows are grouped; CE and z are means over rows."""
    common = ['config/moe_8e_cpu.py', *TINY, *MOE, f'--data_dir={char_data}', '--batch_size=8', '--max_iters=5',
              '--eval_interval=5', '--lr_decay_iters=5', '--learning_rate=3e-3', '--aux_loss_coef=0.0',
              '--always_save_checkpoint=True']
    single, ddp = tmp_path / 'single', tmp_path / 'ddp'
    rs = ok(train([*common, f'--out_dir={single}']))
    r = ok(train([*common, f'--out_dir={ddp}'], torchrun=2))
    assert 'world size 1: 1 x 8 = 8 rows per iteration (gradient_accumulation_steps x batch_size), 8 per process ' \
           'as 1 micro-step of 8; tokens per iteration 256' in rs.stdout
    assert 'world size 2: 1 x 8 = 8 rows per iteration (gradient_accumulation_steps x batch_size), 4 per process ' \
           'as 1 micro-step of 4; tokens per iteration 256' in r.stdout
    ts, td = records(single, 'train'), records(ddp, 'train')
    assert [t['iter'] for t in td] == [0, 1, 2, 3, 4]
    assert [t['ce'] for t in td] == pytest.approx([t['ce'] for t in ts], rel=1e-5)
    assert [t['z'] for t in td] == pytest.approx([t['z'] for t in ts], rel=1e-5)
    assert ts[-1]['ce'] < ts[0]['ce'] - 0.05  # it trained (so equal losses mean equal updates)
    for a, b in zip(ts, td):
        assert [l['routed'] for l in a['layers']] == [l['routed'] for l in b['layers']] == [8 * 32 * 2] * 2
    ca, cb = (checkpoint.load(d / 'ckpt.pt') for d in (single, ddp))
    assert torch.equal(ca['sampler_state'], cb['sampler_state'])  # the same draws: both resume alike


def test_bfloat16_autocast_on_cpu_with_switch_config(char_data, tmp_path):
    out = tmp_path / 'bf16'
    r = ok(train(['config/switch_top1.py', *TINY, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=4',
                  '--eval_interval=4', '--dtype=bfloat16', '--n_experts=4']))
    assert "dtype='bfloat16'" in r.stdout and 'capacity_factor=1.25' in r.stdout
    tr = records(out, 'train')
    assert len(tr) == 4 and all(np.isfinite(t['loss']) for t in tr)
    assert all(len(l['frac']) == 4 and 0 <= l['drop_frac'] < 1 for t in tr for l in t['layers'])


BAD = [
    (['--n_layers=2'], "unknown config key 'n_layers' (did you mean 'n_layer'?)"),
    (['--batch_size=abc'], "batch_size must be int, got str 'abc'"),
    (['--dropout=True'], 'dropout must be float, got bool True'),
    (['--n_experts=2', '--top_k=3'], 'top_k=3 must be in [1, n_experts=2]'),
    (['--n_embd=31'], 'n_embd=31 must be a positive multiple of n_head=2'),
    (['--dtype=fp16'], "dtype='fp16' must be"),
    (['--block_size=200000'], 'block_size=200000 is too long for the val split'),
    (['--gradient_accumulation_steps=0'], 'gradient_accumulation_steps=0 must be >= 1'),
    (['config/nope.py'], 'config file not found: config/nope.py'),
    (['--init_from=resume'], 'init_from=resume: no checkpoint at'),
    (['--n_layer', '2'], "bad argument '--n_layer': overrides are written --key=value (--n_layer alone means True, "
                         "for True/False keys only)"),
    (['--dry_run', '--top_k=9'], 'top_k=9 must be in [1, n_experts=8]'),  # a dry run checks as much
    (['--norm=batchnorm'], "norm must be one of 'layernorm', 'rmsnorm', got 'batchnorm'"),  # a Literal field
    (['--router=top_p'], "MoEGPTConfig.router='top_p' must be one of ('softmax', 'noisy_topk', 'sigmoid',"),
]


@pytest.mark.parametrize('args,msg', BAD, ids=[b[1][:30] for b in BAD])
def test_bad_config_fails_clearly_before_any_work(char_data, tmp_path, args, msg):
    out = tmp_path / 'out'
    r = train([*TINY, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=1', *args], timeout=60)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert not out.exists() and r.stdout == ''  # stopped before any work


def test_bad_key_in_config_file_and_world_size(char_data, tmp_path):
    cfg = tmp_path / 'typo.py'
    cfg.write_text('import math\nlearnig_rate = 1e-3\n')
    r = train([str(cfg), f'--data_dir={char_data}'])
    assert r.returncode == 2 and f"{cfg}: unknown config key 'learnig_rate' (did you mean 'learning_rate'?)" \
        in r.stderr, r.stderr
    # launched as 2 processes, 1 x 3 rows per iteration: no even split, caught before the process group,
    # and the message names the nearest values that work
    r = train([*TINY, f'--data_dir={char_data}', '--batch_size=3', '--gradient_accumulation_steps=1'],
              env={'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '2'})
    assert r.returncode == 2 and r.stdout == '', r.stderr
    assert ('gradient_accumulation_steps=1 x batch_size=3 = 3 rows per iteration do not split evenly over 2 '
            'processes (each runs ceil(1/2) = 1 micro-steps of equal size); values that work: batch_size=2 or 4 '
            '(gradient_accumulation_steps=1), or gradient_accumulation_steps=2 or 4 (batch_size=3)') in r.stderr


@pytest.mark.parametrize('ga,bs,world,split', [  # split: (rows per process, micro-steps, rows each)
    (1, 12, 2, (6, '1 micro-step', 6)), (40, 12, 8, (60, '5 micro-steps', 12)), (40, 12, 16, (30, '3 micro-steps', 10)),
    (3, 4, 2, (6, '2 micro-steps', 3)), (40, 12, 1, (480, '40 micro-steps', 12)),
])
def test_batch_split_over_world_sizes(char_data, tmp_path, ga, bs, world, split):
    """gradient_accumulation_steps x batch_size rows per iteration in all (nanoGPT's meaning) whatever the
    world size: each process takes rows/world of them in ceil(ga/world) equal micro-steps. A dry run with
    torchrun's environment (RANK, WORLD_SIZE) resolves the split without starting a process group."""
    r = ok(train([*TINY, f'--data_dir={char_data}', f'--out_dir={tmp_path / "out"}', f'--batch_size={bs}',
                  f'--gradient_accumulation_steps={ga}', '--dry_run'],
                 env={'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': str(world)}, timeout=60))
    want = (f'world size {world}: {ga} x {bs} = {ga * bs} rows per iteration (gradient_accumulation_steps x '
            f'batch_size), {split[0]} per process as {split[1]} of {split[2]}; tokens per iteration {ga * bs * 32:,}')
    assert want in r.stdout, r.stdout
    assert not (tmp_path / 'out').exists()


def test_bad_checkpoints_on_resume(run30, char_data, tmp_path):
    out, _ = run30
    base = [*TINY, *MOE, f'--data_dir={char_data}', '--init_from=resume']
    # a different model config than the checkpoint's: named, not a shape-mismatch traceback
    r = train([*base, f'--out_dir={out}', '--n_embd=64'])
    assert r.returncode == 2 and 'different model config' in r.stderr and 'n_embd: checkpoint 32, config 64' \
        in r.stderr, r.stderr
    # truncated and garbage checkpoints: a clear error, not a pickle traceback
    for name, data in (('truncated', (out / 'ckpt.pt').read_bytes()[:5000]), ('garbage', b'not a checkpoint')):
        d = tmp_path / name
        d.mkdir()
        (d / 'ckpt.pt').write_bytes(data)
        r = train([*base, f'--out_dir={d}'])
        assert r.returncode == 2 and 'cannot read checkpoint' in r.stderr and 'truncated or corrupted' in r.stderr
        assert 'Traceback' not in r.stderr, r.stderr


def test_missing_dataset_names_the_prepare_command(tmp_path):
    r = train([*TINY, f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}'])
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert f'python prepare.py shakespeare_char --data_dir {tmp_path}' in r.stderr, r.stderr
    r = train([*TINY, '--dataset=my_corpus', f'--out_dir={tmp_path / "out"}'])
    assert r.returncode == 2 and 'python prepare.py text --input YOUR_TEXT --name my_corpus\n' in r.stderr + '\n'


def test_wandb_offline_writes_a_run(char_data, tmp_path):
    out, wdir = tmp_path / 'out', tmp_path / 'wandb_home'
    wdir.mkdir()
    ok(train([*TINY, *MOE, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2',
              '--wandb_log=True', '--wandb_run_name=t'],
             env={'WANDB_MODE': 'offline', 'WANDB_DIR': str(wdir), 'WANDB_SILENT': 'true'}))
    runs = glob.glob(str(wdir / 'wandb' / 'offline-run-*'))
    assert len(runs) == 1, os.listdir(wdir)
    data = b''.join(Path(p).read_bytes() for p in glob.glob(runs[0] + '/*.wandb'))
    for key in (b'train/ce', b'moe/max_over_mean', b'moe/L1/load_hist', b'val/ce', b'eval_train/ce',
                b'expert_usage'):
        assert key in data, key


def test_defaults_are_moe_8e_and_configs_are_valid():
    r = ok(subprocess.run([sys.executable, 'train.py', '--help'], cwd=REPO, capture_output=True, text=True))
    defaults = {}
    for line in r.stdout.splitlines():
        if line.startswith('  ') and ' = ' in line:
            k, v = line.strip().split(' = ', 1)
            defaults[k] = ast.literal_eval(v)
    assert set(MoEGPTConfig.field_names()) <= set(defaults)
    hints = typing.get_type_hints(MoEGPTConfig)  # Optional[float] -> (float, NoneType), as train.py does
    types = {k: typing.get_args(hints[k]) or (hints[k],) for k in MoEGPTConfig.field_names()}
    types.update(compile=(bool, str), vocab_size=(int, type(None)))
    cfg, _ = configurator.load(defaults, ['config/moe_8e.py'], types)
    assert cfg == defaults  # `python train.py` runs the moe_8e job
    expect = {'dense.py': dict(n_experts=1), 'switch_top1.py': dict(top_k=1, capacity_factor=1.25),
              'moe_owt.py': dict(dataset='openwebtext', n_layer=12, n_head=12, n_embd=768, block_size=1024,
                                 n_experts=8, top_k=2),
              'moe_8e_cpu.py': dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                                    max_iters=2000, dropout=0.0, n_experts=8, top_k=2)}
    for name, want in expect.items():
        cfg, _ = configurator.load(defaults, [f'config/{name}'], types)
        assert {k: cfg[k] for k in want} == want, name


def test_configurator_order_types_and_suggestions(tmp_path):
    defaults = {'lr': 1e-3, 'n': 2, 'flag': False, 'name': 'x', 'opt': None}
    types = {'opt': (int, type(None))}
    f = tmp_path / 'c.py'
    f.write_text('n = 5\nlr = 1\n')
    cfg, over = configurator.load(defaults, [str(f), '--n=7', '--flag=True', '--name=123', '--opt=None'], types)
    assert cfg == {'lr': 1.0, 'n': 7, 'flag': True, 'name': '123', 'opt': None} and type(cfg['lr']) is float
    assert over == ['n', 'lr', 'flag', 'name', 'opt']
    with pytest.raises(configurator.ConfigError, match="unknown config key 'nn' .did you mean 'n'"):
        configurator.load(defaults, ['--nn=3'])
    with pytest.raises(configurator.ConfigError, match='n must be int, got float 2.5'):
        configurator.load(defaults, ['--n=2.5'])
    f.write_text('n = undefined_name\n')
    with pytest.raises(configurator.ConfigError, match='failed to run: NameError'):
        configurator.load(defaults, [str(f)])


def test_configurator_bare_flag_means_true_for_bool_keys():
    defaults = {'flag': False, 'n': 2, 'compile': 'auto', 'opt': None}
    types = {'compile': (bool, str), 'opt': (int, type(None))}
    cfg, over = configurator.load(defaults, ['--flag', '--compile'], types)
    assert cfg['flag'] is True and cfg['compile'] is True and over == ['flag', 'compile']
    assert configurator.load(defaults, ['--flag', '--flag=False'], types)[0]['flag'] is False  # in order
    for arg in ('--n', '--opt'):  # not a bool key: a value is needed
        with pytest.raises(configurator.ConfigError, match=f"bad argument '{arg}': overrides are written "
                                                           r'--key=value \(.* for True/False keys only\)'):
            configurator.load(defaults, [arg], types)
    with pytest.raises(configurator.ConfigError, match="unknown config key 'flg' .did you mean 'flag'"):
        configurator.load(defaults, ['--flg'], types)


def test_sigmoid_router_gets_aux_free_bias_updates(char_data, tmp_path):
    """router=sigmoid: train.py calls update_expert_bias after every step (bias moves by +-rate)."""
    out = tmp_path / 'sig'
    ok(train([*TINY, *MOE, f'--data_dir={char_data}', f'--out_dir={out}', '--max_iters=3', '--eval_interval=3',
              '--router=sigmoid', '--bias_update_rate=0.01', '--always_save_checkpoint=True']))
    biases = [v for k, v in checkpoint.load(out / 'ckpt.pt')['model'].items() if k.endswith('expert_bias')]
    assert len(biases) == 2
    for b in biases:  # 3 steps of +-0.01 (0 on exact ties): it moved, by at most 0.03
        assert b.abs().max() > 0 and b.abs().max() <= 0.03 + 1e-6


def test_checkpoint_save_is_atomic_and_load_is_safe(tmp_path):
    p = tmp_path / 'ckpt.pt'
    good = {'format_version': 1, 'model': {'w': torch.ones(3)}, 'model_args': {'n_layer': 1}}
    checkpoint.save(good, p)

    class Unpicklable:  # fails in the middle of torch.save
        def __reduce__(self):
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        checkpoint.save({**good, 'model': {'w': torch.zeros(3)}, 'x': Unpicklable()}, p)
    assert torch.equal(checkpoint.load(p)['model']['w'], torch.ones(3))  # the previous one survived
    assert os.listdir(tmp_path) == ['ckpt.pt']  # and no temp file is left behind
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # permissions like torch.save's

    class Evil:  # a pickle that runs code when loaded: weights_only refuses it
        def __reduce__(self):
            return (os.system, ('echo pwned',))

    torch.save({**good, 'x': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(checkpoint.CheckpointError, match='cannot read checkpoint'):
        checkpoint.load(tmp_path / 'evil.pt')
    torch.save({**good, 'format_version': 99}, tmp_path / 'future.pt')
    with pytest.raises(checkpoint.CheckpointError, match='format_version=99'):
        checkpoint.load(tmp_path / 'future.pt')


def test_dry_run_under_torchrun_checks_a_gpu_job_and_touches_nothing(char_data, tmp_path):
    """config/moe_owt.py (a GPU job) as `torchrun --nproc_per_node=2 ... --dry_run` on a CPU machine: the
    config, the device, world size, batch split and data are resolved and checked on both ranks, rank 0
    prints them, both exit 0; no model, no process group, no out_dir. Without --dry_run the missing
    GPU is an error; a missing dataset is one in a dry run too."""
    out = tmp_path / 'out'
    args = ['config/moe_owt.py', '--dataset=shakespeare_char', f'--data_dir={char_data}', f'--out_dir={out}',
            '--device=cuda']
    r = ok(train([*args, '--dry_run'], torchrun=2, timeout=120))
    assert r.stdout.count('config (resolved):') == 1 and r.stdout.count('dry run: every check passed') == 1
    for want in ("device='cuda:0'", "dtype='bfloat16'", 'compile=True', "backend='nccl'", 'dry_run=True',
                 'world size 2: 40 x 12 = 480 rows per iteration (gradient_accumulation_steps x batch_size), 240 per '
                 'process as 20 micro-steps of 12; tokens per iteration 491,520',
                 f"dry run: every check passed ({char_data / 'shakespeare_char'}: 1,003,854 train, 111,540 val tokens"):
        assert want in r.stdout, (want, r.stdout)
    assert 'model:' not in r.stdout and not out.exists()
    if not torch.cuda.is_available():
        assert 'cuda:0 is not available here: checked as a CUDA GPU with native bf16' in r.stdout
        r = train(args, timeout=60)
        assert r.returncode == 2 and "device='cuda' but CUDA is not available" in r.stderr, r.stderr
    r = train([*args, f'--data_dir={tmp_path}', '--dry_run'], timeout=60)
    assert r.returncode == 2 and f'python prepare.py shakespeare_char --data_dir {tmp_path}' in r.stderr, r.stderr


def test_gpu_sized_model_on_cpu_says_so_in_one_line(char_data, tmp_path):
    """`python train.py` (config/moe_8e.py's model) where the device is the CPU trains, but first prints one
    line (not an error) with the estimated iteration time and config/moe_8e_cpu.py; a dry run shows it too.
    The CPU recipe, and a GPU-sized job dry-run for CUDA, get none."""
    out = tmp_path / 'out'
    r = ok(train([f'--data_dir={char_data}', f'--out_dir={out}', '--device=cpu', '--dry_run'], timeout=60))
    notes = [line for line in r.stdout.splitlines() if 'config/moe_8e_cpu.py' in line]
    assert len(notes) == 1, r.stdout
    assert notes[0].startswith('note: this model is GPU-sized and the device is the CPU: an iteration is '
                               'estimated at ~') and '5000 iterations ~' in notes[0], notes[0]
    assert 'error' not in r.stderr and not out.exists()
    for args in (['config/moe_8e_cpu.py'], ['--device=cuda'], [*TINY]):
        r = ok(train([*args, f'--data_dir={char_data}', f'--out_dir={out}', '--dry_run'], timeout=60))
        assert 'GPU-sized' not in r.stdout, (args, r.stdout)
    import train_config
    gpu = MoEGPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, n_experts=8, top_k=2)
    cpu = MoEGPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, n_experts=8, top_k=2)
    assert 'config/moe_8e_cpu.py' in train_config.cpu_hint(gpu, 64 * 256, 5000, threads=1)
    assert train_config.cpu_hint(cpu, 12 * 64, 2000, threads=1) is None


def test_resolve_device_is_one_function_for_train_and_sample():
    """hardware.resolve_device: 'auto' picks, a device this machine lacks is an error (or, for a dry run,
    resolved as that device with native bf16), and the dtype is checked."""
    assert hardware.resolve_device('cpu', 'auto') == ('cpu', 'cpu', 'float32', True)
    assert hardware.resolve_device('cpu', 'bfloat16')[2] == 'bfloat16'
    with pytest.raises(hardware.DeviceError, match="dtype='fp16' must be"):
        hardware.resolve_device('cpu', 'fp16')
    if not torch.cuda.is_available():
        with pytest.raises(hardware.DeviceError, match="device='cuda' but CUDA is not available"):
            hardware.resolve_device('cuda', 'auto')
        assert hardware.resolve_device('cuda', 'auto', local_rank=1, absent_ok=True) == \
            ('cuda:1', 'cuda', 'bfloat16', False)


def test_dtype_auto_wants_native_bf16(monkeypatch, char_data, tmp_path):
    """A V100/T4 only emulates bf16: torch.cuda.is_bf16_supported() says True (emulation counts by
    default), hardware.bf16_supported() says False, so dtype='auto' is float16 there. train.py resolves
    through hardware.py: checked in a subprocess on the same faked GPU (a sitecustomize shim)."""
    emulated = lambda including_emulation=True: including_emulation
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', emulated)
    assert torch.cuda.is_bf16_supported()  # the old check: fooled
    assert hardware.bf16_supported() is False and hardware.auto_dtype('cuda') == 'float16'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)  # Ampere+
    assert hardware.bf16_supported() is True and hardware.auto_dtype('cuda') == 'bfloat16'
    assert hardware.auto_dtype('cpu') == hardware.auto_dtype('mps') == 'float32'
    shim = tmp_path / 'shim'
    shim.mkdir()
    (shim / 'sitecustomize.py').write_text('import torch\ntorch.cuda.is_available = lambda: True\n'
                                           'torch.cuda.is_bf16_supported = lambda including_emulation=True: '
                                           'including_emulation\n')
    base = [*TINY, f'--data_dir={char_data}', f'--out_dir={tmp_path / "out"}', '--device=cuda', '--dry_run']
    r = ok(train(base, env={'PYTHONPATH': str(shim)}, timeout=60))
    assert "dtype='float16'" in r.stdout and 'not available here' not in r.stdout, r.stdout
    r = train([*base, '--dtype=bfloat16'], env={'PYTHONPATH': str(shim)}, timeout=60)
    assert r.returncode == 2 and "dtype='bfloat16' is not supported natively by this GPU" in r.stderr, r.stderr


KEEP_FREED_PROBE = r'''
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import hardware
from model import MoEGPT, MoEGPTConfig
import optim
torch.set_num_threads(1)
applied = sys.argv[2] == '1' and hardware.keep_freed_memory()
torch.manual_seed(0)
m = MoEGPT(MoEGPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, n_experts=1,
                        expert_hidden=512, dropout=0.0))
opt = optim.configure_optimizers(m, 0.1, 1e-3, (0.9, 0.99), 'cpu')
x = torch.randint(0, 65, (12, 64))
def step():
    m(x, x)[1].backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(10):
    step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 20)
'''


def test_keep_freed_memory_stops_page_faults_of_cpu_steps():
    """hardware.keep_freed_memory (train.py and bench.py on CPU): after warm-up, a training step of
    nanoGPT's CPU recipe model takes fewer than 100 page faults. Without it glibc unmaps or trims what
    each step frees (1,400 to 2,000 faults per step on this repo's VM; how many depends on the machine,
    so only the setting's own result is asserted, and the default is run only to explain a failure).
    Off glibc the call returns False and changes nothing."""
    def run(apply):
        r = subprocess.run([sys.executable, '-c', KEEP_FREED_PROBE, str(REPO), apply], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        applied, faults = r.stdout.split()
        return applied == 'True', float(faults)
    applied, faults = run('1')
    if not applied:
        assert not hardware.keep_freed_memory()
        return
    if faults >= 100:
        pytest.fail(f'{faults} page faults per step with keep_freed_memory ({run("0")[1]} without)')

"""compare.py: multipliers from curves whose answer is known, the whole-split eval against float64, the fair
configs' claims, the not-causal marking, and a tiny real suite run end to end, rerun, and resumed."""
import json
import os
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

import checkpoint
import compare
import configurator
from model import MoEGPT, MoEGPTConfig

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=False, dropout=0.0)


@pytest.fixture(scope='module')
def small_char_dir(shakespeare_char_dir, tmp_path_factory):
    """shakespeare_char cut to its first 20k train and 4k val tokens (same vocab): whole-split evals in ms."""
    src, d = shakespeare_char_dir / 'shakespeare_char', tmp_path_factory.mktemp('small') / 'shakespeare_char'
    d.mkdir()
    meta = json.loads((src / 'meta.json').read_text())
    for split, n in (('train', 20000), ('val', 4000)):
        np.fromfile(src / f'{split}.bin', dtype=meta['dtype'])[:n].tofile(d / f'{split}.bin')
        meta[f'{split}_tokens'] = n
    (d / 'meta.json').write_text(json.dumps(meta))
    return d.parent


# ----------------------------------------------------------------------------- multipliers

def test_reach_interpolates_and_bounds():
    xs, ces = [0, 10, 20, 30], [4.0, 3.0, 2.5, 2.25]
    assert compare.reach(xs, ces, 2.75) == (15.0, '=')  # halfway between 10 and 20
    assert compare.reach(xs, ces, 3.0) == (10.0, '=')
    assert compare.reach(xs, ces, 2.0) == (30, '>')  # never reached: 30 is a lower bound
    assert compare.reach(xs, ces, 4.5) == (0, '<')  # reached at the first point
    assert compare.reach([0, 10, 20], [4.0, 3.0, 3.2], 3.1) == (9.0, '=')  # first crossing, not the last point


def test_multiplier_known_answers():
    f = lambda x: 4.0 - x / 50  # noqa: E731  dense CE as a function of FLOPs, linear: interpolation is exact
    xs = [10.0 * i for i in range(11)]
    ces = [f(x) for x in xs]
    # a MoE that reaches at 20 and 30 FLOPs the CE dense reaches at 40 and 60: exactly 2x per FLOP
    m, s, kind = compare.multiplier(xs, ces, [f(40), f(60)], [20, 30])
    assert kind == '=' and m == pytest.approx(2.0) and s == pytest.approx(0.0, abs=1e-12)
    # dense better: the MoE needs 2x dense's FLOPs for the same CE
    m, s, kind = compare.multiplier(xs, ces, [f(50)], [100])
    assert kind == '=' and m == pytest.approx(0.5) and np.isnan(s)
    # never reached by dense (better than dense's best): a lower bound, dense's last point / MoE FLOPs
    m, _, kind = compare.multiplier(xs, ces, [f(100) - 0.1, f(60)], [50, 30])
    assert kind == '>' and m == pytest.approx((100 / 50 + 60 / 30) / 2)
    assert compare.fmt_mult((m, 0.0, kind)) == '> 2.00'


def fake_run(d, cfg, evals, ms, log_interval=10):
    """An out_dir as train.py leaves it (config.json, log.jsonl), with given eval CEs and step times."""
    d.mkdir(parents=True)
    full = dict(gradient_accumulation_steps=1, batch_size=4, eval_iters=20, data_dir='x', dataset='y', **TINY)
    full.update(cfg)
    (d / 'config.json').write_text(json.dumps(full))
    recs, last = [], max(evals)
    for it in range(last):
        if it in evals:
            recs.append({'type': 'eval', 'iter': it, 'val_ce': evals[it], 'layers': []})
        if it % log_interval == 0:
            recs.append({'type': 'train', 'iter': it, 'iters': 1 if it == 0 else log_interval, 'ms_per_iter': ms,
                         'layers': []})
    recs.append({'type': 'eval', 'iter': last, 'val_ce': evals[last], 'layers': []})
    (d / 'log.jsonl').write_text('\n'.join(map(json.dumps, recs)) + '\n')
    return full


def test_report_on_synthetic_runs(tmp_path, capsys, monkeypatch):
    """Dense's CE is linear in FLOPs; a MoE reaches at 40 iters the CE dense reaches with 2x its FLOPs;
    a second MoE beats dense's best; expert choice is marked and not ranked. From the logs (no checkpoints)."""
    dense_cfg = dict(n_experts=1)
    moe_cfg = dict(n_experts=4, top_k=2, granularity=2)
    tpi = 4 * TINY['block_size']
    fd = compare.model_of({**TINY, **dense_cfg}).flops_per_token()
    fm = compare.model_of({**TINY, **moe_cfg}).flops_per_token()
    f = lambda flops: 4.0 - 2.0 * flops / (100 * tpi * fd)  # noqa: E731  4.0 at iter 0, 2.0 at iter 100
    dense_evals = {i: f(i * tpi * fd) for i in range(0, 101, 10)}
    target = f(2 * 40 * tpi * fm)
    for s in (1337, 1):
        fake_run(tmp_path / f'dense-s{s}', dense_cfg, dense_evals, ms=10.0)
        fake_run(tmp_path / f'moe-s{s}', moe_cfg, {0: 4.0, 20: 3.0, 40: target}, ms=20.0)
        fake_run(tmp_path / f'better-s{s}', moe_cfg, {0: 4.0, 50: 1.9 - 0.01 * (s == 1)}, ms=20.0)
        fake_run(tmp_path / f'ec-s{s}', dict(n_experts=4, router='expert_choice', capacity_factor=2.0),
                 {0: 4.0, 50: 1.5}, ms=20.0)
    dirs = sorted(str(p) for p in tmp_path.iterdir())
    monkeypatch.setattr(sys, 'argv', ['compare.py', *dirs, '--plot', str(tmp_path / 'r.png')])
    compare.main()
    out = capsys.readouterr().out
    rows = {r['run']: r for r in json.loads((tmp_path / 'r.json').read_text())['rows']}
    m, s, kind = rows['moe']['compute_x']
    assert kind == '=' and m == pytest.approx(2.0) and s == pytest.approx(0.0, abs=1e-9)
    # wall clock: dense needs 80 * fm / fd iters at 10 ms; the MoE took 40 iters at 20 ms
    assert rows['moe']['wall_x'][0] == pytest.approx(80 * fm / fd * 0.010 / (40 * 0.020))
    assert rows['better']['compute_x'][2] == '>' and rows['better']['wall_x'][2] == '>'
    assert rows['moe']['ms'] == [pytest.approx(20.0)] * 2 and rows['dense']['ms'] == [pytest.approx(10.0)] * 2
    assert 'compute_x' not in rows['ec'] and not rows['ec']['causal']
    line = lambda name: next(l for l in out.splitlines() if l.startswith('|') and f'| {name} |' in l)  # noqa: E731
    assert line('ec').startswith('| - | ec |') and 'not causal: not comparable' in line('ec')
    assert line('better').startswith('| 1 | better |')  # ranked among the causal runs only
    assert '| 2.00 ± 0.00 |' in line('moe') and '> ' in line('better')
    assert 'within noise' in line('better') or 'beyond noise' in line('better')
    assert (tmp_path / 'r.png').stat().st_size > 10000 and (tmp_path / 'r.md').is_file()


def test_reference_ladder_turns_a_bound_into_a_number(tmp_path, capsys, monkeypatch):
    """A run better than dense's best: a lower bound on dense's curve alone; measured once the reference
    ladder (dense at 2x the iterations, its own schedule) reaches it."""
    dense_cfg, moe_cfg = dict(n_experts=1), dict(n_experts=4, top_k=2, granularity=2)
    tpi = 4 * TINY['block_size']
    fd = compare.model_of({**TINY, **dense_cfg}).flops_per_token()
    fm = compare.model_of({**TINY, **moe_cfg}).flops_per_token()
    f = lambda it: 4.0 - 2.0 * it / 100  # noqa: E731  dense CE after `it` iterations, linear in its FLOPs
    fake_run(tmp_path / 'dense', dense_cfg, {i: f(i) for i in range(0, 101, 10)}, ms=10.0)
    fake_run(tmp_path / 'better', moe_cfg, {0: 4.0, 50: 1.9}, ms=20.0)
    dirs = [str(tmp_path / 'dense'), str(tmp_path / 'better')]
    monkeypatch.setattr(sys, 'argv', ['compare.py', *dirs, '--plot', str(tmp_path / 'a.png')])
    compare.main()
    row = json.loads((tmp_path / 'a.json').read_text())['rows'][1]
    assert row['compute_x'][2] == '>' and row['compute_x'][0] == pytest.approx(100 * fd / (50 * fm))
    fake_run(tmp_path / 'dense_x2', dense_cfg, {0: 4.0, 100: 2.5, 200: f(200)}, ms=10.0)
    monkeypatch.setattr(sys, 'argv', ['compare.py', *dirs, str(tmp_path / 'dense_x2'), '--ref_ladder', 'dense_x2',
                                      '--plot', str(tmp_path / 'b.png')])
    compare.main()
    rows = {r['run']: r for r in json.loads((tmp_path / 'b.json').read_text())['rows']}
    m, _, kind = rows['better']['compute_x']
    assert kind == '=' and m == pytest.approx(105 * fd / (50 * fm))  # dense reaches 1.9 at iter 105
    assert rows['better']['wall_x'][0] == pytest.approx(105 * 0.010 / (50 * 0.020))
    assert 'compute_x' not in rows['dense_x2'] and 'reference ladder: 200 iters' in capsys.readouterr().out


def test_noise_marking():
    row = dict(delta=0.03, noise=2 * (0.02 ** 2 + 0.01 ** 2) ** 0.5)
    assert 'within noise' in compare.fmt_delta(row)
    assert 'beyond noise' in compare.fmt_delta(dict(delta=0.1, noise=0.05))


# ----------------------------------------------------------------------------- the whole val split

def test_val_ce_whole_matches_float64(tmp_path, small_char_dir, monkeypatch):
    torch.manual_seed(0)
    model = MoEGPT(MoEGPTConfig(**TINY, n_experts=4, top_k=2)).eval()
    data = np.memmap(small_char_dir / 'shakespeare_char' / 'val.bin', dtype=np.uint16, mode='r')
    T = TINY['block_size']
    n = (len(data) - 1) // T
    x = torch.from_numpy(data[:n * T].astype(np.int64)).view(n, T)
    y = torch.from_numpy(data[1:n * T + 1].astype(np.int64)).view(n, T)
    ref = MoEGPT(model.config).double().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits, _, _ = ref(x, y)
        want = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction='sum').item() / y.numel()
    assert n * T == len(data) - 1 - (len(data) - 1) % T  # every full window, each target once
    assert compare.val_ce_whole(model, data, T, 64) == pytest.approx(want, abs=1e-5)

    # the same through a checkpoint, and cached: a second report evaluates nothing
    out = tmp_path / 'run'
    out.mkdir()
    checkpoint.save({'format_version': checkpoint.FORMAT_VERSION, 'model': model.state_dict(),
                     'model_args': vars(model.config), 'iter_num': 7}, out / 'ckpt-7.pt')
    cfg = dict(data_dir=str(small_char_dir), dataset='shakespeare_char', batch_size=4)
    assert compare.whole_val_curve(str(out), cfg) == {7: pytest.approx(want, abs=1e-5)}
    monkeypatch.setattr(compare, 'val_ce_whole', lambda *a: pytest.fail('evaluated again'))
    assert compare.whole_val_curve(str(out), cfg) == {7: pytest.approx(want, abs=1e-5)}


# ----------------------------------------------------------------------------- the fair configs

def fair_model(name, **over):
    """The model a suite run builds: config/moe_8e_cpu.py, then the run's file (as train.py applies them)."""
    ns = {'bias': False,  # train.py's default
          **configurator._read_file(str(REPO / 'config/moe_8e_cpu.py')),
          **configurator._read_file(str(REPO / f'config/{compare.FAIR_FILES[name]}.py')), **over}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return MoEGPT(MoEGPTConfig(vocab_size=65, **{k: v for k, v in ns.items() if k in MoEGPTConfig.field_names()}))


def ffn(model):
    """(total, active) FFN parameters, routers left out."""
    routers = sum(p.numel() for moe in model.moe_layers() for p in moe.router.parameters())
    rest = fair_model('dense').get_num_params().total - sum(
        p.numel() for b in fair_model('dense').transformer.h for p in b.mlp.parameters())
    p = model.get_num_params()
    return p.total - routers - rest, p.active - routers - rest


def test_fair_configs_hold_what_they_say():
    assert [n for n, _, _ in compare.SUITES['cpu_baby']['runs']] == compare.FAIR
    dense_total, dense_active = ffn(fair_model('dense'))
    assert dense_total == dense_active == 4 * 2 * 128 * 512  # 4 layers of one 4*n_embd MLP
    for name in ('moe_8e_top2', 'fine_32e_top8', 'shared_8e_top1'):  # equal active FLOPs
        assert ffn(fair_model(name))[1] == dense_active, name
    assert ffn(fair_model('moe_8e_top2_full'))[1] == 2 * dense_active
    assert ffn(fair_model('fine_32e_top8'))[0] == ffn(fair_model('moe_8e_top2'))[0] == 4 * dense_total
    assert ffn(fair_model('dense_total'))[0] == ffn(fair_model('moe_8e_top2'))[0]  # the other bound
    # at GPT-2 small width (gpu_owt): the same relations, with the suite's expert_hidden override
    owt = dict(n_layer=1, n_head=12, n_embd=768)
    big = fair_model('dense_total', **owt, expert_hidden=12288).get_num_params().total
    moe = fair_model('moe_8e_top2', **owt)
    routers = sum(p.numel() for m in moe.moe_layers() for p in m.router.parameters())
    assert big == moe.get_num_params().total - routers
    for model in (fair_model(n) for n in compare.FAIR):  # grouped_mm alignment
        assert model.config.n_embd % 8 == 0 and model.config.expert_hidden % 8 == 0
        assert model.config.causal and not model.config.batch_dependent


# ----------------------------------------------------------------------------- a tiny real suite

SMALL = ['--seeds', '2', '--only', 'dense,moe_8e_top2', '--max_iters', '4', '--eval_interval', '2',
         '--set', 'n_layer=1', '--set', 'n_head=2', '--set', 'n_embd=32', '--set', 'block_size=16',
         '--set', 'batch_size=4', '--set', 'eval_iters=2', '--set', 'log_interval=1']


def run_compare(monkeypatch, capsys, root, data, *more):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setattr(sys, 'argv', ['compare.py', '--suite', 'cpu_baby', *SMALL, '--root', str(root),
                                      '--data_dir', str(data), *more])
    compare.main()
    return capsys.readouterr().out


def final_logged(d):
    return [r for r in compare.read_log(d) if r['type'] == 'eval'][-1]['val_ce']


def test_suite_runs_once_resumes_and_reports(tmp_path, small_char_dir, monkeypatch, capsys):
    root = tmp_path / 'suite'
    out = run_compare(monkeypatch, capsys, root, small_char_dir)
    runs = ['dense-s1337', 'moe_8e_top2-s1337', 'dense-s1', 'moe_8e_top2-s1']
    assert sorted(os.listdir(root)) == sorted(runs + ['results.json', 'results.md', 'results.png'])
    assert out.count(': training: ') == 4 and 'whole val split CE' in out
    rows = {r['run']: r for r in json.loads((root / 'results.json').read_text())['rows']}
    assert json.loads((root / 'results.json').read_text())['source'] == 'whole'
    assert rows['dense']['seeds'] == rows['moe_8e_top2']['seeds'] == 2
    assert 'compute_x' not in rows['dense'] and rows['moe_8e_top2']['compute_x'][2] in '=<>'
    assert len(rows['moe_8e_top2']['ce']) == 2
    mtimes = {r: os.stat(root / r / 'ckpt-4.pt').st_mtime_ns for r in runs}
    before = {r: final_logged(root / r) for r in runs}

    # again: nothing trained, nothing evaluated
    out = run_compare(monkeypatch, capsys, root, small_char_dir)
    assert out.count('done, not redone') == 4 and ': training: ' not in out and 'whole val split CE' not in out
    assert {r: os.stat(root / r / 'ckpt-4.pt').st_mtime_ns for r in runs} == mtimes

    # dense-s1 as if killed after its iter-2 checkpoint: ckpt.pt is iter 2's, nothing after it happened
    d = root / 'dense-s1'
    os.remove(d / 'ckpt.pt')
    shutil.copyfile(d / 'ckpt-2.pt', d / 'ckpt.pt')
    os.remove(d / 'ckpt-4.pt')
    recs = [r for r in compare.read_log(d) if r['iter'] < 2 or (r['type'] == 'eval' and r['iter'] == 2)]
    (d / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    out = run_compare(monkeypatch, capsys, root, small_char_dir)
    assert out.count('done, not redone') == 3 and out.count(': resuming: ') == 1
    assert 'dense-s1: resuming: ' in out and '--init_from=resume' in out
    assert final_logged(d) == before['dense-s1']  # exact resume: the same final eval as the uninterrupted run

    # --prune: the checkpoints before the final one go, their whole-split CEs stay (cached)
    curve = compare.whole_val_curve(str(d), json.loads((d / 'config.json').read_text()))
    out = run_compare(monkeypatch, capsys, root, small_char_dir, '--prune')
    assert out.count('done, not redone') == 4 and 'whole val split CE' not in out
    assert sorted(f for f in os.listdir(d) if f.endswith('.pt')) == ['ckpt-4.pt', 'ckpt.pt']
    assert compare.whole_val_curve(str(d), json.loads((d / 'config.json').read_text())) == curve and 2 in curve

    # other arguments for an existing run: refused, not silently mixed
    monkeypatch.setattr(sys, 'argv', ['compare.py', '--suite', 'cpu_baby', *SMALL, '--root', str(root),
                                      '--data_dir', str(small_char_dir), '--set', 'learning_rate=0.01'])
    with pytest.raises(SystemExit) as e:
        compare.main()
    err = capsys.readouterr().err  # the bad-input contract: one line, exit 2, before any run starts
    assert e.value.code == 2 and 'trained with other arguments' in err and err.count('\n') == 1, err

    # eval noise: independent logged-style evals of the final checkpoint, against the whole split
    whole, draws = compare.eval_noise(str(root / 'dense-s1337'), 3)
    assert len(draws) == 3 and len(set(draws)) == 3 and all(abs(v - whole) < 0.5 for v in draws)
    assert whole == pytest.approx(json.loads((root / 'results.json').read_text())['rows'][0]['ce'][0])

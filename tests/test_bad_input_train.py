"""Bad input to train.py (issue 24), as a property: every config key, fed hostile values, gives either a
sane run or the contract of docs/reliability.md: one `train.py: error:` message (a command to run may
follow on indented lines), exit 2, no traceback, and nothing written: the out_dir, which holds a finished
run, byte for byte as it was. Then one regression test per class of the issue's train.py cases.

The pairs come from train.py itself (its --help globals: every key, its default and its accepted types),
not from a hand list. They run as --dry_run (every check runs before a dry run stops) in one subprocess
that executes train.py once per pair (one torch import for all: a subprocess per pair is ~2 s each).
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402

TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--dropout=0.0', '--eval_iters=2', '--warmup_iters=0', '--log_interval=1',
        '--n_experts=4', '--top_k=2', '--lr_decay_iters=4', '--eval_interval=2', '--max_iters=4']

# Hostile command-line values for every key: negative, zero, huge (past int64), inf and -inf (1e400 reads as
# inf), nan, wrong types, empty, blank, an unknown name, and the bare --key form
HOSTILE_ARGS = ['-1', '0', '-0.5', '1.5', str(2 ** 64), str(-2 ** 64), '1e400', '-1e400', 'nan', 'inf', '', ' ',
                'no_such_name', 'None', 'True', '[]', "['x']", '[-1]', '{}', '()']
# ...and values only a config file can give: real floats nan/inf, ints at the int64 edge, and from the default
HOSTILE_EXPRS = ["float('nan')", "float('inf')", "-float('inf')", str(2 ** 63), str(-2 ** 63 - 1)]

WORKER = r'''
"""Run train.py once per argv in this process; report each run's exit code, output and out_dir hashes."""
import contextlib, hashlib, io, json, os, sys, traceback, warnings
repo, spec_path, out_path = sys.argv[1:4]
spec = json.load(open(spec_path))
sys.path.insert(0, repo)
code = compile(open(os.path.join(repo, 'train.py')).read(), os.path.join(repo, 'train.py'), 'exec')


def tree_hash(d):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(d)):
        dirs.sort()
        h.update(os.path.relpath(root, d).encode() + b'/')
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), 'rb').read())
    return h.hexdigest()


class Out(io.StringIO):
    def reconfigure(self, **kw):  # train.py line-buffers its stdout
        pass


def run(argv):
    g = {'__name__': '__main__', '__file__': os.path.join(repo, 'train.py')}
    o, e = Out(), Out()
    sys.argv = ['train.py', *argv]
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # (a warning is not an error: a config the paper uses, warned)
        try:
            exec(code, g)
            rc = 0
        except SystemExit as ex:
            rc = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
        except BaseException:
            traceback.print_exc(file=e)
            rc = 'traceback'
    return rc, o.getvalue(), e.getvalue(), g


if spec['what'] == 'keys':  # train.py's own keys, defaults and accepted types (its --help exits before parsing)
    _, _, _, g = run(['--help'])
    keys = {k: dict(default=repr(g[k]), types=[t.__name__ if isinstance(t, type) else repr(t)
                                               for t in g['key_types'].get(k, (type(g[k]),))])
            for k in g['config_keys']}
    json.dump(keys, open(out_path, 'w'))
else:
    results = []
    for argv in spec['runs']:
        before = [tree_hash(d) for d in spec['watch']]
        rc, o, e, _ = run(argv)
        results.append(dict(argv=argv, rc=rc, out=o[-2000:], err=e[-4000:],
                            config=hashlib.sha256(o.split('world size')[0].encode()).hexdigest(),
                            changed=[d for d, h in zip(spec['watch'], before) if tree_hash(d) != h]))
    json.dump(results, open(out_path, 'w'))
'''


def train(args, timeout=300):
    return subprocess.run([sys.executable, 'train.py', *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def ok(r):
    assert r.returncode == 0, f'exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}'
    return r


def snapshot(d):
    """Every file under d, by relative path, with its bytes: 'nothing overwritten' is an equality."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob('*')) if p.is_file()}


def contract(rc, err):
    """Bad input's contract: exit 2, one `train.py: error:` line (indented lines after it: a command to
    run), no traceback. Returns what is wrong, or ''."""
    lines = err.splitlines()
    if rc != 2:
        return f'exit {rc}'
    if not lines or not lines[0].startswith('train.py: error: ') or 'Traceback' in err:
        return 'not one error line'
    if any(not l.startswith('    ') for l in lines[1:]):
        return 'more than one message'
    return ''


@pytest.fixture(scope='module')
def finished(shakespeare_char_dir, tmp_path_factory):
    """A finished run (keep_last=2: ckpt.pt, ckpt-2.pt, ckpt-4.pt, log.jsonl, config.json, the heatmap)."""
    out = tmp_path_factory.mktemp('finished') / 'out'
    ok(train([*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', '--keep_last=3',
              '--always_save_checkpoint=True']))
    assert {'ckpt.pt', 'ckpt-2.pt', 'ckpt-4.pt', 'log.jsonl', 'config.json'} <= set(os.listdir(out))
    return out


def worker(tmp_path, spec, timeout=600):
    (tmp_path / 'worker.py').write_text(WORKER)
    (tmp_path / 'spec.json').write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, str(tmp_path / 'worker.py'), str(REPO), str(tmp_path / 'spec.json'),
                        str(tmp_path / 'result.json')], cwd=spec.get('cwd', tmp_path), capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, 'OMP_NUM_THREADS': '1',
                                                        'WANDB_MODE': 'disabled'})  # wandb_log=True: no network
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / 'result.json').read_text())


def hostile_pairs(keys, conf_dir):
    """(key, argument) for every key of train.py: the command-line values, the bare --key, and the
    config-file values (a file per pair, in conf_dir) of HOSTILE_EXPRS plus ones from the key's default
    (its negative and x1e30 for a number, an unknown name in its form for a string, a list of strings)."""
    pairs = []
    for k, info in keys.items():
        pairs += [(k, f'--{k}={v}') for v in HOSTILE_ARGS] + [(k, f'--{k}')]
        exprs = list(HOSTILE_EXPRS)
        d = eval(info['default'])  # a repr of a plain value (train.py's defaults)
        if type(d) in (int, float):
            exprs += [repr(-d - 1), repr(d * 10 ** 30)]
        if type(d) is str:
            exprs += [repr(d.upper() + '_X'), repr(d + '/x/../..')]
        if 'list' in info['types'] or 'tuple' in info['types']:
            exprs += ["[2 ** 64]", "[float('nan')]", "['3']"]
        for i, e in enumerate(exprs):
            f = conf_dir / f'{k}-{i}.py'
            f.write_text(f'{k} = {e}\n')
            pairs.append((k, str(f)))
    return pairs


@pytest.mark.slow  # the long job: ~4,800 dry runs
def test_every_key_hostile_values_fail_clearly_or_run_sanely(finished, shakespeare_char_dir, tmp_path):
    """Property: for every config key of train.py and every hostile value, from scratch and resuming the
    finished run in out_dir: a sane dry run (exit 0) or the contract, and out_dir and the working folder
    unchanged byte for byte."""
    (tmp_path / 'k').mkdir()
    keys = worker(tmp_path / 'k', {'what': 'keys'})
    assert {'seed', 'learning_rate', 'capacity_factor', 'router', 'n_layer', 'out_dir'} <= set(keys)
    conf = tmp_path / 'conf'
    conf.mkdir()
    pairs = hostile_pairs(keys, conf)
    out, cwd = tmp_path / 'out', tmp_path / 'cwd'
    shutil.copytree(finished, out)
    cwd.mkdir()  # relative out_dirs ('no_such_name', ...) land here: it must stay empty
    base = [*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}']
    runs = [[*base, *start, a, '--dry_run'] for start in ([], ['--init_from=resume']) for _, a in pairs]
    before = snapshot(out)
    results = worker(tmp_path, {'what': 'runs', 'runs': runs, 'watch': [str(out), str(cwd)], 'cwd': str(cwd)})
    print(f'train.py: {len(pairs)} (key, value) pairs x 2 starts (scratch, resume) = {len(runs)} dry runs; '
          f"{sum(r['rc'] == 2 for r in results)} refused, {sum(r['rc'] == 0 for r in results)} ran")
    bad = []
    for r in results:
        what = '' if r['rc'] == 0 and 'dry run: every check passed' in r['out'] else contract(r['rc'], r['err'])
        what += f" wrote {r['changed']}" if r['changed'] else ''
        if what:
            bad.append(f"{what}: {r['argv'][-2]} ({r['argv'][-3] if 'resume' in r['argv'][-3] else 'scratch'})\n"
                       f"{(r['err'] or r['out'])[-1500:]}")
    assert not bad, f'{len(bad)} of {len(runs)} runs broke the contract:\n' + '\n'.join(bad[:15])
    assert snapshot(out) == before and not os.listdir(cwd)
    assert len(pairs) >= 25 * len(keys)  # every key got every value
    # a dry run that passed proves only the checks: what passed must also train (class 1 was values that
    # passed them and crashed later), from scratch, 1 iter (a step, 2 evals), into a fresh out_dir each: exit 0, or 3 (training
    # went wrong, e.g. a learning rate of 1e27: docs/reliability.md), never a traceback
    passed = {r['config']: r['argv'][len(base):-1] for r in results  # one run per resolved config printed
              if r['rc'] == 0 and '--init_from=resume' not in r['argv']}.values()
    real = [[*base[:-1], f'--out_dir={tmp_path}/real/{i}', '--max_iters=1', '--eval_iters=1', *a]
            for i, a in enumerate(passed)]
    results = worker(tmp_path, {'what': 'runs', 'runs': real, 'watch': [], 'cwd': str(cwd)})
    print(f'{len(real)} of them trained for real')
    crashed = [f"exit {r['rc']}: {r['argv'][-1]}\n{r['err'][-1500:]}" for r in results
               if r['rc'] not in (0, 3) or 'Traceback' in r['err']]
    assert not crashed and len(real) > 50, '\n'.join(crashed[:10])


# ----------------------------------------------------------------------------- one regression test per class
def used_out_dir(finished, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(finished, out)
    return out


@pytest.mark.parametrize('start', [[], ['--init_from=resume']], ids=['scratch', 'resume'])
@pytest.mark.parametrize('arg,msg', [
    ('--seed=-1', 'seed=-1 must be in [0, 2**31)'),
    (f'--seed={2 ** 32}', f'seed={2 ** 32} must be in [0, 2**31)'),
    ('--capacity_factor=1e400', 'capacity_factor=inf must be a finite number'),
], ids=['seed -1', 'seed 2**32', 'capacity_factor 1e400'])
def test_values_that_crashed_after_config_json_are_refused_first(finished, shakespeare_char_dir, tmp_path, start,
                                                                  arg, msg):
    """Class 1: these passed the checks, then numpy (seed) or apply_capacity (inf) raised after config.json
    was written; resuming a finished run, its config.json was overwritten. Now: refused before any write."""
    out = used_out_dir(finished, tmp_path)
    before = snapshot(tmp_path)
    r = train([*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', *start, '--max_iters=6', arg])
    assert contract(r.returncode, r.stderr) == '' and msg in r.stderr, r.stderr
    assert snapshot(tmp_path) == before


def test_non_finite_hyperparameters_are_refused(finished, shakespeare_char_dir, tmp_path):
    """Class 2: --learning_rate=1e400 trained (every step skipped, val CE nan, exit 0). Every float key
    must be finite: from the command line (1e400 is inf) and from a config file (a real nan)."""
    out = used_out_dir(finished, tmp_path)
    (tmp_path / 'nan.py').write_text("weight_decay = float('nan')\n")
    before = snapshot(tmp_path)
    base = [*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}']
    r = train([*base, '--learning_rate=1e400'])
    assert r.stderr == 'train.py: error: learning_rate=inf must be a finite number\n' and r.returncode == 2
    r = train([*base, tmp_path / 'nan.py'])
    assert r.stderr == 'train.py: error: weight_decay=nan must be a finite number\n' and r.returncode == 2
    assert snapshot(tmp_path) == before


def test_fresh_run_moves_the_whole_earlier_run_aside(finished, shakespeare_char_dir, tmp_path):
    """Class 3: a fresh run (another seed, keep_last=2) in an out_dir holding a finished run left that
    run's ckpt-<iter>.pt beside its own ckpt.pt (copying one over ckpt.pt, as the docs say to go back,
    restored the other run). Now the earlier run moves whole into out_dir/prev-run-1 (byte for byte, and
    said), the out_dir holds the new run alone, and a dry run only says it would move it."""
    out = used_out_dir(finished, tmp_path)
    old = snapshot(out)
    base = [*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', '--seed=7', '--keep_last=2',
            '--always_save_checkpoint=True', '--max_iters=6']
    r = ok(train([*base, '--dry_run']))
    assert f'would move the earlier run in {out}' in r.stdout and snapshot(out) == old
    r = ok(train(base))
    assert f"to {out / 'prev-run-1'}" in r.stdout
    assert snapshot(out / 'prev-run-1') == old  # the whole earlier run, nothing left behind or changed
    top = sorted(f for f in os.listdir(out) if f.endswith('.pt'))
    assert top == ['ckpt-4.pt', 'ckpt-6.pt', 'ckpt.pt']
    assert all(checkpoint.load(out / f)['config']['seed'] == 7 for f in top)  # every checkpoint here is this run's
    assert [json.loads(l)['iter'] for l in (out / 'log.jsonl').read_text().splitlines()][0] == 0
    ok(train(base))  # and again: the second run moves to prev-run-2, prev-run-1 untouched
    assert snapshot(out / 'prev-run-1') == old and (out / 'prev-run-2' / 'ckpt-6.pt').is_file()


@pytest.mark.parametrize('args,msg', [
    (['--router=soft', '--capacity_factor=0.5'], "capacity_factor=0.5 (or eval_) means nothing: router='soft'"),
    (['--router=soft', '--eval_capacity_factor=1.0'], "router='soft' declares no capacity"),
    (['--moe_first_dense=2'], 'moe_first_dense=2 must be < n_layer=2, else no block is MoE'),
    (['--moe_first_dense=5'], 'moe_first_dense=5 must be < n_layer=2'),
], ids=['soft + capacity', 'soft + eval capacity', 'first_dense = n_layer', 'first_dense > n_layer'])
def test_combinations_that_mean_nothing_are_refused(finished, shakespeare_char_dir, tmp_path, args, msg):
    """Class 4: soft MoE with a capacity (it has none) and an MoE model with no MoE block trained silently."""
    out = used_out_dir(finished, tmp_path)
    before = snapshot(tmp_path)
    r = train([*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', *args])
    assert contract(r.returncode, r.stderr) == '' and msg in r.stderr, r.stderr
    assert snapshot(tmp_path) == before


def test_capacity_rule_follows_the_router_declaration(monkeypatch):
    """The capacity rule reads RouterSpec, not router names: expert choice (no layer capacity, but it reads
    capacity_factor as its tokens per expert) keeps it; any router declared without capacity refuses it;
    one MoE block (moe_first_dense = n_layer - 1) or a dense model past n_layer is fine."""
    from model import ROUTERS, MoEGPTConfig
    base = dict(n_layer=2, n_head=2, n_embd=32, n_experts=4, top_k=2)
    assert MoEGPTConfig(**base, router='expert_choice', capacity_factor=2.0).capacity_factor == 2.0
    monkeypatch.setitem(ROUTERS, 'plain', ROUTERS['softmax'])
    monkeypatch.setitem(ROUTERS, 'nocap', dataclasses.replace(ROUTERS['softmax'], capacity=False))
    assert MoEGPTConfig(**base, router='plain', capacity_factor=1.25).has_capacity
    with pytest.raises(ValueError, match="router='nocap' declares no capacity"):
        MoEGPTConfig(**base, router='nocap', capacity_factor=1.25)
    assert sum(MoEGPTConfig(**base, moe_first_dense=1).is_moe_layer(i) for i in range(2)) == 1
    assert MoEGPTConfig(**{**base, 'n_experts': 1}, moe_first_dense=5).n_experts == 1


@pytest.mark.parametrize('arg', ['--n_layer=1000000000', '--n_experts=1000000000', '--vocab_size=1000000000000'])
def test_absurd_sizes_are_refused_before_anything_is_built(finished, shakespeare_char_dir, tmp_path, arg):
    """Integers that fit in int64 but no machine can train (n_layer=10**9 used to start building 10**9
    blocks): refused in one line when the training state, split over every process, is more than the
    device's memory; a dry run says the same, and nothing is written."""
    out = used_out_dir(finished, tmp_path)
    before = snapshot(tmp_path)
    for extra in ([], ['--dry_run']):
        r = train([*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', arg, *extra], timeout=120)
        assert contract(r.returncode, r.stderr) == '' and 'parameters: training them needs at least' in r.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('kw', [
    dict(), dict(n_experts=1), dict(moe_first_dense=1, moe_every=2, n_layer=5), dict(n_shared_experts=2, shared_expert_gate=True),
    dict(tie_embeddings=False, position='rope', norm='rmsnorm', activation='swiglu', bias=False, granularity=2),
    dict(router='sigmoid', n_group=2, topk_group=1, qk_norm='head', n_kv_head=1, dense_hidden=48, moe_first_dense=2),
], ids=['moe', 'dense', 'first_dense+every', 'shared', 'llama-like', 'grouped+gqa'])
def test_count_params_equals_the_built_model(kw):
    """train_config.count_params (two blocks on the meta device, times their counts) against the whole
    model built on the meta device and counted."""
    import torch
    import train_config
    from model import MoEGPT, MoEGPTConfig
    cfg = MoEGPTConfig(**{**dict(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=65, n_experts=4, top_k=2), **kw})
    with torch.device('meta'):
        built = sum(p.numel() for p in MoEGPT(cfg).parameters())
    assert train_config.count_params(cfg) == built


def test_a_move_aside_cut_half_way_is_finished_whole_by_the_next_run(tmp_path, monkeypatch):
    """A crash in the middle of moving an earlier run aside used to leave it split (some files in prev-run-1,
    the rest moved to prev-run-2 by the next run). The files now go to .prev-run-N.moving, renamed whole at
    the end; the next fresh run moves the rest into that same folder."""
    out = tmp_path / 'out'
    (out / 'prev-run-1').mkdir(parents=True)  # an older run, moved aside before: never touched
    (out / 'prev-run-1' / 'ckpt.pt').write_bytes(b'oldest')
    run = {'ckpt.pt': b'A', 'ckpt-4.pt': b'B', 'ckpt-6.pt': b'C', 'log.jsonl': b'D', 'config.json': b'E'}
    for f, data in run.items():
        (out / f).write_bytes(data)
    real, moved = os.replace, []

    def crash_after_two(src, dst):
        if len(moved) == 2:
            raise KeyboardInterrupt('killed half-way')
        moved.append(src)
        real(src, dst)
    monkeypatch.setattr(checkpoint.os, 'replace', crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.move_previous_run(str(out))
    monkeypatch.setattr(checkpoint.os, 'replace', real)
    assert len(moved) == 2 and '.prev-run-2.moving' in checkpoint.previous_run(str(out))  # the next run sees it
    assert checkpoint.move_previous_run(str(out)) == str(out / 'prev-run-2')
    assert snapshot(out / 'prev-run-2') == run and snapshot(out / 'prev-run-1') == {'ckpt.pt': b'oldest'}
    assert sorted(os.listdir(out)) == ['prev-run-1', 'prev-run-2'] and checkpoint.previous_run(str(out)) == []

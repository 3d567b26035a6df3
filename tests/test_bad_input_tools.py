"""Issue 24, classes 5-8: bad input to sample.py, compare.py, export.py and bench.py is one line on stderr
(`<tool>: error: ...`), exit 2, no traceback, nothing written (docs/reliability.md, "Bad input").

Property tests: every argument of each tool, read from the tool's own definitions (argparse's actions for
bench.py and compare.py, the DEFAULTS of configurator for sample.py and export.py), gets every hostile value
(negative, zero, huge, inf, nan, wrong type, empty, unknown name). Each pair goes through the tool's own
argument checks in this process (a subprocess per pair would cost ~2 s of imports each): it is refused by
the contract, or it is in the tool's ACCEPTED table below, which says why that value is a sane request; the
working folder (run folders, checkpoints, an existing output) is byte-for-byte unchanged after all of them.
An accepted value nobody listed fails the test, so a check that is dropped is caught.

Then one regression test per case the issue lists.
"""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import traceback

import pytest
import torch

from conftest import REPO

import bench
import checkpoint
import compare
from model import MoEGPT, MoEGPTConfig

# the hostile values: class -> the text a user types (argparse reads 'inf'/'nan' as floats; configurator reads
# Python literals, so 1e400 is its inf and 'nan' a bare word)
HOSTILE = {'negative': '-1', 'zero': '0', 'huge': '1' + '0' * 30, 'inf': 'inf', 'inf literal': '1e400',
           '-inf': '-inf', 'nan': 'nan', 'wrong type': '1.5', 'words': 'abc', 'empty': '',
           'unknown name': 'no_such_name'}


def call(fn, *args):
    """fn(*args) in this process: (exit code, stderr, traceback text or '')."""
    err = io.StringIO()
    code, tb = 0, ''
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            fn(*args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001  anything else is what the contract forbids: a traceback
            tb = traceback.format_exc()
    return code, err.getvalue(), tb


def assert_contract(prog, code, err, tb, what):
    assert not tb, f'{what}: traceback\n{tb}'
    assert code == 2, f'{what}: exit {code}, stderr {err!r}'
    assert err.startswith(f'{prog}: error: ') and err.count('\n') == 1 and 'Traceback' not in err, f'{what}: {err!r}'


def snapshot(root):
    """{relative path: bytes} of every file under root, and the set of folders: 'unchanged' means both equal."""
    files, dirs = {}, set()
    for d, ds, fs in os.walk(root):
        dirs.update(os.path.relpath(os.path.join(d, x), root) for x in ds)
        for f in fs:
            p = os.path.join(d, f)
            with open(p, 'rb') as fh:
                files[os.path.relpath(p, root)] = fh.read()
    return files, dirs


def sweep(prog, check, keys, base, accepted, form):
    """Every key x every hostile value through check(argv). Returns the accepted (key, value) pairs; asserts
    the contract for the others. form(key, text) -> the argv items that set key to text."""
    tried, got_accepted = 0, set()
    for key in keys:
        for cls, text in HOSTILE.items():
            argv = [*base, *form(key, text)]
            code, err, tb = call(check, argv)
            tried += 1
            if code == 0 and not tb:
                got_accepted.add((key, cls))
                continue
            assert_contract(prog, code, err, tb, f'{prog} {argv}')
    unexpected = got_accepted - set(accepted)
    assert not unexpected, f'{prog}: hostile values accepted without a reason in ACCEPTED: {sorted(unexpected)}'
    assert tried == len(keys) * len(HOSTILE)
    return got_accepted


# ----------------------------------------------------------------------------- fixtures

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65, bias=False, dropout=0.0)


def write_run(d, data_dir, **model_kw):
    """An out_dir with a ckpt.pt of a tiny model (as train.py writes it) trained on shakespeare_char."""
    torch.manual_seed(0)
    args = {**TINY, **model_kw}
    model = MoEGPT(MoEGPTConfig(**args))
    d.mkdir(parents=True, exist_ok=True)
    ckpt = dict(format_version=checkpoint.FORMAT_VERSION, model=model.state_dict(), model_args=args, iter_num=0, best_val_loss=9.9,
                config=dict(data_dir=str(data_dir), dataset='shakespeare_char'))
    checkpoint.save(ckpt, str(d / 'ckpt.pt'))
    return d


@pytest.fixture
def work(tmp_path, monkeypatch, shakespeare_char_dir):
    """A working folder (the cwd) with a tiny run, an existing output file and folder: checked unchanged."""
    monkeypatch.chdir(tmp_path)
    run = write_run(tmp_path / 'run', shakespeare_char_dir, n_experts=4, top_k=2)
    (tmp_path / 'a_file').write_text('keep me')
    (tmp_path / 'full_dir').mkdir()
    (tmp_path / 'full_dir' / 'x').write_text('keep me too')
    before = snapshot(tmp_path)
    yield tmp_path, run
    assert snapshot(tmp_path) == before, 'a refused (or only checked) command wrote or changed a file'


def configurator_form(key, text):
    return [f'--{key}={text}']


def argparse_keys(parser):
    """Every user-facing option of an argparse parser (the hidden internal ones excluded)."""
    import argparse
    return [a.option_strings[-1] for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def argparse_form(key, text):
    return [f'{key}={text}']  # '=' form: '-1' and '' reach the option as its value, as a user means them


# ----------------------------------------------------------------------------- properties

# (key, hostile class) pairs a tool accepts, and why that is a sane request
SAMPLE_ACCEPTED = {
    **{(k, 'zero'): why for k, why in (('max_new_tokens', 'the prompt alone'), ('temperature', 'greedy'),
                                       ('top_k', 'off'), ('seed', 'a seed'))},
    ('max_new_tokens', 'huge'): 'as many tokens as asked for (Ctrl-C stops it)',
    ('num_samples', 'huge'): 'as many samples as asked for (Ctrl-C stops it)',
    ('top_k', 'huge'): 'more than the vocabulary: every token (sample_next takes min(top_k, vocab))',
    ('temperature', 'wrong type'): '1.5: a hotter distribution',
    **{('start', c): 'a prompt: any text; encoded once the tokenizer is loaded ("" and unknown symbols are '
                     'refused there, one line)' for c in HOSTILE},
    ('temperature', 'huge'): 'a near-uniform distribution (logits / 1e30)',
    ('data_dir', 'empty'): "'' = the checkpoint's own data_dir (the default)",
    **{('data_dir', c): 'a folder name: its meta.json is read when the tokenizer is loaded (missing: one line, '
                        'exit 2; run below)' for c in HOSTILE if c != 'empty'},
    **{('init_from', c): 'a GPT-2 hub name or path: hf.load refuses it in one line (exit 2)'
       for c in HOSTILE if c != 'empty'},
    ('init_from', 'empty'): "hf.load('') refuses it in one line (exit 2)",
}


def test_sample_every_key_every_hostile_value(work):
    import importlib
    tmp, run = work
    sample = importlib.import_module('sample')
    accepted = sweep('sample.py', sample.parse, list(sample.DEFAULTS), [f'--out_dir={run}', '--device=cpu'],
                     SAMPLE_ACCEPTED, configurator_form)
    # the accepted ones that run in a moment run to the end (tiny model, 2 tokens): a sane outcome, no traceback
    cheap = [(k, c) for k, c in accepted if c != 'huge' and k != 'init_from']  # init_from: the hub, offline here
    assert len(cheap) >= 8
    for key, cls in cheap:
        argv = [f'--out_dir={run}', '--device=cpu', '--max_new_tokens=2', '--num_samples=1', f'--{key}={HOSTILE[cls]}']
        code, err, tb = call(sample.main, argv)
        if code:  # only an untokenizable prompt or a folder without the dataset may still be refused, by the contract
            assert key in ('start', 'data_dir'), (argv, err, tb)
            assert_contract('sample.py', code, err, tb, argv)
        else:
            assert not tb and 'tokens/s' in err, (argv, err, tb)


EXPORT_ACCEPTED = {
    **{('to', c): 'a new folder of that name (created only when the checkpoint exports)'
       for c in ('negative', 'zero', 'huge', 'inf', 'inf literal', '-inf', 'nan', 'wrong type', 'words',
                 'unknown name')},
}


def test_export_every_key_every_hostile_value(work):
    import importlib
    tmp, run = work
    export = importlib.import_module('export')
    sweep('export.py', export.parse, list(export.DEFAULTS), [f'--out_dir={run}', f'--to={tmp / "new_export"}'],
          EXPORT_ACCEPTED, configurator_form)


BENCH_ACCEPTED = {
    ('--profile', 'zero'): 'off (the default)',
    ('--skip', 'empty'): 'nothing skipped (the default)',
    ('--repeats', 'huge'): 'bounded by VARIANT_BUDGET_S per variant and size',
    ('--steps', 'huge'): 'as many steps as asked for (Ctrl-C stops it)',
    ('--profile', 'huge'): 'as many profiled steps as asked for',
    ('--onehot-budget-gib', 'huge'): 'no limit: every one-hot size runs',
    ('--onehot-budget-gib', 'wrong type'): '1.5 GiB',
    ('--baseline', 'empty'): "'' = no baseline (the default)",
}


def test_bench_every_key_every_hostile_value(work):
    def check(argv):
        bench.check_args(bench.parse_args(argv))
    sweep('bench.py', check, argparse_keys(bench.make_parser()), ['--device=cpu'], BENCH_ACCEPTED, argparse_form)


COMPARE_ACCEPTED = {
    ('--eval_noise', 'zero'): 'off (the default)',
    ('--eval_noise', 'huge'): 'as many eval draws as asked for',
    ('--max_iters', 'huge'): 'a long run, as asked',
    ('--eval_interval', 'huge'): 'one eval at the end',
    ('--seed_list', 'zero'): 'seed 0',
    ('--seed_list', 'empty'): "'' = --seeds (the default)",
    ('--ref_ladder', 'empty'): "'' = none (the default)",
    **{('--ref_ladder', c): 'a run name; names that match no out_dir are ignored'
       for c in ('negative', 'zero', 'huge', 'inf', 'inf literal', '-inf', 'nan', 'wrong type', 'words', 'unknown name')},
    ('--only', 'empty'): "'' = all runs (the default)",
    **{('--root', c): 'a new folder for the runs, created when a run starts'
       for c in ('negative', 'zero', 'huge', 'inf', 'inf literal', '-inf', 'nan', 'wrong type', 'words', 'unknown name')},
    **{(k, c): 'a new file in the working folder, written after the runs'
       for k in ('--plot', '--report') for c in ('zero', 'huge', 'inf', 'nan', 'words', 'unknown name',
                                                 'negative', 'inf literal', '-inf', 'wrong type')},
}


def test_compare_every_key_every_hostile_value(work):
    tmp, run = work
    sweep('compare.py', compare.parse_args, argparse_keys(compare.make_parser()), [], COMPARE_ACCEPTED,
          argparse_form)


# prepare.py runs whole (its checks and its writes are one call, and cheap on a small text): a refused pair
# leaves the working folder unchanged; an accepted one must be listed here and leave a dataset that loads
PREPARE_ACCEPTED = {
    **{(k, c): 'a folder name (letters, digits, _ . -), created for the output'
       for k in ('--name', '--data_dir') for c in ('negative', 'zero', 'huge', 'inf', 'inf literal', '-inf', 'nan',
                                                  'wrong type', 'words', 'unknown name')},
}
PREPARE_HUB_KEYS = ('--hf_dataset', '--data_files', '--hf_config', '--hf_split', '--hf_column', '--num_proc')


def prepare_sweep(tmp, hf_home, monkeypatch):
    """Every prepare.py argument (the dataset too) x every hostile value, run whole, in this process. The
    hub-only options on a local `hf` run (the `text` builder on a file), the others on a `text` run."""
    import prepare
    for var, value in (('HF_HUB_OFFLINE', '1'), ('HF_DATASETS_OFFLINE', '1'), ('HF_HOME', str(hf_home))):
        monkeypatch.setenv(var, value)
    for i in (1, 2):  # `hf` reads a file as one document and needs two for a train/val split
        (tmp / f'book{i}.txt').write_text(f'It is a truth universally acknowledged, {i}.\n' * 50)
    text_base = ['text', '--input=book1.txt', '--data_dir=data', '--name=sweep']
    hf_base = ['hf', '--hf_dataset=text', '--data_files=book*.txt', '--data_dir=data', '--name=sweep', '--num_proc=1']
    tried, got_accepted = 0, set()
    for key in ['dataset', *argparse_keys(prepare.make_parser())]:
        base = hf_base if key in PREPARE_HUB_KEYS else text_base
        for cls, text in HOSTILE.items():
            argv = [text, *base[1:]] if key == 'dataset' else [a for a in base if not a.startswith(key + '=')] + [f'{key}={text}']
            before = snapshot(tmp)
            code, err, tb = call(lambda a: sys.exit(prepare.main(a)), argv)
            tried += 1
            if code == 0 and not tb:
                got_accepted.add((key, cls))
                made = sorted(set(snapshot(tmp)[1]) - before[1])  # the new folders: data_dir/name
                out = [d for d in made if os.path.isfile(tmp / d / 'meta.json')]
                assert len(out) == 1, f'prepare.py {argv}: accepted, but wrote {made}'
                prepare.load_meta(tmp / os.path.dirname(out[0]), os.path.basename(out[0]))  # a dataset that loads
                shutil.rmtree(tmp / made[0])
                assert snapshot(tmp) == before
                continue
            # datasets' progress bars (lines redrawn with \r) may come first: the one line is the error
            err = '\n'.join(line for line in err.split('\n') if '\r' not in line)
            assert_contract('prepare.py', code, err, tb, f'prepare.py {argv}')
            assert snapshot(tmp) == before, f'prepare.py {argv}: refused, but wrote or changed a file'
    unexpected = got_accepted - set(PREPARE_ACCEPTED)
    assert not unexpected, f'prepare.py: hostile values accepted without a reason in PREPARE_ACCEPTED: {sorted(unexpected)}'
    return tried


def test_prepare_every_key_every_hostile_value(tmp_path, monkeypatch, gpt2_offline):
    work = tmp_path / 'work'  # the working folder checked unchanged; datasets' cache beside it
    work.mkdir()
    monkeypatch.chdir(work)
    assert prepare_sweep(work, tmp_path / 'hf_home', monkeypatch) == (1 + len(argparse_keys(__import__('prepare').make_parser()))) * len(HOSTILE)


def test_pair_counts():
    """The number of (key, value) pairs each sweep tries (issue 24's closing note): keys x hostile values."""
    keys = dict(sample=len(__import__('sample').DEFAULTS), export=len(__import__('export').DEFAULTS),
                bench=len(argparse_keys(bench.make_parser())), compare=len(argparse_keys(compare.make_parser())),
                prepare=1 + len(argparse_keys(__import__('prepare').make_parser())))  # + the dataset argument
    counts = {k: v * len(HOSTILE) for k, v in keys.items()}
    print('(key, value) pairs per entry point:', counts)
    assert all(v >= 5 * len(HOSTILE) for v in counts.values()), counts


# ----------------------------------------------------------------------------- regressions: the cases

EC = dict(n_experts=4, router='expert_choice', capacity_factor=2.0)


@pytest.mark.filterwarnings('ignore:router=expert_choice')  # model.py's "sees the future" note: known here
def test_sample_show_routing_on_expert_choice_is_one_line(work, shakespeare_char_dir):
    """Case 5: generate raised ValueError (a traceback) after the model was loaded; now one line, exit 2,
    before any token is sampled."""
    import sample
    tmp, _ = work
    run = write_run(tmp / 'ec_run', shakespeare_char_dir, **EC)
    code, err, tb = call(sample.main, [f'--out_dir={run}', '--device=cpu', '--show_routing', '--max_new_tokens=2'])
    assert_contract('sample.py', code, err, tb, 'show_routing on expert choice')
    assert "router='expert_choice'" in err and 'sample without --show_routing' in err
    shutil.rmtree(run)  # the work fixture checks the rest of the folder is unchanged


@pytest.mark.filterwarnings('ignore:router=expert_choice')
@pytest.mark.parametrize('model_kw,says', [(EC, "kv cache off: router='expert_choice' is not causal"),
                                           (dict(n_experts=4, top_k=2), 'kv cache on)')])
def test_sample_kv_cache_line_says_what_generate_did(work, shakespeare_char_dir, model_kw, says):
    """Case 5: sampling an expert-choice checkpoint printed 'kv cache on' though generate turns the cache off
    for a non-causal router; a causal one still says on."""
    import sample
    tmp, _ = work
    run = write_run(tmp / 'r2', shakespeare_char_dir, **model_kw)
    code, err, tb = call(sample.main, [f'--out_dir={run}', '--device=cpu', '--max_new_tokens=3', '--num_samples=1'])
    assert code == 0 and not tb, (err, tb)
    assert says in err, err
    shutil.rmtree(run)


@pytest.mark.parametrize('argv,says', [(['--seeds', '0'], '--seeds: 0 must be >= 1'),
                                       (['--seeds', '-1'], '--seeds: -1 must be >= 1'),
                                       (['--seeds', '11'], 'there are 10 preset seeds')])
def test_compare_seeds_out_of_range_start_nothing(work, monkeypatch, argv, says):
    """Case 6: --seeds 0 was an IndexError, --seeds -1 started 54 training runs (SEEDS[:-1]); now refused
    before any run (train.py is never launched: subprocess.run would raise here)."""
    monkeypatch.setattr(compare.subprocess, 'run', lambda *a, **k: pytest.fail('a run was started'))
    code, err, tb = call(compare.main, ['--suite', 'cpu_baby', *argv, '--root', 'suite_root'])
    assert_contract('compare.py', code, err, tb, argv)
    assert says in err and not os.path.exists('suite_root')


def fake_run(d, evals, train_recs, torn=False):
    """An out_dir as train.py leaves it: config.json and log.jsonl with these eval CEs and train records."""
    d.mkdir()
    cfg = dict(gradient_accumulation_steps=1, batch_size=4, eval_iters=2, data_dir='x', dataset='y', **TINY)
    (d / 'config.json').write_text(json.dumps(cfg))
    recs = [{'type': 'eval', 'iter': i, 'val_ce': ce, 'layers': []} for i, ce in evals.items()] + train_recs
    text = '\n'.join(map(json.dumps, recs)) + '\n'
    (d / 'log.jsonl').write_text(text + ('{"type": "train", "iter": 9, "ms_per' if torn else ''))


@pytest.mark.parametrize('kind', ['max_iters_0', 'torn_last_line'])
def test_compare_run_with_nothing_to_time_reports_a_dash(tmp_path, monkeypatch, capsys, kind):
    """Case 6: a run with no timed step (max_iters=0: only the iter-0 eval; or a log whose only train record
    is a torn last line) divided by zero in the report and the log table; now its ms/iter and tokens/s read
    '-' and the report is written."""
    monkeypatch.chdir(tmp_path)
    if kind == 'max_iters_0':
        fake_run(tmp_path / 'dense', {0: 4.2}, [])
    else:
        fake_run(tmp_path / 'dense', {0: 4.2, 10: 3.9}, [], torn=True)
    fake_run(tmp_path / 'moe', {0: 4.2, 10: 3.5}, [{'type': 'train', 'iter': 9, 'iters': 10, 'ms_per_iter': 5.0,
                                                    'layers': []}])
    compare.main(['dense', 'moe', '--logged_only', '--plot', 'r.png'])
    out = capsys.readouterr().out
    dense_rows = [ln for ln in out.splitlines() if ln.startswith('| dense |') or '| dense | 1 |' in ln]
    assert len(dense_rows) == 2 and all('| - |' in ln for ln in dense_rows), out
    rows = {r['run']: r for r in json.loads((tmp_path / 'r.json').read_text())['rows']}
    assert math.isnan(rows['dense']['ms'][0]) and math.isnan(rows['dense']['tok_s'][0])
    assert rows['moe']['ms'] == [pytest.approx(5.0)]  # a timed run next to it is measured as before
    assert 'wall_x' not in rows['moe'] and 'wall_x' not in rows['dense']  # the reference timed nothing


def test_compare_plot_into_a_missing_folder_is_refused_before_any_work(work, monkeypatch):
    """Case 6: --plot into a missing folder was a traceback after every run and eval; now checked first."""
    monkeypatch.setattr(compare.subprocess, 'run', lambda *a, **k: pytest.fail('a run was started'))
    for flag, path in (('--plot', 'no/such/folder/r.png'), ('--report', 'no/such/r.md'), ('--plot', 'r.xyz')):
        code, err, tb = call(compare.main, ['--suite', 'cpu_baby', '--seeds', '1', '--root', 'suite_root', flag, path])
        assert_contract('compare.py', code, err, tb, path)
        assert flag in err and not os.path.exists('suite_root')


def test_export_to_an_existing_file_is_one_line(work):
    """Case 7: --to naming an existing file was a NotADirectoryError traceback; the file is left as it was."""
    import export
    tmp, run = work
    code, err, tb = call(export.main, [f'--out_dir={run}', '--to=a_file'])
    assert_contract('export.py', code, err, tb, '--to=a_file')
    assert 'is a file' in err and (tmp / 'a_file').read_text() == 'keep me'


@pytest.mark.parametrize('argv,says', [
    (['--moe', '8e-top2,16e'], "unknown MoE shape '16e'"),
    (['--dtype', 'f8'], "--dtype: invalid choice: 'f8'"),
    (['--tokens', 'abc'], "'abc' is not an integer"),
    (['--tokens', '0'], '0 must be >= 1'),
    (['--n-embd', '7'], '--n-embd 7: with --moe 8e-top2 in float32'),
    (['--device', 'cuda'], 'this torch sees no CUDA GPU (use --device cpu)'),
    (['--skip', 'layers'], "unknown section 'layers'"),
])
def test_bench_bad_argument_is_refused_before_any_work(monkeypatch, argv, says):
    """Case 8: each of these was a traceback (or, --skip, ignored while the whole benchmark ran); now one line,
    exit 2, before the first check or timing (check_layer_variants would fail the test if reached)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # --device cuda: as on a machine without one
    monkeypatch.setattr(bench, 'check_layer_variants', lambda *a, **k: pytest.fail('work started'))
    code, err, tb = call(bench.main, ['--quick', '--device', 'cpu', *argv])
    assert_contract('bench.py', code, err, tb, argv)
    assert says in err, err


def test_each_tool_exits_2_in_one_line_as_a_process(tmp_path):
    """The contract end to end, through each script's __main__ (one process per tool): exit code 2, one
    stderr line, nothing on stdout, nothing written."""
    (tmp_path / 'f').write_text('x')
    cases = [('sample.py', [f'--out_dir={tmp_path}', '--temperature=1e400']),
             ('compare.py', ['--suite', 'cpu_baby', '--seeds', '-1', '--root', str(tmp_path / 'root')]),
             ('export.py', [f'--out_dir={tmp_path}', f'--to={tmp_path / "f"}']),
             ('bench.py', ['--quick', '--skip', 'nothing'])]
    for script, argv in cases:
        r = subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout == '' and r.stderr.count('\n') == 1, (script, r.stderr)
        assert r.stderr.startswith(f'{script}: error: ') and 'Traceback' not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ['f'] and (tmp_path / 'f').read_text() == 'x'

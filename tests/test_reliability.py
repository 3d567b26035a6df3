"""Reliability (issue 6, docs/reliability.md): every promise is checked by killing, signalling,
corrupting or poisoning a real tiny train.py run on CPU, in a subprocess.

Exact resume with no signal involved is tests/test_train.py::test_resume_continues_at_right_iter_and_matches;
here the resumes after SIGTERM and after kill -9 are compared bitwise, at every iter, with an
uninterrupted run (dropout > 0, so the restored RNG state matters too).
"""
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoint  # noqa: E402

TINY = ['--device=cpu', '--compile=False', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--dropout=0.1', '--eval_iters=4', '--warmup_iters=0', '--log_interval=1',
        '--n_experts=4', '--top_k=2', '--lr_decay_iters=60']
MAX_ITERS = 60  # ~10 ms per iter: a signal sent at iter 5 lands mid-run


def common(data):
    return [*TINY, f'--data_dir={data}', f'--max_iters={MAX_ITERS}', '--eval_interval=20',
            '--always_save_checkpoint=True']


def env(**extra):
    # one thread: tiny models gain nothing from more, and spinning OpenMP threads crawl on a busy CI box
    return {**os.environ, 'OMP_NUM_THREADS': '1', **extra}


def run(args, timeout=120, **extra):
    return subprocess.run([sys.executable, 'train.py', *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env(**extra))


def start(args, **extra):
    return subprocess.Popen([sys.executable, 'train.py', *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(**extra))


def read_until(proc, needle):
    """stdout lines up to and including the first one containing needle (the run keeps printing)."""
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, f'run ended before printing {needle!r}:\n' + ''.join(lines[-20:]) + proc.stderr.read()
        lines.append(line)
        if needle in line:
            return lines


def ok(r):
    assert r.returncode == 0, f'exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}'
    return r


def records(out_dir, kind='train'):
    return [r for r in map(json.loads, (Path(out_dir) / 'log.jsonl').read_text().splitlines()) if r['type'] == kind]


def snapshot(d):
    """Every file under d, by relative path, with its bytes: 'nothing overwritten' is an equality."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob('*')) if p.is_file()}


def temps(d):
    return glob.glob(os.path.join(d, checkpoint.TEMP_GLOB))


def wait_in_save_stall(d):
    """Wait until a save (under MOEGPT_TEST_SAVE_DELAY) has written its temp file and sits in the stall."""
    deadline = time.time() + 30
    while not temps(d) and time.time() < deadline:
        time.sleep(0.05)
    assert temps(d), 'the save never started its temp file'
    time.sleep(1.0)  # the temp (1 MB) is written and fsynced long before this: now in the stall


def assert_same_weights(a, b):
    ma, mb = checkpoint.load(a)['model'], checkpoint.load(b)['model']
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


@pytest.fixture(scope='module')
def reference(shakespeare_char_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with: 60 iters, saves at 20/40/60,
    keep_last=2 (ckpt-40.pt and ckpt-60.pt stay, ckpt-20.pt is pruned)."""
    out = tmp_path_factory.mktemp('reference') / 'out'
    r = ok(run([*common(shakespeare_char_dir), f'--out_dir={out}', '--keep_last=2']))
    tr = records(out)
    assert [t['iter'] for t in tr] == list(range(MAX_ITERS))
    return out, [t['loss'] for t in tr], r


def test_keep_last_keeps_n_newest_checkpoints(reference):
    """keep_last=2: ckpt.pt (newest) plus ckpt-<iter>.pt for the 2 newest saves; no temp files."""
    out, _, r = reference
    assert r.stdout.count('saving checkpoint to') == 3  # iters 20, 40, 60
    assert sorted(os.listdir(out)) == ['ckpt-40.pt', 'ckpt-60.pt', 'ckpt.pt', 'config.json', 'expert_usage.png',
                                       'log.jsonl']
    assert os.path.samefile(out / 'ckpt.pt', out / 'ckpt-60.pt')  # a hard link: no extra disk
    assert checkpoint.load(out / 'ckpt-40.pt')['iter_num'] == 40
    assert checkpoint.load(out / 'ckpt.pt')['iter_num'] == 60
    assert checkpoint.load(out / 'ckpt.pt')['evaluated'] is True


def test_kill_9_during_save_keeps_last_good_checkpoint(reference, shakespeare_char_dir, tmp_path):
    """SIGKILL while the save at iter 60 sits between its complete temp file and the rename: ckpt.pt is
    still the iter-40 checkpoint byte for byte, it resumes, the stray temp is removed on the next start,
    and the resumed run's losses at iters 40..59 and final weights equal the uninterrupted run's."""
    ref, ref_losses, _ = reference
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copyfile(ref / 'ckpt-40.pt', out / 'ckpt.pt')
    shutil.copyfile(ref / 'log.jsonl', out / 'log.jsonl')  # logged past 40: trimmed on resume
    good = (out / 'ckpt.pt').read_bytes()
    args = [*common(shakespeare_char_dir), f'--out_dir={out}', '--init_from=resume']
    p = start(args, MOEGPT_TEST_SAVE_DELAY='60')  # the save at iter 60 stalls before its rename
    try:
        read_until(p, 'saving checkpoint to')
        wait_in_save_stall(out)
        p.kill()
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    assert (out / 'ckpt.pt').read_bytes() == good  # the previous checkpoint survived the killed save
    assert checkpoint.load(out / 'ckpt.pt')['iter_num'] == 40
    [stray] = temps(out)
    r = ok(run(args))
    assert f'removed {stray}' in r.stdout and not temps(out)
    assert f'resumed from {out / "ckpt.pt"} at iter 40' in r.stdout
    assert checkpoint.load(out / 'ckpt.pt')['iter_num'] == MAX_ITERS
    tr = records(out)
    assert [t['iter'] for t in tr] == list(range(MAX_ITERS))
    assert [t['loss'] for t in tr] == ref_losses  # bitwise (fp32 on CPU)
    assert_same_weights(out / 'ckpt.pt', ref / 'ckpt.pt')


def test_sigterm_saves_exits_0_and_resume_matches(reference, shakespeare_char_dir, tmp_path):
    """SIGTERM mid-run: the step finishes, one checkpoint is saved at the iter reached (val improved or
    not), exit 0 with the resume command; running that command finishes the run with the same losses at
    every iter and the same final weights as the uninterrupted run."""
    ref, ref_losses, _ = reference
    out = tmp_path / 'out'
    p = start([*common(shakespeare_char_dir), f'--out_dir={out}'])
    try:
        read_until(p, 'iter 5:')
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, stderr
    assert 'train.py: SIGTERM received: finishing this step, then saving a checkpoint' in stderr
    ck = checkpoint.load(out / 'ckpt.pt')
    k = ck['iter_num']
    assert 5 < k < MAX_ITERS and ck['evaluated'] is False
    assert [t['iter'] for t in records(out)] == list(range(k))  # stopped right after iter k-1's step
    assert stdout.count('saving checkpoint to') == len([i for i in (20, 40) if i < k]) + 1  # one save for it
    assert f'SIGTERM: stopped at iter {k} and saved a checkpoint ({out / "ckpt.pt"}); resume with:' in stdout
    resume = shlex.split(stdout.split('resume with:\n')[1].splitlines()[0])
    assert resume[:2] == ['python', 'train.py'] and resume[-1] == '--init_from=resume'
    r = ok(subprocess.run([sys.executable, *resume[1:]], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env()))
    assert f'at iter {k}' in r.stdout
    assert [t['loss'] for t in records(out)] == ref_losses  # every iter, bitwise (fp32 on CPU)
    assert [e['iter'] for e in records(out, 'eval')] == [0, 20, 40, 60]  # an eval due at k still ran
    assert_same_weights(out / 'ckpt.pt', ref / 'ckpt.pt')


def test_second_signal_exits_at_once(shakespeare_char_dir, tmp_path):
    """SIGINT starts the graceful stop; a SIGTERM during its (stalled) save exits at once, code 143,
    without waiting for the save and without leaving a checkpoint behind (only the temp file)."""
    out = tmp_path / 'out'
    p = start([*common(shakespeare_char_dir), f'--out_dir={out}'], MOEGPT_TEST_SAVE_DELAY='60')
    try:
        read_until(p, 'iter 5:')
        p.send_signal(signal.SIGINT)
        read_until(p, 'saving checkpoint to')
        wait_in_save_stall(out)  # the graceful save is under way (and would stall for 60 s)
        t = time.time()
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=20)
        waited = time.time() - t
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM and waited < 15, (p.returncode, waited, stderr)
    assert 'SIGINT received' in stderr and 'second signal (SIGTERM): exiting now without saving' in stderr
    assert not (out / 'ckpt.pt').exists() and len(temps(out)) == 1  # never a half-written ckpt.pt


def test_nan_steps_are_skipped_and_counted(shakespeare_char_dir, tmp_path):
    """debug_nan_at_iters poisons the loss at 4 iters (never 3 in a row): each step is skipped, printed
    and counted in log.jsonl; the run completes; AdamW took exactly 12 - 4 steps; weights stay finite."""
    out = tmp_path / 'out'
    r = ok(run([*common(shakespeare_char_dir), f'--out_dir={out}', '--max_iters=12', '--eval_interval=6',
                '--debug_nan_at_iters=[2, 3, 7, 8]', '--max_bad_steps=3']))
    skipped = [l for l in r.stdout.splitlines() if 'step skipped' in l]
    assert [l.split(':')[0] for l in skipped] == ['iter 2', 'iter 3', 'iter 7', 'iter 8']
    assert '(2 in a row' in skipped[1] and '(1 in a row' in skipped[2]
    tr = records(out)
    assert [t['bad_steps'] for t in tr] == [int(i in (2, 3, 7, 8)) for i in range(12)]
    assert all(t['grad_norm'] != t['grad_norm'] for t in tr if t['bad_steps'])  # NaN
    ck = checkpoint.load(out / 'ckpt.pt')
    assert ck['iter_num'] == 12
    steps = {float(s['step']) for s in ck['optimizer']['state'].values()}
    assert steps == {8.0}  # the 4 poisoned steps never reached the optimizer
    for k, v in ck['model'].items():
        assert torch.isfinite(v).all(), k
    for s in ck['optimizer']['state'].values():
        assert torch.isfinite(s['exp_avg']).all() and torch.isfinite(s['exp_avg_sq']).all()


def test_guard_reads_flags_late_without_losing_a_step(shakespeare_char_dir, tmp_path):
    """log_interval=4: with fused AdamW the skip happens on the device (found_inf) and the host reads each
    step's flags one step late or at the log line (no per-step sync on a GPU). Same outcome as reading
    them at once: the same steps printed, counted per log interval, never applied; and the stop after
    max_bad_steps names the iter of the last bad step."""
    out = tmp_path / 'out'
    r = ok(run([*common(shakespeare_char_dir), f'--out_dir={out}', '--max_iters=12', '--eval_interval=6',
                '--log_interval=4', '--debug_nan_at_iters=[2, 3, 7, 11]', '--max_bad_steps=3']))
    skipped = [l.split(':')[0] for l in r.stdout.splitlines() if 'step skipped' in l]
    assert skipped == ['iter 2', 'iter 3', 'iter 7', 'iter 11']
    tr = records(out)
    assert [t['iter'] for t in tr] == [0, 4, 8]  # iters 9-11 end without a log line: 11 counted at the end
    assert [t['bad_steps'] for t in tr] == [0, 2, 1]
    ck = checkpoint.load(out / 'ckpt.pt')
    assert all(g['fused'] for g in ck['optimizer']['param_groups'])  # the on-device skip was the one in use
    assert {float(s['step']) for s in ck['optimizer']['state'].values()} == {8.0}
    assert all(torch.isfinite(v).all() for v in ck['model'].values())
    r = run([*common(shakespeare_char_dir), f'--out_dir={tmp_path / "out2"}', '--max_iters=12',
             '--eval_interval=6', '--log_interval=4', '--debug_nan_at_iters=[5, 6, 7, 8]', '--max_bad_steps=3'])
    assert r.returncode == 3 and 'iter 7: 3 consecutive steps' in r.stderr, r.stderr


def test_max_bad_steps_in_a_row_stops_naming_iter_and_last_good_checkpoint(shakespeare_char_dir, tmp_path):
    """3 consecutive poisoned steps (5, 6, 7) with max_bad_steps=3: exit 3 at iter 7, naming the last good
    checkpoint (iter 4); that checkpoint is untouched and finite, and nothing was saved after it."""
    out = tmp_path / 'out'
    r = run([*common(shakespeare_char_dir), f'--out_dir={out}', '--max_iters=12', '--eval_interval=4',
             '--debug_nan_at_iters=[5, 6, 7, 8, 9]', '--max_bad_steps=3'])
    assert r.returncode == 3, r.stderr
    assert ('train.py: error: iter 7: 3 consecutive steps with a non-finite loss or gradient norm '
            '(max_bad_steps=3); stopping') in r.stderr
    assert f'last good checkpoint: {out / "ckpt.pt"} (iter 4)' in r.stderr and 'Traceback' not in r.stderr
    assert r.stdout.count('saving checkpoint to') == 1
    ck = checkpoint.load(out / 'ckpt.pt')
    assert ck['iter_num'] == 4 and all(torch.isfinite(v).all() for v in ck['model'].values())
    assert records(out)[-1]['iter'] == 6  # (the stopping step itself is not logged)


def test_non_finite_weights_are_never_saved(reference, shakespeare_char_dir, tmp_path):
    """learning_rate=3e38 (near fp32's max) turns some weights to Inf in one step although its loss and grad
    norm were finite (the guard can't see it coming); the save at the next eval refuses (exit 3, naming
    the last good checkpoint) and ckpt.pt stays the good one, byte for byte."""
    ref, _, _ = reference
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copyfile(ref / 'ckpt-40.pt', out / 'ckpt.pt')
    good = (out / 'ckpt.pt').read_bytes()
    r = run([*common(shakespeare_char_dir), f'--out_dir={out}', '--init_from=resume', '--learning_rate=3e38',
             '--decay_lr=False', '--eval_interval=1'])
    assert r.returncode == 3, r.stderr
    assert 'train.py: error: iter 41: the weights are not finite (NaN/Inf); not saving a checkpoint' in r.stderr
    assert f'last good checkpoint: {out / "ckpt.pt"} (iter 40)' in r.stderr
    assert (out / 'ckpt.pt').read_bytes() == good and not temps(out)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope='module')
def bad_vocab_data(shakespeare_char_dir, tmp_path_factory):
    """shakespeare_char with meta.json claiming a 60-symbol vocabulary (the checkpoints saw 65)."""
    d = tmp_path_factory.mktemp('bad_vocab') / 'shakespeare_char'
    shutil.copytree(shakespeare_char_dir / 'shakespeare_char', d)
    meta = json.loads((d / 'meta.json').read_text())
    (d / 'meta.json').write_text(json.dumps({**meta, 'vocab_size': 60}))
    return d.parent


BAD = [  # (id, extra args, expected message); every case runs against an out_dir holding a finished run
    ('misspelt key', ['--learnig_rate=1e-3'], "unknown config key 'learnig_rate' (did you mean 'learning_rate'?)"),
    ('wrong type', ['--max_iters=lots'], "max_iters must be int, got str 'lots'"),
    ('top_k > n_experts', ['--top_k=5'], 'top_k=5 must be in [1, n_experts=4]'),
    ('block_size > val split', ['--block_size=200000'], 'block_size=200000 is too long for the val split'),
    ('dataset missing', ['--dataset=nope'], "dataset 'nope' is not prepared"),
    ('vocab != checkpoint', ['BAD_VOCAB', '--vocab_size=65', '--init_from=resume'],
     "was trained on a vocabulary of 65 but 'shakespeare_char' has 60"),
    ('other model config', ['--init_from=resume', '--n_embd=64'], 'n_embd: checkpoint 32, config 64'),
    ('truncated checkpoint', ['TRUNCATE', '--init_from=resume'], '(truncated or corrupted?)'),
    ('garbage checkpoint', ['GARBAGE', '--init_from=resume'], '(truncated or corrupted?)'),
    ('out_dir not writable', ['OUT_UNDER_FILE'], 'is not writable'),
    ('dry run: out_dir not writable', ['OUT_UNDER_FILE', '--dry_run'], 'is not writable'),
    ('dry run: other model config', ['--init_from=resume', '--n_embd=64', '--dry_run'],
     'n_embd: checkpoint 32, config 64'),
]


@pytest.mark.parametrize('args,msg', [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_fails_clearly_and_overwrites_nothing(reference, shakespeare_char_dir, bad_vocab_data, tmp_path,
                                                        args, msg):
    ref, _, _ = reference
    out = tmp_path / 'out'
    shutil.copytree(ref, out)  # ckpt.pt, ckpt-*.pt, log.jsonl, config.json, expert_usage.png
    data = shakespeare_char_dir
    if 'TRUNCATE' in args:
        (out / 'ckpt.pt').unlink()  # (a hard link: write a new file, not through the link)
        (out / 'ckpt.pt').write_bytes((ref / 'ckpt.pt').read_bytes()[:200_000])
    if 'GARBAGE' in args:
        (out / 'ckpt.pt').unlink()
        (out / 'ckpt.pt').write_bytes(bytes(64) + (ref / 'ckpt.pt').read_bytes()[64:])
    if 'BAD_VOCAB' in args:
        data = bad_vocab_data
    out_arg = out
    if 'OUT_UNDER_FILE' in args:  # (tests run as root, so a chmod'ed dir would still be writable)
        out_arg = out / 'log.jsonl' / 'sub'
    before = snapshot(tmp_path)
    r = run([*common(data), f'--out_dir={out_arg}', *[a for a in args if not a.isupper()]], timeout=60)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and r.stderr.startswith('train.py: error: ') and 'Traceback' not in r.stderr, r.stderr
    assert snapshot(tmp_path) == before  # nothing written, nothing overwritten, byte for byte


def test_dry_run_resume_checks_and_writes_nothing(reference, shakespeare_char_dir, tmp_path):
    """--dry_run with init_from=resume reads and checks the checkpoint against the config, exits 0 and
    leaves the run's folder byte for byte as it was (no config.json rewrite, no log trim, no probe file)."""
    ref, _, _ = reference
    out = tmp_path / 'out'
    shutil.copytree(ref, out)
    with open(out / 'log.jsonl', 'a') as f:  # a torn line a real resume would trim
        f.write('{"type": "tr')
    before = snapshot(tmp_path)
    r = ok(run([*common(shakespeare_char_dir), f'--out_dir={out}', '--init_from=resume', '--max_iters=80',
                '--dry_run'], timeout=60))
    assert 'dry run: every check passed' in r.stdout and "init_from='resume'" in r.stdout
    assert snapshot(tmp_path) == before


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(reference, shakespeare_char_dir, tmp_path):
    """A checkpoint that is valid in every other way but pickles an object whose __reduce__ creates a
    file: torch.load(weights_only=False) would run it (checked first, so the test can fail); train.py
    resuming from it, and checkpoint.load, refuse it with a clear error and the file never appears."""
    ref, _, _ = reference
    out, marker = tmp_path / 'out', tmp_path / 'pwned'
    out.mkdir()
    ck = checkpoint.load(ref / 'ckpt.pt')
    ck['config']['extra'] = Payload(str(marker))
    torch.save(ck, out / 'ckpt.pt')
    del ck
    # the payload is live: unsafe loading (in a child process) creates the marker
    code = f'import torch; torch.load({str(out / "ckpt.pt")!r}, weights_only=False)'
    subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, timeout=60)
    assert marker.read_text() == 'pwned'
    marker.unlink()
    before = (out / 'ckpt.pt').read_bytes()
    r = run([*common(shakespeare_char_dir), f'--out_dir={out}', '--init_from=resume'], timeout=60)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert 'refused, it holds a pickled Python object' in r.stderr and 'could run code' in r.stderr, r.stderr
    with pytest.raises(checkpoint.CheckpointError, match='could run code'):
        checkpoint.load(out / 'ckpt.pt')
    assert not marker.exists()  # the payload never ran
    assert (out / 'ckpt.pt').read_bytes() == before


class Payload:
    """Unpickling this writes 'pwned' to path (builtins.exec, so any Python can unpickle it): what a
    malicious checkpoint from the internet would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))

"""Multi-process runs of the real train.py on CPU (gloo), issue 22: init_from='auto' and elastic restarts
under `torchrun --max-restarts`, SIGTERM to one rank of a DDP run and its printed resume command, and two
torchrun "nodes" on one machine against a single-node launch of the same world size.

Every interrupted run is compared with an uninterrupted one bitwise: its final weights, and the loss of
every iter in log.jsonl. That holds on CPU/gloo because every reduction is deterministic (fp32, the same
world size and so the same ring order; a sum of 2 values does not depend on the order at all), the data
sampler's state is checkpointed and dropout is 0 here: on resume only rank 0's RNG states are restored,
the other ranks' dropout streams are reseeded (checkpoint.restore_run), so with dropout > 0 a resumed DDP
run is a correct continuation but not a bitwise copy of the uninterrupted one.
"""
import json
import signal
import shlex
import socket
import subprocess
import sys

import pytest

from test_reliability import REPO, TINY, assert_same_weights, env, ok, records, run, snapshot, temps

import checkpoint  # noqa: E402  (test_reliability puts the repo on sys.path)

MAX_ITERS = 16
# saves at 4, 8, 12, 16 (always_save_checkpoint): the save points an interrupted run falls back to
COMMON = [*TINY, '--dropout=0.0', f'--max_iters={MAX_ITERS}', '--eval_interval=4', '--always_save_checkpoint=True']

# train.py under a wrapper that (1) sends signals to itself: each event (attempt, rank, iter, signal, in_save)
# fires in launch `attempt` of torchrun (TORCHELASTIC_RESTART_COUNT) on rank `rank`, in the middle of the
# optimizer step of iter `iter`, or with in_save, in the checkpoint save of iter `iter` after its temp file is
# complete and before the rename; (2) records this process's exit code in exit_dir/rank<R>-attempt<N> (a
# SIGKILLed process records nothing).
WRAPPER = """
import os, runpy, sys, types
sys.path.insert(0, {repo!r})
import checkpoint, guard
RANK, ATTEMPT = int(os.environ['RANK']), int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
mine = [(it, sig, in_save) for attempt, rank, it, sig, in_save in {events!r} if (attempt, rank) == (ATTEMPT, RANK)]
step, save = guard.Guard.step, checkpoint.save
def signalled_step(self, it, *a):
    for at, sig, in_save in mine:
        if it == at and not in_save:
            os.kill(os.getpid(), sig)
    return step(self, it, *a)
def signalled_save(obj, path):
    for at, sig, in_save in mine:
        if obj.get('iter_num') == at and in_save:  # the test hook's sleep before the rename becomes the signal
            os.environ['MOEGPT_TEST_SAVE_DELAY'] = '1'
            checkpoint.time = types.SimpleNamespace(sleep=lambda s: os.kill(os.getpid(), sig))
    return save(obj, path)
guard.Guard.step, checkpoint.save = signalled_step, signalled_save
sys.argv = ['train.py', *sys.argv[1:]]
code = 1
try:
    runpy.run_path(os.path.join({repo!r}, 'train.py'), run_name='__main__')
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else int(e.code is not None)
    raise
finally:
    with open(os.path.join({exit_dir!r}, f'rank{{RANK}}-attempt{{ATTEMPT}}'), 'w') as f:
        f.write(str(code))
"""


def wrapper(tmp_path, *events):
    """The wrapper script for these events [(attempt, rank, iter, signal, in_save)], and its exit_dir."""
    exit_dir = tmp_path / 'exits'
    exit_dir.mkdir()
    script = tmp_path / 'signalling_train.py'
    script.write_text(WRAPPER.format(repo=str(REPO), exit_dir=str(exit_dir),
                                     events=[(a, r, it, int(sig), in_save) for a, r, it, sig, in_save in events]))
    return script, exit_dir


def exits(exit_dir):
    return {p.name: int(p.read_text()) for p in sorted(exit_dir.iterdir())}


def torchrun(script, args, nproc=2, launch=('--standalone',), timeout=300):
    cmd = [sys.executable, '-m', 'torch.distributed.run', *launch, f'--nproc_per_node={nproc}', str(script),
           *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env())


def losses(out_dir):
    return [(t['iter'], t['loss']) for t in records(out_dir)]


@pytest.fixture(scope='module')
def ddp_reference(shakespeare_char_dir, tmp_path_factory):
    """The uninterrupted 2-process run the interrupted ones are compared with (saves at 4, 8, 12, 16)."""
    out = tmp_path_factory.mktemp('ddp_reference') / 'out'
    r = ok(torchrun('train.py', [*COMMON, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}']))
    assert r.stdout.count('saving checkpoint to') == 4
    assert [i for i, _ in losses(out)] == list(range(MAX_ITERS))
    return out


# ----------------------------------------------------------------------------- init_from='auto'
@pytest.fixture(scope='module')
def auto_run(shakespeare_char_dir, tmp_path_factory):
    """One process, the same command twice: `--init_from=auto --max_iters=4` on an empty out_dir, then
    with --max_iters=8 (saves every 4 iters). Returns (out_dir, args, the two runs)."""
    out = tmp_path_factory.mktemp('auto') / 'out'
    args = [*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', '--eval_interval=4',
            '--always_save_checkpoint=True', '--init_from=auto']
    return out, args, ok(run([*args, '--max_iters=4'])), ok(run([*args, '--max_iters=8']))


def test_init_from_auto_starts_from_scratch_then_resumes(auto_run, tmp_path):
    """'auto' with no checkpoint starts from scratch; the same command again (longer max_iters) resumes it:
    nothing is moved aside, log.jsonl goes on from the checkpoint, config.json holds the resolved value.
    (That the continuation is exact is the elastic test's, below, and test_train's for init_from=resume.)"""
    out, _, first, second = auto_run
    assert f"init_from='auto': no checkpoint in {out}, starting from scratch" in first.stdout
    assert f"init_from='auto': resuming from {out / 'ckpt.pt'}" in second.stdout
    assert f'resumed from {out / "ckpt.pt"} at iter 4' in second.stdout
    assert 'moved the earlier run' not in first.stdout + second.stdout and not list(out.glob('prev-run-*'))
    assert json.loads((out / 'config.json').read_text())['init_from'] == 'resume'
    assert [i for i, _ in losses(out)] == list(range(8))
    assert checkpoint.load(out / 'ckpt.pt')['iter_num'] == 8


def test_init_from_auto_keeps_the_resume_checks(auto_run, tmp_path):
    """'auto' finding a checkpoint is a resume with all its checks: another model config is exit 2 with
    the differing field named, and nothing is written or moved (dry run or not)."""
    out, args, _, _ = auto_run
    before = snapshot(out)
    for extra in ([], ['--dry_run']):
        r = run([*args, '--max_iters=12', '--n_embd=64', *extra])
        assert r.returncode == 2 and 'n_embd: checkpoint 32, config 64' in r.stderr, r.stderr
        assert r.stderr.startswith('train.py: error: init_from=resume:') and 'Traceback' not in r.stderr
        assert f"init_from='auto': resuming from {out / 'ckpt.pt'}" in r.stdout
        assert snapshot(out) == before


def test_init_from_auto_without_checkpoint_moves_an_earlier_run_aside(shakespeare_char_dir, tmp_path):
    """An out_dir holding an earlier run's files but no checkpoint (killed before its first save): 'auto'
    starts from scratch and, as any fresh run, moves those files to prev-run-1 first (a dry run says so
    and moves nothing)."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"type": "train", "iter": 0, "loss": 4.2}\n')
    (out / 'config.json').write_text('{}')
    before = snapshot(out)
    args = [*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', '--init_from=auto', '--max_iters=2',
            '--eval_interval=2']
    r = ok(run([*args, '--dry_run']))
    assert 'starting from scratch' in r.stdout and 'a real run would move the earlier run' in r.stdout
    assert snapshot(out) == before
    r = ok(run(args))
    assert f'moved the earlier run in out_dir (config.json, log.jsonl) to {out / "prev-run-1"}' in r.stdout
    assert snapshot(out / 'prev-run-1') == before
    assert [i for i, _ in losses(out)] == [0, 1]


# ----------------------------------------------------------------------------- elastic restart
@pytest.mark.slow  # the long job: several multi-process runs
def test_elastic_restart_after_kill_9_finishes_like_an_uninterrupted_run(ddp_reference, shakespeare_char_dir,
                                                                         tmp_path):
    """`torchrun --max-restarts=2 ... --init_from=auto`, 2 processes. Attempt 0: kill -9 of rank 1 in the middle
    of iter 10's step; torchrun stops rank 0 and relaunches the same command, which resumes from the
    iter-8 checkpoint. Attempt 1: kill -9 of rank 0 in the middle of the iter-12 save (temp file complete,
    not renamed): ckpt.pt is still iter 8's; the relaunch removes the stale temp and resumes from iter 8
    again. Attempt 2 finishes: final weights and the loss of every iter equal the uninterrupted run's,
    bitwise."""
    script, exit_dir = wrapper(tmp_path, (0, 1, 10, signal.SIGKILL, False), (1, 0, 12, signal.SIGKILL, True))
    out = tmp_path / 'out'
    args = [*COMMON, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', '--init_from=auto']
    r = ok(torchrun(script, args, launch=('--standalone', '--max-restarts=2')))
    out_text = r.stdout + r.stderr
    assert f"init_from='auto': no checkpoint in {out}, starting from scratch" in r.stdout
    assert r.stdout.count(f'resumed from {out / "ckpt.pt"} at iter 8') == 2, out_text[-4000:]
    [stray_line] = [l for l in r.stdout.splitlines() if l.startswith('removed ')]
    assert 'the temp file of a checkpoint save that was killed' in stray_line and not temps(out)
    assert 'moved the earlier run' not in r.stdout and not list(out.glob('prev-run-*'))
    # who exited how: the killed rank records nothing (rank 1 in attempt 0, rank 0 in attempt 1); its peer
    # fails (its collective lost the other end: an error, or torchrun's SIGTERM/SIGKILL), never exit 0;
    # attempt 2 ends 0 on both ranks
    e = exits(exit_dir)
    assert 'rank1-attempt0' not in e and 'rank0-attempt1' not in e, e
    assert e.get('rank0-attempt0') != 0 and e.get('rank1-attempt1') != 0, e
    assert e['rank0-attempt2'] == 0 and e['rank1-attempt2'] == 0, e
    assert checkpoint.load(out / 'ckpt.pt')['iter_num'] == MAX_ITERS
    assert losses(out) == losses(ddp_reference)  # every iter, bitwise
    assert_same_weights(out / 'ckpt.pt', ddp_reference / 'ckpt.pt')


# ----------------------------------------------------------------------------- DDP preemption
@pytest.mark.slow  # the long job: several multi-process runs
def test_ddp_sigterm_to_rank_1_saves_once_and_the_printed_command_resumes_bitwise(ddp_reference,
                                                                                  shakespeare_char_dir, tmp_path):
    """SIGTERM to rank 1 only, in iter 5's step: both ranks stop after iter 6 (the flag is read one step
    later), exactly one checkpoint (iter 7, not evaluated), exit 0 on every rank; the printed resume
    command, launched with torchrun as the run was, finishes with the uninterrupted run's losses at every
    iter and its final weights, bitwise, and runs every eval once (8's included)."""
    script, exit_dir = wrapper(tmp_path, (0, 1, 5, signal.SIGTERM, False))
    out = tmp_path / 'out'
    r = ok(torchrun(script, [*COMMON, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}']))
    assert exits(exit_dir) == {'rank0-attempt0': 0, 'rank1-attempt0': 0}
    assert 'train.py: SIGTERM received' not in r.stderr  # rank 1 got it: only rank 0 prints
    assert f'a signal to another rank: stopped at iter 7 and saved a checkpoint ({out / "ckpt.pt"})' in r.stdout
    assert r.stdout.count('saving checkpoint to') == 2  # iter 4's (an eval save) and the preemption's
    ck = checkpoint.load(out / 'ckpt.pt')
    assert ck['iter_num'] == 7 and ck['evaluated'] is False
    assert [i for i, _ in losses(out)] == list(range(7))
    resume = shlex.split(r.stdout.split('resume with:\n')[1].splitlines()[0])
    assert '(launched with torchrun, as this run was)' in r.stdout
    assert resume[:2] == ['python', 'train.py'] and resume[-1] == '--init_from=resume'
    r2 = ok(torchrun('train.py', resume[2:]))
    assert f'resumed from {out / "ckpt.pt"} at iter 7' in r2.stdout
    assert losses(out) == losses(ddp_reference)
    assert [e['iter'] for e in records(out, 'eval')] == [0, 4, 8, 12, 16]
    assert_same_weights(out / 'ckpt.pt', ddp_reference / 'ckpt.pt')


# ----------------------------------------------------------------------------- two nodes on one machine
def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the long job: several multi-process runs
def test_two_nodes_on_one_machine_match_one_node_of_4(shakespeare_char_dir, tmp_path):
    """docs/distributed.md's multi-node launch, both "nodes" on this machine: two torchrun launchers with
    --nnodes=2 --node_rank=0/1 --master_addr=127.0.0.1, 2 processes each (gloo). The 4 ranks train exactly
    as a single-node launch of 4 processes: the same loss at every iter and the same final weights, bitwise
    (same world size, same ranks, the same deterministic gloo reductions)."""
    args = [*TINY, '--dropout=0.0', f'--data_dir={shakespeare_char_dir}', '--max_iters=4', '--eval_interval=4',
            '--eval_iters=2', '--always_save_checkpoint=True', '--expert_parallel=2']
    one = tmp_path / 'one_node'
    ok(torchrun('train.py', [*args, f'--out_dir={one}'], nproc=4))
    two = tmp_path / 'two_nodes'
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--nnodes=2', f'--node_rank={n}',
         '--master_addr=127.0.0.1', f'--master_port={port}', 'train.py', *args, f'--out_dir={two}'],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for n in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, f'exit {p.returncode}\n{o[-3000:]}\n{e[-3000:]}'
    assert 'world size 4' in outs[0][0]  # node 0 holds rank 0, which prints
    assert [i for i, _ in losses(two)] == [0, 1, 2, 3]
    assert losses(two) == losses(one)
    assert_same_weights(two / 'ckpt.dcp', one / 'ckpt.dcp')  # EP: sharded (DCP) checkpoints, each rank its shard

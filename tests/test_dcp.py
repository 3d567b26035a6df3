"""Sharded checkpoints (torch.distributed.checkpoint, ckpt_format='dcp') and checksums (issue 22,
docs/reliability.md): real tiny train.py runs under torchrun on gloo, saved in one layout and resumed in
another; corrupted, killed and converted checkpoints.

One EP=4 run on 4 ranks (dropout 0, saves at iters 4 and 8, keep_last=2) is the source of the resharding
matrix: its iter-4 checkpoint resumes at EP=2 x DP=2 (4 ranks), EP=2 (2 ranks), FSDP2 (2 ranks), FSDP2 +
EP=2 (2 ranks) and in one process, and each continues the uninterrupted run's losses (to float rounding:
another layout sums in another order; bitwise where the layout's arithmetic is the same, below).
"""
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
        '--batch_size=4', '--eval_iters=4', '--warmup_iters=0', '--log_interval=1', '--n_experts=4', '--top_k=2',
        '--lr_decay_iters=60', '--max_iters=8', '--eval_interval=4', '--always_save_checkpoint=True', '--keep_last=2']
REL_TOL = 1e-4  # another layout: same math, another summation order (measured: <= 2e-5 after 4 steps)


def env(**extra):
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO), **extra}


def launch(nproc, args, timeout=240, **extra):
    """train.py in one process (nproc=1) or under torchrun with nproc gloo ranks."""
    cmd = [sys.executable, 'train.py'] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'train.py']
    return subprocess.run(cmd + [str(a) for a in args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env(**extra))


def ok(r):
    assert r.returncode == 0, f'exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}'
    return r


def losses(out_dir):
    return {r['iter']: r['loss'] for r in map(json.loads, (Path(out_dir) / 'log.jsonl').read_text().splitlines())
            if r['type'] == 'train'}


def evals(out_dir):
    return [r for r in map(json.loads, (Path(out_dir) / 'log.jsonl').read_text().splitlines()) if r['type'] == 'eval']


def resume_from(run_dir, ckpt, out):
    """A new out_dir holding run_dir's log and its checkpoint ckpt (e.g. 'ckpt-4.dcp') as the newest."""
    out.mkdir()
    shutil.copy(run_dir / 'log.jsonl', out)
    if ckpt.endswith('.dcp'):
        shutil.copytree(run_dir / ckpt, out / ckpt)
        os.symlink(ckpt, out / 'ckpt.dcp')
    else:
        shutil.copy(run_dir / ckpt, out / 'ckpt.pt')
    return out


def flip_byte(path, offset):
    with open(path, 'r+b') as f:  # in place: a hard link (ckpt.pt = ckpt-<iter>.pt) sees it too
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture(scope='module')
def ep4(shakespeare_char_dir, tmp_path_factory):
    """EP=4 on 4 ranks, dropout 0: ckpt_format='auto' is dcp (sharded state)."""
    out = tmp_path_factory.mktemp('ep4') / 'out'
    ok(launch(4, [*TINY, '--dropout=0.0', f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}',
                  '--expert_parallel=4']))
    return out


@pytest.mark.slow  # the long job: several multi-process runs
def test_ep4_run_saves_sharded_dcp_checkpoints(ep4):
    """Every rank wrote its own shard file, nothing was gathered into a ckpt.pt, keep_last=2 kept the two
    newest directories, ckpt.dcp links the newest, every file has its checksum, no temp is left."""
    assert sorted(os.listdir(ep4)) == ['ckpt-4.dcp', 'ckpt-8.dcp', 'ckpt.dcp', 'config.json', 'expert_usage.png',
                                       'log.jsonl']
    assert os.readlink(ep4 / 'ckpt.dcp') == 'ckpt-8.dcp'
    files = sorted(os.listdir(ep4 / 'ckpt-8.dcp'))
    assert files == ['.metadata', '__0_0.distcp', '__1_0.distcp', '__2_0.distcp', '__3_0.distcp', 'checksums.json',
                     'run.pt']
    sums = json.loads((ep4 / 'ckpt-8.dcp' / 'checksums.json').read_text())['crc32']
    assert sorted(sums) == [f for f in files if f != 'checksums.json']
    run = checkpoint.load(str(ep4 / 'ckpt.dcp'), tensors=False)
    assert run['iter_num'] == 8 and run['world_size'] == 4 and len(run['rng_by_rank']) == 4
    # each rank's RNG is its own (torch.manual_seed(seed + rank)): all four kept
    assert len({bytes(r['torch'].numpy()) for r in run['rng_by_rank']}) == 4


LAYOUTS = {  # name: (processes, extra args)
    'ep2xdp2_4ranks': (4, ['--expert_parallel=2']),
    'ep2_2ranks': (2, ['--expert_parallel=2']),
    'fsdp_2ranks': (2, ['--fsdp=True']),
    'fsdp_ep2_2ranks': (2, ['--fsdp=True', '--expert_parallel=2']),
    'one_process': (1, []),
}


@pytest.mark.slow  # the long job: several multi-process runs
@pytest.mark.parametrize('layout', LAYOUTS)
def test_ep4_checkpoint_resumes_in_another_layout(ep4, shakespeare_char_dir, tmp_path, layout):
    """The resharding matrix: EP=4's iter-4 DCP checkpoint resumed at another layout continues the
    uninterrupted EP=4 run: the losses of iters 4-7 (and at 4 ranks the final val CE) agree to float rounding (iter 4:
    the weights; 5-7: AdamW's moments and step too; fresh moments would move every weight by ~lr at once).
    The tolerance is far below what these iters move the loss (asserted), so a wrong restore fails it."""
    nproc, extra = LAYOUTS[layout]
    out = resume_from(ep4, 'ckpt-4.dcp', tmp_path / 'out')
    r = ok(launch(nproc, [*TINY, '--dropout=0.0', f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}',
                          '--init_from=resume', *extra]))
    assert 'resumed from' in r.stdout and 'at iter 4' in r.stdout
    ref, got = losses(ep4), losses(out)
    for it in range(4, 8):
        assert got[it] == pytest.approx(ref[it], rel=REL_TOL), (it, got[it], ref[it])
    assert max(ref[i] for i in range(4, 8)) - min(ref[i] for i in range(4, 8)) > 100 * REL_TOL * ref[4]
    val, ref_val = evals(out), evals(ep4)
    assert val[-1]['iter'] == 8
    if nproc == 4:  # eval draws its batches per rank (seed + rank): same world size, same batches
        assert val[-1]['val_ce'] == pytest.approx(ref_val[-1]['val_ce'], rel=REL_TOL)


@pytest.mark.slow  # the long job: several multi-process runs
def test_dcp_resume_in_one_process_equals_resume_from_the_converted_single_file(ep4, shakespeare_char_dir,
                                                                                 tmp_path):
    """Resharding loses nothing: EP=4's DCP checkpoint resumed in one process and the same checkpoint
    converted to one ckpt.pt (python checkpoint.py --to-single) resumed in one process give bitwise the
    same losses and final weights."""
    a = resume_from(ep4, 'ckpt-4.dcp', tmp_path / 'a')
    b = tmp_path / 'b'
    b.mkdir()
    shutil.copy(ep4 / 'log.jsonl', b)
    conv = subprocess.run([sys.executable, 'checkpoint.py', '--to-single', str(ep4 / 'ckpt-4.dcp'), str(b / 'ckpt.pt')],
                          cwd=REPO, capture_output=True, text=True, env=env(), timeout=120)
    assert conv.returncode == 0 and f'wrote {b / "ckpt.pt"}' in conv.stdout, conv.stderr
    for d in (a, b):
        ok(launch(1, [*TINY, '--dropout=0.0', f'--data_dir={shakespeare_char_dir}', f'--out_dir={d}',
                      '--init_from=resume', '--ckpt_format=single']))
    la, lb = losses(a), losses(b)
    assert [la[i] for i in range(4, 8)] == [lb[i] for i in range(4, 8)]
    ma, mb = checkpoint.load(str(a / 'ckpt.pt'))['model'], checkpoint.load(str(b / 'ckpt.pt'))['model']
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.slow  # the long job: several multi-process runs
def test_conversion_round_trip_keeps_every_tensor(ep4, tmp_path):
    """DCP (EP=4 shards) -> ckpt.pt -> DCP: the model, every AdamW moment and step, the sampler and RNG
    states are equal at each stage; converting onto an existing name is refused (exit 2, one line)."""
    src = str(ep4 / 'ckpt.dcp')
    checkpoint.to_single(src, str(tmp_path / 'ckpt.pt'))
    checkpoint.to_dcp(str(tmp_path / 'ckpt.pt'), str(tmp_path / 'ckpt.dcp'))
    assert os.readlink(tmp_path / 'ckpt.dcp') == 'ckpt-8.dcp'
    a, b, c = (checkpoint.load(p) for p in (src, str(tmp_path / 'ckpt.pt'), str(tmp_path / 'ckpt.dcp')))
    for other in (b, c):
        assert a['model'].keys() == other['model'].keys()
        assert all(torch.equal(a['model'][k], other['model'][k]) for k in a['model'])
        assert a['optimizer']['param_groups'] == other['optimizer']['param_groups']
        sa, so = a['optimizer']['state'], other['optimizer']['state']
        assert sa.keys() == so.keys() and len(sa) == 17  # every parameter of the tiny model
        assert all(torch.equal(sa[i][k], so[i][k]) for i in sa for k in sa[i])
        assert torch.equal(a['sampler_state'], other['sampler_state'])
        assert torch.equal(a['rng']['torch'], other['rng']['torch']) and a['iter_num'] == other['iter_num'] == 8
    r = subprocess.run([sys.executable, 'checkpoint.py', '--to-dcp', str(tmp_path / 'ckpt.pt'),
                        str(tmp_path / 'ckpt.dcp')], cwd=REPO, capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2 and r.stderr.startswith('checkpoint.py: error: ') and 'exists' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope='module')
def ddp(shakespeare_char_dir, tmp_path_factory):
    """DDP on 2 ranks, dropout 0.1, ckpt_format=dcp: uninterrupted 8 iters, and resumed from its iter-4
    checkpoint."""
    base = tmp_path_factory.mktemp('ddp')
    args = [*TINY, '--dropout=0.1', f'--data_dir={shakespeare_char_dir}', '--ckpt_format=dcp']
    ok(launch(2, [*args, f'--out_dir={base / "ref"}']))
    res = resume_from(base / 'ref', 'ckpt-4.dcp', base / 'res')
    ok(launch(2, [*args, f'--out_dir={res}', '--init_from=resume']))
    return base / 'ref', res


def test_ddp_dcp_resume_is_exact(ddp):
    """2-rank DDP, saved with DCP at iter 4 and resumed: the losses of every later iter and the final
    weights and AdamW state equal the uninterrupted run's bitwise (dropout 0.1 on both ranks: each rank's
    own RNG state is restored, not only rank 0's)."""
    ref, res = ddp
    lr, ls = losses(ref), losses(res)
    assert [lr[i] for i in range(4, 8)] == [ls[i] for i in range(4, 8)]
    a, b = checkpoint.load(str(ref / 'ckpt.dcp')), checkpoint.load(str(res / 'ckpt.dcp'))
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    # DDP's replicated state is written once, spread over the ranks by DCP: both wrote a shard
    assert (ref / 'ckpt-8.dcp' / '__0_0.distcp').stat().st_size > 0
    assert (ref / 'ckpt-8.dcp' / '__1_0.distcp').stat().st_size > 0


@pytest.mark.slow  # the long job: several multi-process runs
def test_ddp_single_file_resume_is_exact(shakespeare_char_dir, tmp_path):
    """The single file holds every rank's RNG states too (rng_by_rank, gathered to rank 0 at the save):
    2-rank DDP, dropout 0.1, ckpt_format=single, resumed from iter 4: the later losses and the final weights
    equal the uninterrupted run's bitwise (before, rank 1 reseeded and its dropout took another stream)."""
    args = [*TINY, '--dropout=0.1', f'--data_dir={shakespeare_char_dir}', '--ckpt_format=single']
    ref = tmp_path / 'ref'
    ok(launch(2, [*args, f'--out_dir={ref}']))
    c4 = checkpoint.load(ref / 'ckpt-4.pt')
    assert len(c4['rng_by_rank']) == 2 and not torch.equal(c4['rng_by_rank'][0]['torch'], c4['rng_by_rank'][1]['torch'])
    res = resume_from(ref, 'ckpt-4.pt', tmp_path / 'res')
    ok(launch(2, [*args, f'--out_dir={res}', '--init_from=resume']))
    lr, ls = losses(ref), losses(res)
    assert [lr[i] for i in range(4, 8)] == [ls[i] for i in range(4, 8)]
    a, b = checkpoint.load(ref / 'ckpt.pt'), checkpoint.load(res / 'ckpt.pt')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


@pytest.mark.slow  # the long job: several multi-process runs
@pytest.mark.parametrize('mode', ['sync', 'async'])
def test_kill_9_during_dcp_save_keeps_previous_checkpoint(ep4, shakespeare_char_dir, tmp_path, mode):
    """A DCP save killed (kill -9) after every shard, run.pt and checksums.json are written but before its
    commit never replaces the previous checkpoint: ckpt.dcp still links the iter-4 directory, which
    loads with its checksums verified; the next start removes the temp directory and the run completes.
    async: the same with async_save=True, killed while the run waits at its end for the background commit."""
    out = resume_from(ep4, 'ckpt-4.dcp', tmp_path / 'out')
    args = [*TINY, '--dropout=0.0', f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', '--init_from=resume',
            '--ckpt_format=dcp', f'--async_save={mode == "async"}']
    p = subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env(MOEGPT_TEST_SAVE_DELAY='60'))
    tmp = out / '.ckpt-8.dcp.tmp'
    deadline = time.time() + 120
    while not (tmp / 'checksums.json').exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert (tmp / 'checksums.json').exists(), 'the save never completed its temp directory'
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert os.readlink(out / 'ckpt.dcp') == 'ckpt-4.dcp'
    assert checkpoint.load(str(out / 'ckpt.dcp'), tensors='model')['iter_num'] == 4
    assert tmp.is_dir()
    r = ok(launch(1, args))
    assert f'removed {tmp}' in r.stdout
    assert not tmp.exists() and os.readlink(out / 'ckpt.dcp') == 'ckpt-8.dcp'
    assert sorted(f for f in os.listdir(out) if 'dcp' in f) == ['ckpt-4.dcp', 'ckpt-8.dcp', 'ckpt.dcp']


@pytest.mark.slow  # the long job: several multi-process runs
def test_byte_flipped_in_a_dcp_shard_is_a_clear_error_naming_the_file(ep4, shakespeare_char_dir, tmp_path):
    """One byte flipped inside a tensor's data in a shard file: resuming (and sample.py) exit 2 with one
    line naming that file and the previous kept checkpoint (ckpt-4.dcp) as the way back; nothing is
    written. The unflipped copy resumes (dry run), so it is the flip that is caught."""
    out = tmp_path / 'out'
    shutil.copytree(ep4, out, symlinks=True)
    args = [*TINY, '--dropout=0.0', f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', '--init_from=resume']
    ok(launch(1, [*args, '--dry_run']))
    shard = out / 'ckpt-8.dcp' / '__2_0.distcp'
    meta = checkpoint._SafeReader(str(out / 'ckpt-8.dcp')).read_metadata()
    info = max((i for i in meta.storage_data.values() if str(i.relative_path) == shard.name), key=lambda i: i.length)
    flip_byte(shard, info.offset + info.length // 2)  # the middle of the shard's biggest tensor
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    r = launch(1, args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith('train.py: error: init_from=resume: checksum mismatch') and 'Traceback' not in r.stderr
    assert str(shard) in r.stderr and str(out / 'ckpt-4.dcp') in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
    s = subprocess.run([sys.executable, 'sample.py', f'--out_dir={out}', '--device=cpu', '--max_new_tokens=5',
                        f'--data_dir={shakespeare_char_dir}'], cwd=REPO, capture_output=True, text=True, env=env(),
                       timeout=60)
    assert s.returncode == 2 and str(shard) in s.stderr and 'Traceback' not in s.stderr, s.stderr


@pytest.fixture(scope='module')
def single(shakespeare_char_dir, tmp_path_factory):
    """One process, ckpt_format='auto' (single): ckpt.pt = ckpt-8.pt (a hard link) and ckpt-4.pt."""
    out = tmp_path_factory.mktemp('single') / 'out'
    ok(launch(1, [*TINY, '--dropout=0.0', f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}']))
    return out


def test_byte_flipped_in_a_single_file_tensor_is_a_clear_error(single, shakespeare_char_dir, tmp_path):
    """One byte flipped inside a tensor's data in ckpt.pt (torch.load alone does not notice): resuming
    exits 2 with one line naming the file, the tensor, and ckpt-4.pt as the way back (not ckpt-8.pt: the
    same file); nothing is written. A checkpoint without checksums (older code) still loads."""
    import zipfile
    out = tmp_path / 'out'
    shutil.copytree(single, out)
    ckpt = out / 'ckpt.pt'
    ckpt.unlink()
    os.link(out / 'ckpt-8.pt', ckpt)  # as train.py left it (copytree copied the hard link as a file)
    entry = max((i for i in zipfile.ZipFile(ckpt).infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    with open(ckpt, 'rb') as f:  # a stored (uncompressed) zip entry: its bytes follow the local header
        f.seek(entry.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), 'little') for _ in range(2))
    flip_byte(ckpt, entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2)
    torch.load(ckpt, weights_only=True)  # still loads: only the checksum can tell
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    r = launch(1, [*TINY, '--dropout=0.0', f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}',
                   '--init_from=resume'])
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f'train.py: error: init_from=resume: checksum mismatch in {ckpt} (tensor ')
    assert str(out / 'ckpt-4.pt') in r.stderr and 'ckpt-8.pt' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
    old = checkpoint.load(single / 'ckpt-4.pt')
    del old['checksums']
    checkpoint.save(old, tmp_path / 'old.pt')
    assert checkpoint.load(tmp_path / 'old.pt')['iter_num'] == 4


def test_ckpt_format_bad_value_is_one_line_exit_2(shakespeare_char_dir, tmp_path):
    r = launch(1, [*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={tmp_path / "out"}',
                   '--ckpt_format=zip'])
    assert r.returncode == 2 and r.stderr.strip() == \
        "train.py: error: ckpt_format='zip' must be 'auto', 'single' or 'dcp'"
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------- async_save=True

@pytest.fixture(scope='module')
def ddp_async(shakespeare_char_dir, tmp_path_factory):
    """The ddp fixture's two runs again with async_save=True: uninterrupted, and resumed from its own
    (asynchronously saved) iter-4 checkpoint."""
    base = tmp_path_factory.mktemp('ddp_async')
    args = [*TINY, '--dropout=0.1', f'--data_dir={shakespeare_char_dir}', '--ckpt_format=dcp', '--async_save=True']
    r = ok(launch(2, [*args, f'--out_dir={base / "ref"}']))
    assert 'ckpt.dcp (in the background)' in r.stdout
    res = resume_from(base / 'ref', 'ckpt-4.dcp', base / 'res')
    ok(launch(2, [*args, f'--out_dir={res}', '--init_from=resume']))
    return base / 'ref', res


def same(a, b):
    """a == b, tensors bitwise, through dicts, lists and tuples."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.mark.slow  # the long job: several multi-process runs
def test_async_save_equals_sync_save_and_resumes_bitwise(ddp, ddp_async):
    """2-rank DDP (dropout 0.1), ckpt_format=dcp, async_save=True against the same run saving synchronously
    (the ddp fixture): every checkpoint (iters 4 and 8) holds the same everything bitwise (model, AdamW
    moments and steps, param groups, every rank's torch and numpy RNGs, sampler, scaler, iter, best val CE;
    the config but for async_save itself); the same files, links and no temp left; the async run's own losses are the sync
    run's (training is not disturbed by the writes), and resumed from its async-saved iter-4 checkpoint it
    continues with the sync resume's losses and ends on the same weights and AdamW state, bitwise."""
    (ref, res), (aref, ares) = ddp, ddp_async
    assert sorted(os.listdir(aref)) == sorted(os.listdir(ref))
    assert os.readlink(aref / 'ckpt.dcp') == 'ckpt-8.dcp'
    for it in (4, 8):
        assert sorted(os.listdir(aref / f'ckpt-{it}.dcp')) == sorted(os.listdir(ref / f'ckpt-{it}.dcp'))
        a, s = checkpoint.load(str(aref / f'ckpt-{it}.dcp')), checkpoint.load(str(ref / f'ckpt-{it}.dcp'))
        ca, cs = a.pop('config'), s.pop('config')
        assert ca['async_save'] is True and cs['async_save'] is False
        assert {k: v for k, v in ca.items() if k not in ('async_save', 'out_dir')} == \
               {k: v for k, v in cs.items() if k not in ('async_save', 'out_dir')}
        a.pop('_dir'), s.pop('_dir')
        for rng in (a['rng'], s['rng'], *a['rng_by_rank'], *s['rng_by_rank']):
            rng.pop('python', None)  # train.py never seeds Python's random (nothing uses it): another state every launch
        assert a.keys() == s.keys() and a['iter_num'] == it and len(a['optimizer']['state']) == 17
        assert [k for k in a if not same(a[k], s[k])] == []
    assert losses(aref) == losses(ref)
    assert [losses(ares)[i] for i in range(4, 8)] == [losses(res)[i] for i in range(4, 8)]
    a, s = checkpoint.load(str(ares / 'ckpt.dcp')), checkpoint.load(str(res / 'ckpt.dcp'))
    assert a['iter_num'] == 8 and same(a['model'], s['model']) and same(a['optimizer'], s['optimizer'])


@pytest.mark.slow  # the long job: several multi-process runs
@pytest.mark.parametrize('layout', ['ep', 'fsdp'])
def test_async_save_stages_a_copy_training_may_change(tmp_path, layout):
    """tests/async_save_worker.py (2 ranks, expert_parallel=2 or FSDP2: DTensors to stage): the save is still unwritten when save_run
    returns (DCP's write held back 1 s), every weight, AdamW moment and step and the lr are then changed in
    place, and the committed checkpoint holds the state of when save_run was called, bitwise: the copy was
    staged before save_run returned, and the change reached every tensor (so the check could see it)."""
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'tests/async_save_worker.py', str(tmp_path), layout], cwd=REPO, capture_output=True, text=True,
                       timeout=240, env=env())
    assert p.returncode == 0 and (tmp_path / 'result.json').is_file(), p.stderr[-3000:]
    r = json.loads((tmp_path / 'result.json').read_text())
    assert not r['committed_at_return'] and r['committed'] == 'ckpt-1.dcp'
    assert r['done_s'] - r['returned_s'] >= 1.0  # the write ran after save_run had returned
    assert r['keys'] and r['optim_keys'] and len(r['model_equal']) == 31 and len(r['optim_equal']) == 90
    assert all(r['model_changed'].values())
    assert [k for k, v in r['model_equal'].items() if not v] == []
    assert [k for k, v in r['optim_equal'].items() if not v] == []
    assert r['groups_equal']


@pytest.mark.parametrize('args, fmt', [([], "'auto'"), (['--ckpt_format=single'], "'single'")])
def test_async_save_without_dcp_is_one_line_exit_2(shakespeare_char_dir, tmp_path, args, fmt):
    """async_save=True with a single-file checkpoint (ckpt_format='single', or 'auto' without sharded state):
    exit 2, one line, nothing written; async_save must be a bool."""
    r = launch(1, [*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={tmp_path / "out"}', '--async_save=True',
                   *args])
    assert r.returncode == 2 and r.stderr.strip() == \
        "train.py: error: async_save=True writes sharded checkpoints (ckpt.dcp) in the background: it needs " \
        f"ckpt_format='dcp' (ckpt_format={fmt} saves a single ckpt.pt here)"
    assert not (tmp_path / 'out').exists()
    r = launch(1, [*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={tmp_path / "out"}', '--async_save=2',
                   '--ckpt_format=dcp'])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'async_save' in r.stderr, r.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # the long job: several multi-process runs
def test_async_save_sigterm_to_rank_1_saves_and_resumes_bitwise(ddp, shakespeare_char_dir, tmp_path):
    """The preemption path with async_save=True, 2-rank DDP as the ddp fixture: SIGTERM to rank 1 once iter 1
    is logged; both ranks save (in the background), wait for it, and exit 0 with the checkpoint committed
    at the iter they stopped (not evaluated); the printed resume command, under torchrun, finishes with the
    uninterrupted synchronous run's losses at every iter and its final weights, bitwise."""
    out = tmp_path / 'out'
    args = [*TINY, '--dropout=0.1', f'--data_dir={shakespeare_char_dir}', '--ckpt_format=dcp', '--async_save=True',
            f'--out_dir={out}']
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          'train.py', *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env())
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None and not (
            (out / 'log.jsonl').exists() and '"iter": 1,' in (out / 'log.jsonl').read_text()):
        time.sleep(0.05)
    workers = Path(f'/proc/{p.pid}/task/{p.pid}/children').read_text().split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGTERM)  # torchrun starts rank 0 first
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr[-3000:]
    stopped = checkpoint.load(str(out / 'ckpt.dcp'), tensors=False)
    assert f'stopped at iter {stopped["iter_num"]} and saved a checkpoint ({out / "ckpt.dcp"})' in stdout
    assert stopped['evaluated'] is False and 1 < stopped['iter_num'] < 8
    assert os.readlink(out / 'ckpt.dcp') == f'ckpt-{stopped["iter_num"]}.dcp' and not list(out.glob('.*tmp'))
    resume = shlex.split(stdout.split('resume with:\n')[1].splitlines()[0])
    r = ok(launch(2, resume[2:]))
    assert f'resumed from {out / "ckpt.dcp"} at iter {stopped["iter_num"]}' in r.stdout
    ref = ddp[0]
    assert losses(out) == losses(ref)
    a, b = checkpoint.load(str(out / 'ckpt.dcp')), checkpoint.load(str(ref / 'ckpt.dcp'))
    assert a['iter_num'] == 8 and all(torch.equal(a['model'][k], b['model'][k]) for k in b['model'])

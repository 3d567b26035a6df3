"""
Checkpoint files, shared by train.py and sample.py; save_run / restore_run are train.py's whole-run
state (model, AdamW, GradScaler, RNGs, the data sampler), for any number of processes.

Two formats (train.py's ckpt_format, docs/reliability.md):
  single  out_dir/ckpt.pt: one torch.save file; with EP/FSDP the shards are gathered to rank 0 first.
  dcp     out_dir/ckpt.dcp: torch.distributed.checkpoint, every rank writes its own shard, nothing is
          gathered. ckpt.dcp is a symlink to the directory ckpt-<iter>.dcp (written as a temp directory,
          renamed, then the link swapped: atomic like the single file). Loading reshards: any number of
          processes, any expert_parallel / fsdp layout, or one process (sample.py, export.py, compare.py).
          async_save=True: staged in host memory, then written and committed in the background (AsyncSaver).
  `python checkpoint.py --to-single out/ckpt.dcp out/ckpt.pt` (and `--to-dcp` back) converts.
Both record checksums (crc32) at save: of every tensor in the single file, of every file of a DCP
directory (checksums.json); load verifies them and a mismatch is a CheckpointError naming the file.

Saving is atomic: the checkpoint is written to a temp file in the same directory, fsynced, and
renamed over the target (os.replace is atomic on POSIX), so a crash mid-save leaves the previous
checkpoint intact. Loading uses torch.load(weights_only=True): a checkpoint holds only tensors and
plain Python values (the configs are dicts of ints/floats/strs), so loading one cannot run code.

A run killed mid-save leaves a temp file `.ckpt.pt.<pid>.<hex>.tmp` beside the checkpoint; it is
never read as a checkpoint (only ckpt.pt is), and train.py deletes such leftovers when it starts.
Test-only hook: MOEGPT_TEST_SAVE_DELAY=seconds sleeps after the temp file is complete, before the
rename, so a test can kill -9 the process in the middle of a save (unset: no cost).
"""
import copy
import glob
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
import uuid
import warnings
import zlib

import numpy as np
import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ('format_version', 'model', 'model_args')
TEMP_GLOB = '.*.pt.*.tmp'  # what an interrupted save() or keep_history() leaves behind
DCP_TEMP_GLOB = '.*.dcp*.tmp'  # what an interrupted DCP save leaves behind: a directory (or a link)


class CheckpointError(Exception):
    """Missing, truncated, corrupted or incompatible checkpoint. The message is for the user."""


def save(obj, path):
    """torch.save obj to path atomically (temp file in the same dir + fsync + rename)."""
    d = os.path.dirname(os.path.abspath(path))
    # a unique temp name beside the target (same filesystem, so the rename is atomic); opened with
    # 'xb' rather than mkstemp so the file gets the umask's permissions, like torch.save's
    tmp = os.path.join(d, f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        with open(tmp, 'xb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get('MOEGPT_TEST_SAVE_DELAY'):  # test hook: a window to kill -9 a save in
            time.sleep(float(os.environ['MOEGPT_TEST_SAVE_DELAY']))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)  # make the rename itself durable


def keep_history(path, iter_num, keep_last):
    """keep_last > 1: also keep the checkpoint just saved at path as <name>-<iter>.pt and delete all
    but the keep_last highest-iter ones. A hard link: no extra disk, and safe because no one writes a
    checkpoint in place (save() always renames a new file over the name). keep_last=1: nothing to do,
    and ckpt-*.pt files of earlier runs are left alone."""
    if keep_last <= 1:
        return
    d, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(d, f'.{stem}-{iter_num}{ext}.{os.getpid()}.tmp')
    try:
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, os.path.join(d, f'{stem}-{iter_num}{ext}'))
    pattern = re.compile(re.escape(stem) + r'-(\d+)' + re.escape(ext))
    kept = sorted((int(m.group(1)), f) for f in os.listdir(d) if (m := pattern.fullmatch(f)))
    for _, f in kept[:-keep_last]:
        os.remove(os.path.join(d, f))


# What a run leaves in its out_dir (train.py, metrics.py); a fresh run moves all of it aside, never a part
RUN_FILES = re.compile(r'ckpt(-\d+)?\.(pt|dcp)|config\.json|log\.jsonl(\.prev|\.tmp)?|expert_usage\.png')


def previous_run(out_dir):
    """The files of an earlier run in out_dir, sorted ([] if none or no such folder); a move aside that was
    interrupted (MOVING) counts too, so the next fresh run finishes it."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir) if RUN_FILES.fullmatch(f) or MOVING.fullmatch(f))


MOVING = re.compile(r'\.prev-run-(\d+)\.moving')  # a move aside in progress: renamed to prev-run-N when whole


def move_previous_run(out_dir):
    """A fresh run in an out_dir that holds an earlier one: move every file of that run (checkpoints,
    ckpt-<iter>.pt included, log, config, heatmap) into out_dir/prev-run-<N>, the first N free, so
    the two never mix (a ckpt-<iter>.pt of one run beside the ckpt.pt of another). The files go into
    .prev-run-N.moving first, renamed to prev-run-N when all are in: a crash half-way leaves that folder,
    and the next fresh run moves the rest into it rather than splitting the run over two folders.
    Returns prev-run-N, or None when there was nothing to move."""
    files = previous_run(out_dir)
    if not files:
        return None
    moving = [m for f in files if (m := MOVING.fullmatch(f))]
    n = int(moving[0].group(1)) if moving else 1
    while not moving and (os.path.exists(os.path.join(out_dir, f'prev-run-{n}')) or
                          os.path.exists(os.path.join(out_dir, f'.prev-run-{n}.moving'))):
        n += 1
    staging, dest = os.path.join(out_dir, f'.prev-run-{n}.moving'), os.path.join(out_dir, f'prev-run-{n}')
    os.makedirs(staging, exist_ok=True)
    for f in files:
        if RUN_FILES.fullmatch(f):
            os.replace(os.path.join(out_dir, f), os.path.join(staging, f))
    os.replace(staging, dest)
    return dest


def remove_stale_temps(out_dir):
    """Delete what saves killed before their rename left behind (temp files, DCP temp directories);
    returns their paths. Never the directory ckpt.dcp points to (see _commit_dcp)."""
    live = os.path.realpath(os.path.join(out_dir, 'ckpt.dcp'))
    found = glob.glob(os.path.join(out_dir, TEMP_GLOB)) + glob.glob(os.path.join(out_dir, DCP_TEMP_GLOB))
    stale = sorted(f for f in found if os.path.islink(f) or os.path.realpath(f) != live)
    for f in stale:
        shutil.rmtree(f) if os.path.isdir(f) and not os.path.islink(f) else os.remove(f)
    return stale


# ----------------------------------------------------------------------------- checksums

def _crc(t):
    """crc32 of a tensor's bytes (on the CPU; any dtype)."""
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_checksums(obj, prefix=''):
    """{path: crc32} of every tensor in a nested dict / list / tuple; a path joins the keys with '/'."""
    if torch.is_tensor(obj):
        return {prefix: _crc(obj)}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(tensor_checksums(v, f'{prefix}/{k}' if prefix else str(k)))
    return out


def file_crc(path):
    crc = 0
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _way_back(path):
    """Advice for a corrupted checkpoint: the newest kept checkpoint (keep_last) that is another one."""
    d, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    real = os.path.realpath(path)
    pattern = re.compile(re.escape(stem) + r'-(\d+)' + re.escape(ext))
    kept = sorted((int(m.group(1)), f) for f in os.listdir(d) if (m := pattern.fullmatch(f))
                  and not os.path.samefile(os.path.join(d, f), real))
    if not kept:
        return 'no earlier checkpoint was kept (keep_last=N keeps the N newest)'
    prev = os.path.join(d, kept[-1][1])
    how = f'ln -sfn {kept[-1][1]} {path}' if ext == '.dcp' else f'cp {prev} {path}'
    return f'the previous kept checkpoint is {prev} (iter {kept[-1][0]}): `{how}` resumes from it'


def _corrupt(path, detail='', ckpt_path=None):
    return CheckpointError(f'checksum mismatch in {path}{detail}: the checkpoint is corrupted; '
                           + _way_back(ckpt_path or path))


def _verify_tensors(ckpt, path):
    if 'checksums' not in ckpt:  # written before checksums existed: nothing to compare with
        return
    got = tensor_checksums({k: v for k, v in ckpt.items() if k != 'checksums'})
    bad = [k for k in sorted(set(got) | set(ckpt['checksums'])) if got.get(k) != ckpt['checksums'].get(k)]
    if bad:
        raise _corrupt(path, f' (tensor {bad[0]})')


# ----------------------------------------------------------------------------- load

def load(path, map_location='cpu', tensors=True):
    """Load and sanity-check a checkpoint dict (ckpt.pt, or a ckpt.dcp directory: see load_dcp); any
    failure, a checksum mismatch included, becomes a CheckpointError. An outstanding async save is
    committed first."""
    wait_for_saves()
    path = os.fspath(path)
    if path.endswith('.dcp') or os.path.isdir(path):
        return load_dcp(path, tensors, map_location)
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint at {path}')
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f'{path} is not a moe-gpt checkpoint (expected a dict with {REQUIRED_KEYS})')
    if ckpt['format_version'] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version={ckpt['format_version']!r}; "
                              f'this code reads format_version={FORMAT_VERSION}')
    _verify_tensors(ckpt, path)
    return ckpt


def _torch_load(path, map_location='cpu'):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        found = re.search(r'GLOBAL (\S+)', str(e))
        if isinstance(e, pickle.UnpicklingError) and found:  # weights_only refused to import a global:
            # the file pickles arbitrary Python objects, and unpickling those could run code
            raise CheckpointError(f'cannot read checkpoint {path}: refused, it holds a pickled Python object '
                                  f'({found.group(1)}) that is not a tensor or a plain value, and loading it '
                                  f'could run code (torch.load weights_only=True); load only checkpoints '
                                  f'train.py wrote') from None
        # the first line that says what is wrong (not weights_only's advice to turn itself off)
        lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.startswith(
            ('Weights only load failed', 'Please file an issue', 'Check the documentation'))]
        first = (lines or [''])[0][:200]
        raise CheckpointError(f'cannot read checkpoint {path} (truncated or corrupted?): '
                              f'{type(e).__name__}: {first}') from None


def latest(out_dir):
    """The checkpoint a resume reads: ckpt.pt or ckpt.dcp, whichever was saved last (a run can switch
    ckpt_format); ckpt.pt when there is neither (for the message)."""
    found = [(os.path.getmtime(p), p) for p in (os.path.join(out_dir, 'ckpt.pt'), _dcp_run_file(out_dir))
             if p and os.path.isfile(p)]
    if not found:
        return os.path.join(out_dir, 'ckpt.pt')
    newest = max(found)[1]
    return newest if newest.endswith('ckpt.pt') else os.path.join(out_dir, 'ckpt.dcp')


def _dcp_run_file(out_dir):
    try:
        return os.path.join(resolve_dcp(os.path.join(out_dir, 'ckpt.dcp')), 'run.pt')
    except CheckpointError:
        return None


def path_for(out_dir, ckpt_format, sharded):
    """Where train.py saves: 'auto' is dcp when the state is sharded (EP, FSDP: nothing is gathered),
    else single."""
    dcp = ckpt_format == 'dcp' or (ckpt_format == 'auto' and sharded)
    return os.path.join(out_dir, 'ckpt.dcp' if dcp else 'ckpt.pt')


def strip_compile_prefix(state_dict):
    """torch.compile wraps the model as _orig_mod; store plain names so anyone can load them."""
    prefix = '_orig_mod.'
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def rng_state():
    """All global RNG states, as weights_only-loadable values (tensors, ints, tuples, lists)."""
    np_state = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- train.py's save / resume

def save_run(path, model, optimizer, state, keep_last=1, sharded=False, master=True, async_save=False):
    """train.py's save. Every rank calls it. path ckpt.dcp: save_dcp_run, every rank writes its shard.
    ckpt.pt: with sharded state (EP, FSDP) the full model and optimizer are gathered (a collective);
    rank 0 writes path atomically: the model, the optimizer and `state` (iter_num, configs, scaler, RNGs,
    ...) with the checksums of every tensor, then keeps the keep_last newest. async_save (DCP only): written
    in the background (AsyncSaver)."""
    if os.fspath(path).endswith('.dcp'):
        return save_dcp_run(path, model, optimizer, state, keep_last, async_save)
    if sharded:
        import parallel
        model_sd, optim_sd = parallel.full_state_dict(model), parallel.full_optim_state_dict(model, optimizer)
    elif master:
        model_sd, optim_sd = strip_compile_prefix(model.state_dict()), optimizer.state_dict()
    rngs = _gather(state['rng'])  # every rank's RNGs (a collective): each rank resumes its own dropout stream
    if master:
        obj = {'format_version': FORMAT_VERSION, 'model': model_sd, 'optimizer': optim_sd, **state, 'rng_by_rank': rngs}
        save(dict(obj, checksums=tensor_checksums(obj)), path)
        keep_history(path, state['iter_num'], keep_last)


def load_model(model, ckpt):
    """Resume's first step, on the full model before it is sharded; a DCP checkpoint's weights are read
    by restore_run instead, straight into this rank's shards."""
    if 'model' in ckpt:
        model.load_state_dict(strip_compile_prefix(ckpt['model']))


def restore_run(ckpt, model, optimizer, scaler, data_gen, sharded=False, reseed=None):
    """train.py's resume, after the model's weights are loaded and sharded and its optimizer built:
    AdamW (the checkpoint holds the full state, whatever number of processes saved it), the GradScaler,
    the data sampler, and the RNGs. Both formats hold every rank's RNGs: each rank restores its own when
    the world size is the one that saved; else (or from a file older than rng_by_rank) rank 0's, and
    reseed (the other ranks) seeds fresh dropout streams."""
    wait_for_saves()
    rank, world = _rank_world()
    if ckpt.get('ckpt_format') == 'dcp':
        import parallel
        parallel.dcp_load(model, optimizer, ckpt['_dir'], ckpt['optim_groups'], _SafeReader(ckpt['_dir']))
    elif sharded:
        import parallel
        parallel.load_full_optim_state_dict(model, optimizer, ckpt['optimizer'])
    else:
        optimizer.load_state_dict(ckpt['optimizer'])
    if scaler.is_enabled() and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    data_gen.set_state(ckpt['sampler_state'])
    if len(ckpt.get('rng_by_rank', ())) == world:
        reseed, ckpt['rng'] = None, ckpt['rng_by_rank'][rank]
    if reseed is None:
        set_rng_state(ckpt['rng'])
    else:
        torch.manual_seed(reseed)


# ----------------------------------------------------------------------------- DCP: sharded checkpoints
# A DCP checkpoint directory holds: DCP's .metadata and __<rank>_<n>.distcp shard files (the tensors,
# keys 'model.<name>' and 'optim.<param name>.<exp_avg|exp_avg_sq|step>', single-process names and
# global shapes: parallel.dcp_state_dict), run.pt (everything else: iter_num, configs, scaler, sampler,
# every rank's RNGs, AdamW's param groups; weights_only-loadable) and checksums.json (crc32 of each file).

def _rank_world():
    import torch.distributed as dist
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


def _barrier(group=None):
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group)


def _gather(obj, group=None):
    """All ranks' obj (tensors and plain values) on rank 0 (a list), None elsewhere; [obj] in one
    process. Sent as torch.save bytes, read back with weights_only (gather_object chokes on tensors).
    group: a process group of all ranks (None: the default one)."""
    import io
    import torch.distributed as dist
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    out = [None] * world if rank == 0 else None
    dist.gather_object(buf.getvalue(), out, dst=0, group=group)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out] if rank == 0 else None


def _fsync_dir(d):
    """fsync a directory, so that a rename in it is durable."""
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the data itself is already synced


class _SafeReader:
    """A torch.distributed.checkpoint.FileSystemReader whose .metadata (a pickle) is read by a restricted
    unpickler: DCP's own reader uses pickle.load, which could run code; here only DCP's metadata
    classes, dtypes and plain values load."""

    def __new__(cls, path):
        from torch.distributed.checkpoint import FileSystemReader

        class SafeReader(FileSystemReader):
            def read_metadata(self, *args, **kwargs):
                return _safe_metadata(os.path.join(path, '.metadata'), self)
        return SafeReader(path)


class _MetadataUnpickler(pickle.Unpickler):
    """pickle, restricted to what DCP's metadata is made of (Python's "restricting globals" recipe)."""

    def find_class(self, module, name):
        ok = (module.startswith('torch.distributed.checkpoint.') and isinstance(getattr(
            sys.modules.get(module), name, None), type)) or (module, name) == ('collections', 'OrderedDict') or (
            module == 'torch' and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))) or (
            module, name) in (('torch', 'Size'), ('torch.serialization', '_get_layout'), ('pathlib', 'PosixPath'))
        if not ok:
            raise pickle.UnpicklingError(f'refused to import {module}.{name}')
        return super().find_class(module, name)


def _safe_metadata(path, reader):
    import torch.distributed.checkpoint.filesystem  # noqa: F401 (the classes find_class allows)
    import torch.distributed.checkpoint.metadata as md
    try:
        with open(path, 'rb') as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:
        raise CheckpointError(f'cannot read checkpoint {path} (DCP metadata): {type(e).__name__}: '
                              f'{str(e).splitlines()[0][:200] if str(e) else ""}') from None
    if getattr(metadata, 'storage_meta', None) is None:
        metadata.storage_meta = md.StorageMeta()
    metadata.storage_meta.load_id = reader.load_id
    return metadata


def save_dcp_run(path, model, optimizer, state, keep_last=1, async_save=False):
    """Every rank writes its own shards of the model and AdamW with torch.distributed.checkpoint into
    a temp directory (nothing is gathered but each rank's RNG state and checksums, a few KB); rank 0
    then writes run.pt and checksums.json and commits it (_finish_dcp). Collective. async_save: the state
    is copied to host memory here, written and committed in the background (AsyncSaver); either way the
    previous async save is complete first."""
    import torch.distributed.checkpoint as dcp
    import parallel
    async_saver.wait()
    rank, world = _rank_world()
    tmp = _dcp_temp(path, state['iter_num'])
    rngs = _gather(state['rng'])
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed at this same iter
        os.makedirs(tmp)
    _barrier()
    sd, groups = parallel.dcp_state_dict(model, optimizer)
    run = {'format_version': FORMAT_VERSION, 'ckpt_format': 'dcp', **state, 'rng_by_rank': rngs,
           'optim_groups': groups, 'world_size': len(rngs)} if rank == 0 else None
    writer = dcp.FileSystemWriter(tmp, sync_files=True, thread_count=1)
    if async_save:
        run = copy.deepcopy(run)  # as of now: training goes on changing what it was made of
        return async_saver.save(sd, writer, lambda group: _finish_dcp(tmp, path, run, keep_last, group))
    with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"
        warnings.filterwarnings('ignore', 'torch.distributed is disabled')
        dcp.save(sd, storage_writer=writer, no_dist=world == 1)
    _finish_dcp(tmp, path, run, keep_last)


def _finish_dcp(tmp, path, run, keep_last, group=None):
    """After this rank's dcp.save returned (its files written and fsynced): its files' checksums go to rank
    0, which so has every rank's only once every rank's write is complete; then it writes run.pt and
    checksums.json and commits (_commit_dcp). The closing barrier: no rank goes on (or exits) before the
    commit. group: the process group (AsyncSaver's own, in its thread; None: the default)."""
    rank = _rank_world()[0]
    mine = {f: file_crc(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.startswith(f'__{rank}_')}
    sums = _gather(mine, group)
    if rank == 0:
        _write_dcp_extras(tmp, run, sums)
        _commit_dcp(tmp, path, run['iter_num'], keep_last)
    _barrier(group)


class AsyncSaver:
    """async_save=True (docs/distributed.md): a DCP save that runs while training goes on; one per process
    (async_saver). save() is collective: dcp.async_save stages this rank's state dict, a copy in host memory
    (FileSystemWriter is a BlockingAsyncStager: the copy is made before async_save returns, so training may
    then change the weights), and writes the copy in DCP's thread; a thread of ours waits for that write
    and then runs finish (_finish_dcp: the checksums gathered, which is every rank's write complete, then
    the commit). Their collectives run on a gloo group of their own, so they never interleave with
    training's. wait(): the outstanding save is written and committed, or its error raised; the next save,
    every load, guard.stop_run and the end of train.py call it (an exception that ends the run: the
    interpreter joins the thread before it exits)."""

    def __init__(self):
        self.job, self.group = None, None

    def save(self, sd, writer, finish):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from concurrent.futures import ThreadPoolExecutor
        self.wait()
        world = _rank_world()[1]
        if world > 1 and self.group is None:  # collective: every rank's first async save creates it
            self.group = dist.new_group(backend='gloo')
        if world == 1:  # DCP's thread warns "assuming the intent is to save in a single process": it is
            warnings.filterwarnings('ignore', 'torch.distributed is disabled')  # (process-wide: from that thread)
        written = dcp.async_save(sd, storage_writer=writer, process_group=self.group, no_dist=world == 1)
        pool = ThreadPoolExecutor(1, thread_name_prefix='moegpt-async-save')
        self.job = pool.submit(lambda: (written.result(), finish(self.group)))
        pool.shutdown(wait=False)  # the thread ends with the job

    def wait(self):
        job, self.job = self.job, None
        if job is not None:
            job.result()


async_saver = AsyncSaver()


def wait_for_saves():
    """The outstanding async save (async_save=True) is written and committed; its error is raised here."""
    async_saver.wait()


def _dcp_temp(path, iter_num):
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f'.{os.path.splitext(name)[0]}-{iter_num}.dcp.tmp')


def _write_dcp_extras(tmp, run, sums):
    """run.pt, then checksums.json of every file in tmp (the shards', gathered, and the rest's), last."""
    save(run, os.path.join(tmp, 'run.pt'))
    crcs = {k: v for s in sums for k, v in s.items()}
    for f in os.listdir(tmp):
        if f not in crcs:
            crcs[f] = file_crc(os.path.join(tmp, f))
    with open(os.path.join(tmp, 'checksums.json'), 'w') as f:
        json.dump({'crc32': dict(sorted(crcs.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _commit_dcp(tmp, path, iter_num, keep_last=None):
    """Make the complete temp directory tmp the checkpoint at path: rename it to <stem>-<iter>.dcp, then
    point the symlink path at it (os.replace of a link is atomic): at every moment path is the previous
    checkpoint or the new one, never a partial one. keep_last: the newest directories kept (None: all)."""
    d, name = os.path.split(os.path.abspath(path))
    stem = os.path.splitext(name)[0]
    final = os.path.join(d, f'{stem}-{iter_num}.dcp')
    if os.environ.get('MOEGPT_TEST_SAVE_DELAY'):  # test hook: a window to kill -9 a save in
        time.sleep(float(os.environ['MOEGPT_TEST_SAVE_DELAY']))
    if os.path.isdir(path) and not os.path.islink(path):  # a plain directory (copied by hand): keep it aside
        os.replace(path, os.path.join(d, f'{stem}-{iter_num}.dcp.replaced'))
    old = None
    if os.path.lexists(final):  # a second save at this iter (a preemption save, then that iter's eval)
        if os.path.realpath(path) == os.path.realpath(final):
            _link(path, os.path.basename(tmp))  # the link moves to the new checkpoint before the old one goes
        old = os.path.join(d, f'.{stem}-{iter_num}.dcp.old.tmp')
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)  # a link to tmp now dangles until the next line: resolve_dcp reads final then
    _link(path, os.path.basename(final))
    _fsync_dir(d)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last:
        pattern = re.compile(re.escape(stem) + r'-(\d+)\.dcp')
        kept = sorted((int(m.group(1)), f) for f in os.listdir(d) if (m := pattern.fullmatch(f)))
        for _, f in kept[:-keep_last]:
            shutil.rmtree(os.path.join(d, f))


def _link(path, target):
    d, name = os.path.split(path)
    tmp_link = os.path.join(d, f'.{name}.{os.getpid()}.link.tmp')
    os.symlink(target, tmp_link)
    os.replace(tmp_link, path)


def resolve_dcp(path):
    """The directory a ckpt.dcp path names (the link's target, or itself), or a CheckpointError."""
    if os.path.islink(path) and not os.path.exists(path):  # killed between _commit_dcp's two renames
        m = re.fullmatch(r'\.(.+-\d+\.dcp)\.tmp', os.path.basename(os.readlink(path)))
        if m and os.path.isdir(os.path.join(os.path.dirname(path), m.group(1))):
            return os.path.join(os.path.dirname(path), m.group(1))
    if not os.path.isdir(path):
        raise CheckpointError(f'no checkpoint at {path}')
    return os.path.realpath(path)


def verify_dcp(path, d, part=None):
    """Compare the files of DCP directory d with checksums.json: part=(rank, world) checks every
    world-th file from the rank-th (the ranks share the reading), None all of them."""
    try:
        with open(os.path.join(d, 'checksums.json')) as f:
            crcs = json.load(f)['crc32']
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f'cannot read checkpoint {path}: {d}/checksums.json is missing or corrupted '
                              f'({type(e).__name__}); ' + _way_back(path)) from None
    names = sorted(crcs)
    for f in names if part is None else names[part[0]::part[1]]:
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            raise CheckpointError(f'checkpoint {path} is incomplete: {p} is missing; ' + _way_back(path))
        if file_crc(p) != crcs[f]:
            raise _corrupt(p, '', path)


def load_dcp(path, tensors=True, map_location='cpu'):
    """A DCP checkpoint as the single file's dict. Its checksums are verified (under torchrun each rank
    verifies its share of the files: RANK / WORLD_SIZE; in one process all of them), run.pt read.
    tensors=False: that alone (train.py: restore_run reads the shards into this rank's layout), 'model':
    plus the full model (sample.py, export.py), True: plus the full AdamW state (conversion)."""
    d = resolve_dcp(path)
    full = bool(tensors)
    verify_dcp(path, d, None if full else (int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))))
    run = _torch_load(os.path.join(d, 'run.pt'), map_location)
    if not isinstance(run, dict) or run.get('ckpt_format') != 'dcp' or 'model_args' not in run:
        raise CheckpointError(f'{path} is not a moe-gpt DCP checkpoint (no run state in run.pt)')
    if run['format_version'] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version={run['format_version']!r}; "
                              f'this code reads format_version={FORMAT_VERSION}')
    run['_dir'], run['rng'] = d, run['rng_by_rank'][0]
    if tensors:
        flat = read_dcp_full(d, 'model.' if tensors == 'model' else '')
        run['model'] = {k[6:]: v.to(map_location) for k, v in flat.items() if k.startswith('model.')}
        if tensors != 'model':
            run['optimizer'] = _full_optim(flat, run['optim_groups'])
    return run


def read_dcp_full(d, prefix=''):
    """Every tensor of DCP directory d whose key starts with prefix, whole (one process, any layout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = _SafeReader(d)
    meta = reader.read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings('ignore', 'torch.distributed is disabled')
            dcp.load(sd, storage_reader=reader, no_dist=True)
    except Exception as e:
        raise CheckpointError(f'cannot read checkpoint {d}: {type(e).__name__}: {str(e)[:300]}') from None
    return sd


def _full_optim(flat, groups):
    """The single-process optimizer.state_dict() from a DCP checkpoint's 'optim.<name>.<key>' tensors and
    its param groups [(settings, [param names])] (parallel.full_optim_state_dict's layout)."""
    names = [n for _, ns in groups for n in ns]
    state = {}
    for i, n in enumerate(names):
        st = {k[len(n) + 7:]: v for k, v in flat.items() if k.startswith(f'optim.{n}.') and '.' not in k[len(n) + 7:]}
        if st:
            state[i] = st
    param_groups, start = [], 0
    for settings, ns in groups:
        param_groups.append(dict(settings, params=list(range(start, start + len(ns)))))
        start += len(ns)
    return {'state': state, 'param_groups': param_groups}


# ----------------------------------------------------------------------------- conversion

def to_single(src, dst):
    """A DCP checkpoint (any layout) -> one ckpt.pt file, in one process."""
    ckpt = load(src, tensors=True)
    for k in ('_dir', 'ckpt_format', 'optim_groups', 'world_size'):
        ckpt.pop(k, None)
    save(dict(ckpt, checksums=tensor_checksums(ckpt)), dst)


def to_dcp(src, dst):
    """One ckpt.pt file -> a DCP checkpoint at dst (<stem>-<iter>.dcp plus the link dst), in one process:
    the names of the optimizer's parameters come from the model the checkpoint describes (built on the
    meta device, nothing allocated) and optim.configure_optimizers, as a resume would build them."""
    import torch.distributed.checkpoint as dcp
    import optim
    import parallel
    from model import MoEGPT, MoEGPTConfig
    ckpt = load(src)
    if os.path.lexists(dst):
        raise CheckpointError(f'{dst} exists: convert to a new name, or move it away first')
    with torch.device('meta'):
        model = MoEGPT(MoEGPTConfig(**ckpt['model_args']))
    c = ckpt['config']
    opt = optim.configure_optimizers(model, c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']), 'meta')
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for _, ps in parallel._canonical_groups(model, opt) for p in ps]
    osd = ckpt['optimizer']
    sd = {f'model.{k}': v for k, v in strip_compile_prefix(ckpt['model']).items()}
    for i, st in osd['state'].items():
        sd.update({f'optim.{order[int(i)]}.{k}': v if torch.is_tensor(v) else torch.tensor(v) for k, v in st.items()})
    groups = [({k: v for k, v in g.items() if k != 'params'}, [order[i] for i in g['params']])
              for g in osd['param_groups']]
    tmp = _dcp_temp(dst, ckpt['iter_num'])
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'torch.distributed is disabled')
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True, thread_count=1), no_dist=True)
    state = {k: v for k, v in ckpt.items() if k not in ('model', 'optimizer', 'checksums', 'rng', 'rng_by_rank')}
    rngs = ckpt.get('rng_by_rank', [ckpt['rng']])
    _write_dcp_extras(tmp, dict(state, ckpt_format='dcp', rng_by_rank=rngs, optim_groups=groups,
                                world_size=1), [])
    _commit_dcp(tmp, dst, ckpt['iter_num'])


if __name__ == '__main__':
    import argparse
    ap = argparse.ArgumentParser(prog='checkpoint.py', description='Convert a checkpoint between the two '
                                 'formats (docs/reliability.md): DCP directory <-> single file.')
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument('--to-single', nargs=2, metavar=('SRC_DCP', 'DST_PT'), help='e.g. out/ckpt.dcp out/ckpt.pt')
    mode.add_argument('--to-dcp', nargs=2, metavar=('SRC_PT', 'DST_DCP'), help='e.g. out/ckpt.pt out/ckpt.dcp')
    a = ap.parse_args()
    try:
        (to_single(*a.to_single) if a.to_single else to_dcp(*a.to_dcp))
    except CheckpointError as e:
        print(f'checkpoint.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'wrote {(a.to_single or a.to_dcp)[1]}')

"""
Checkpoint files, shared by train.py and sample.py; save_run / restore_run are train.py's whole-run
state (model, AdamW, GradScaler, RNGs, the data sampler), for any number of processes.

Saving is atomic: the checkpoint is written to a temp file in the same directory, fsynced, and
renamed over the target (os.replace is atomic on POSIX), so a crash mid-save leaves the previous
checkpoint intact. Loading uses torch.load(weights_only=True): a checkpoint holds only tensors and
plain Python values (the configs are dicts of ints/floats/strs), so loading one cannot run code.

A run killed mid-save leaves a temp file `.ckpt.pt.<pid>.<hex>.tmp` beside the checkpoint; it is
never read as a checkpoint (only ckpt.pt is), and train.py deletes such leftovers when it starts.
Test-only hook: MOEGPT_TEST_SAVE_DELAY=seconds sleeps after the temp file is complete, before the
rename, so a test can kill -9 the process in the middle of a save (unset: no cost).
"""
import glob
import os
import pickle
import random
import re
import shutil
import time
import uuid

import numpy as np
import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ('format_version', 'model', 'model_args')
TEMP_GLOB = '.*.pt.*.tmp'  # what an interrupted save() or keep_history() leaves behind


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
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the data itself is already synced


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
RUN_FILES = re.compile(r'ckpt(-\d+)?\.pt|config\.json|log\.jsonl(\.prev|\.tmp)?|expert_usage\.png')


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
    """Delete the temp files of saves that were killed before their rename; returns their paths."""
    stale = sorted(glob.glob(os.path.join(out_dir, TEMP_GLOB)))
    for f in stale:
        os.remove(f)
    return stale


def load(path, map_location='cpu'):
    """Load and sanity-check a checkpoint dict; any failure becomes a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f'{path} is not a moe-gpt checkpoint (expected a dict with {REQUIRED_KEYS})')
    if ckpt['format_version'] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version={ckpt['format_version']!r}; "
                              f'this code reads format_version={FORMAT_VERSION}')
    return ckpt


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


def save_run(path, model, optimizer, state, keep_last=1, sharded=False, master=True):
    """train.py's save. Every rank calls it: with sharded state (EP, FSDP) the full model and optimizer
    are gathered (a collective). Rank 0 writes path atomically: the model, the optimizer and `state`
    (iter_num, configs, scaler, RNGs, ...), then keeps the keep_last newest."""
    if sharded:
        import parallel
        model_sd, optim_sd = parallel.full_state_dict(model), parallel.full_optim_state_dict(model, optimizer)
    elif master:
        model_sd, optim_sd = strip_compile_prefix(model.state_dict()), optimizer.state_dict()
    if master:
        save({'format_version': FORMAT_VERSION, 'model': model_sd, 'optimizer': optim_sd, **state}, path)
        keep_history(path, state['iter_num'], keep_last)


def restore_run(ckpt, model, optimizer, scaler, data_gen, sharded=False, reseed=None):
    """train.py's resume, after the model's weights are loaded and sharded and its optimizer built:
    AdamW (the checkpoint holds the full state, whatever number of processes saved it), the GradScaler,
    the data sampler, and the RNGs. Only rank 0's RNGs are saved: reseed (the other ranks) seeds fresh
    dropout streams instead."""
    if sharded:
        import parallel
        parallel.load_full_optim_state_dict(model, optimizer, ckpt['optimizer'])
    else:
        optimizer.load_state_dict(ckpt['optimizer'])
    if scaler.is_enabled() and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    data_gen.set_state(ckpt['sampler_state'])
    if reseed is None:
        set_rng_state(ckpt['rng'])
    else:
        torch.manual_seed(reseed)

"""
Checkpoint files, shared by train.py and sample.py.

Saving is atomic: the checkpoint is written to a temp file in the same directory, fsynced, and
renamed over the target (os.replace is atomic on POSIX), so a crash mid-save leaves the previous
checkpoint intact. Loading uses torch.load(weights_only=True): a checkpoint holds only tensors and
plain Python values (the configs are dicts of ints/floats/strs), so loading one cannot run code.
"""
import os
import random
import uuid

import numpy as np
import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ('format_version', 'model', 'model_args')


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


def load(path, map_location='cpu'):
    """Load and sanity-check a checkpoint dict; any failure becomes a CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [''])[0][:200]
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

"""
train.py's config checks, in the order train.py calls them: every key, the batch split over the
processes, the device (hardware.py), the data, the model config, a resume's checkpoint, out_dir.
Bad input is one clear line (`train.py: error: ...`), exit code 2, no traceback, and nothing written:
every check runs before train.py builds, writes or starts anything.
"""
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile

import numpy as np

import checkpoint
import hardware
from model import MoEGPT, MoEGPTConfig
from optim import OPTIMIZERS
from prepare import DataError, load_meta, prepare_command


# torch.compile's modes (compile_mode); the two with CUDA graphs need static shapes (docs/performance.md)
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def die(msg):
    """Bad input: one clear message, exit code 2, no traceback, nothing written."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(f'train.py: error: {msg}', file=sys.stderr)
    sys.exit(2)


def check(ok, msg):
    if not ok:
        die(msg)


def check_keys(c):
    """Each key's own range or choices (c: the config dict). The model's fields are MoEGPTConfig's to check,
    but for the rules by type, here over every key: a value that passed them could still crash a consumer
    after out_dir is written to (numpy's seed, a capacity of inf)."""
    for k, v in c.items():  # no key gives inf or nan a meaning (1e400 reads as inf): every float is finite
        check(type(v) is not float or math.isfinite(v), f'{k}={v} must be a finite number')
        check(type(v) is not int or abs(v) < 2 ** 63, f'{k}={v} is out of range (a 64-bit integer)')  # torch's ints
    check(0 <= c['seed'] < 2 ** 31, f"seed={c['seed']} must be in [0, 2**31) (numpy takes 32-bit seeds, "
                                    f"and each process adds its rank)")
    check(c['out_dir'] != '', "out_dir='' must name a folder (e.g. --out_dir=out)")
    check(not c['wandb_log'] or importlib.util.find_spec('wandb'),
          'wandb_log=True needs wandb: pip install wandb (or leave wandb_log=False)')
    check(c['init_from'] in ('scratch', 'resume', 'auto') or c['init_from'].startswith(('gpt2', 'hf:')),
          f"init_from={c['init_from']!r} must be 'scratch', 'resume', 'auto', a GPT-2 name ('gpt2', 'gpt2-medium', "
          f"...), 'gpt2:PATH' or 'hf:NAME_OR_PATH'")
    check(c['upcycle_noise'] >= 0, f"upcycle_noise={c['upcycle_noise']} must be >= 0")
    check(c['dtype'] in ('auto', 'float32', 'bfloat16', 'float16'),
          f"dtype={c['dtype']!r} must be 'auto', 'float32', 'bfloat16' or 'float16'")
    check(c['compile'] in (True, False, 'auto'), f"compile={c['compile']!r} must be True, False or 'auto'")
    check(c['compile_mode'] in COMPILE_MODES,
          f"compile_mode={c['compile_mode']!r} must be one of {', '.join(map(repr, COMPILE_MODES))}")
    check(c['sync_debug'] in (True, False), f"sync_debug={c['sync_debug']!r} must be True or False")
    check(c['backend'] in ('auto', 'nccl', 'gloo'), f"backend={c['backend']!r} must be 'auto', 'nccl' or 'gloo'")
    check(c['device'] in ('auto', 'cpu', 'cuda', 'mps') or re.fullmatch(r'cuda:\d+', c['device']),
          f"device={c['device']!r} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    for k in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters'):
        check(c[k] >= 1, f'{k}={c[k]} must be >= 1')
    for k in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip',
              'mfu_peak_flops'):
        check(c[k] >= 0, f'{k}={c[k]} must be >= 0')
    check(0 <= c['beta1'] < 1 and 0 <= c['beta2'] < 1, f"beta1={c['beta1']}, beta2={c['beta2']} must be in [0, 1)")
    check(not c['decay_lr'] or c['lr_decay_iters'] > c['warmup_iters'],
          f"lr_decay_iters={c['lr_decay_iters']} must be > warmup_iters={c['warmup_iters']} (or set decay_lr=False)")
    check(0 <= c['dead_expert_threshold'] <= 1,
          f"dead_expert_threshold={c['dead_expert_threshold']} must be in [0, 1]")
    check(c['keep_last'] >= 1, f"keep_last={c['keep_last']} must be >= 1")
    check(c['ckpt_format'] in ('auto', 'single', 'dcp'),
          f"ckpt_format={c['ckpt_format']!r} must be 'auto', 'single' or 'dcp'")
    check(c['async_save'] in (True, False), f"async_save={c['async_save']!r} must be True or False")
    check(c['max_bad_steps'] >= 1, f"max_bad_steps={c['max_bad_steps']} must be >= 1")
    check(c['optimizer'] in OPTIMIZERS, f"optimizer={c['optimizer']!r} must be one of {OPTIMIZERS}"
                                        + ('' if 'muon' in OPTIMIZERS else " (this torch has no torch.optim.Muon)"))
    if c['optimizer'] == 'muon':
        check(c['muon_lr'] >= 0, f"muon_lr={c['muon_lr']} must be >= 0 (0 = learning_rate)")
        check(0 <= c['muon_momentum'] < 1, f"muon_momentum={c['muon_momentum']} must be in [0, 1)")
        check(c['learning_rate'] > 0 or c['muon_lr'] == 0,
              f"muon_lr={c['muon_lr']} with learning_rate=0: the schedule scales Muon's lr by muon_lr / learning_rate")
    else:  # a Muon setting that would silently do nothing
        for k, default in (('muon_lr', 0.0), ('muon_momentum', 0.95)):
            check(c[k] == default, f"{k}={c[k]} is Muon's: it needs optimizer='muon' (optimizer={c['optimizer']!r})")
    check(all(type(i) is int for i in c['debug_nan_at_iters']),
          f"debug_nan_at_iters={c['debug_nan_at_iters']!r} must be a list of iteration numbers (ints)")


def split_rows(ga, bs, world):
    """nanoGPT's meaning whatever the world size: an iteration is ga x bs rows in all; each process takes
    an equal share, in ceil(ga / world) equal micro-steps. (micro-steps, rows each), or None: no even split."""
    rows, steps = ga * bs, -(-ga // world)
    return None if rows % world or rows // world % steps else (steps, rows // world // steps)


def split_batch(ga, bs, world):
    """(micro-steps, rows each) of one process, or a clear error naming the nearest values that split."""
    if not split_rows(ga, bs, world):
        near = lambda works, x: ' or '.join(str(v) for v in sorted(  # the nearest values that split evenly
            filter(works, range(1, 4 * (x + world * ga))), key=lambda v: abs(v - x))[:2])
        die(f'gradient_accumulation_steps={ga} x batch_size={bs} = {ga * bs} rows per iteration do not split evenly '
            f'over {world} processes (each runs ceil({ga}/{world}) = {-(-ga // world)} micro-steps of '
            f'equal size); values that work: batch_size={near(lambda b: split_rows(ga, b, world), bs)} '
            f'(gradient_accumulation_steps={ga}), or gradient_accumulation_steps='
            f'{near(lambda g: split_rows(g, bs, world), ga)} (batch_size={bs})')
    return split_rows(ga, bs, world)


def check_parallel(c, ddp, world_size):
    check(c['expert_parallel'] >= 1 and world_size % c['expert_parallel'] == 0,
          f"expert_parallel={c['expert_parallel']} must be >= 1 and divide the number of processes ({world_size})")
    check(c['expert_parallel'] == 1 or (c['n_experts'] > 1 and c['n_experts'] % c['expert_parallel'] == 0),
          f"expert_parallel={c['expert_parallel']} must divide n_experts={c['n_experts']}")
    check(c['fsdp'] in (True, False), f"fsdp={c['fsdp']!r} must be True or False")
    check(not c['fsdp'] or ddp, 'fsdp=True needs several processes: launch with torchrun')
    check(not (c['fsdp'] and c['optimizer'] == 'muon'),  # a DTensor shard is not a matrix to orthogonalise
          "optimizer='muon' runs single-process, under DDP and with expert_parallel, not with fsdp=True "
          "(docs/training.md); use optimizer='adamw' with fsdp")
    where = checkpoint.path_for('', c['ckpt_format'], c['expert_parallel'] > 1 or c['fsdp'])
    check(not c['async_save'] or where.endswith('.dcp'),
          f"async_save=True writes sharded checkpoints (ckpt.dcp) in the background: it needs ckpt_format='dcp' "
          f"(ckpt_format={c['ckpt_format']!r} saves a single {where} here)")


def resolve_system(c, local_rank, sharded):
    """device, dtype, compile, backend: 'auto' follows the device. A dry run may check a device this
    machine lacks (a GPU job, from a laptop): resolved as that device with native bf16, nothing touches
    it. Returns (device, device_type, device_here, dtype, compile, backend)."""
    try:
        device, device_type, dtype, here = hardware.resolve_device(c['device'], c['dtype'], local_rank,
                                                                   absent_ok=c['dry_run'])
    except hardware.DeviceError as e:
        die(e)
    check(dtype != 'float16' or device_type == 'cuda',
          f"dtype='float16' trains with a CUDA GradScaler; on {device_type} use 'bfloat16' or 'float32'")
    compile = c['compile']
    if compile == 'auto':
        compile = device_type == 'cuda' and not sharded  # untested with EP's all-to-all and FSDP hooks
    check(compile or c['compile_mode'] == 'default',
          f"compile_mode={c['compile_mode']!r} is torch.compile's: it needs compile=True (compile is off here)")
    check(not (c['expert_parallel'] > 1 and dtype == 'float16'),
          "expert_parallel with dtype='float16': each rank's GradScaler would see only its own experts' "
          "overflows and skip steps on its own; use 'bfloat16' or 'float32'")
    backend = c['backend']
    if backend == 'auto':
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
    check(backend != 'nccl' or device_type == 'cuda', "backend='nccl' needs CUDA; use backend='gloo' on CPU")
    return device, device_type, here, dtype, compile, backend


def load_data(data_dir, dataset, block_size):
    """Only the files matter (train.bin, val.bin, meta.json), not how prepare.py made them. Returns
    (data_path, meta, numpy dtype of the tokens, {split: tokens})."""
    data_path = os.path.join(data_dir, dataset)
    check(os.path.isfile(os.path.join(data_path, 'meta.json')),
          f"dataset '{dataset}' is not prepared ({os.path.join(data_path, 'meta.json')} not found); prepare it "
          f'with:\n    {prepare_command(dataset, data_dir)}')
    try:  # prepare.load_meta checks the .bin sizes against meta.json
        meta = load_meta(data_dir, dataset)
        int(meta['vocab_size'])
        data_dtype = np.dtype(meta['dtype'])
        n_tokens = {'train': int(meta['train_tokens']), 'val': int(meta['val_tokens'])}
        assert data_dtype in (np.uint16, np.uint32), f"dtype {meta['dtype']!r} is not uint16/uint32"
    except DataError as e:
        die(f"dataset '{dataset}': {e}")
    except Exception as e:  # a meta.json that parses but lacks a field or holds a wrong value
        die(f"dataset '{dataset}': {os.path.join(data_path, 'meta.json')} is unreadable ({type(e).__name__}: {e}); "
            f're-create it with:\n    {prepare_command(dataset, data_dir)} --force')
    for split in ('train', 'val'):
        check(n_tokens[split] > block_size,
              f"block_size={block_size} is too long for the {split} split of '{dataset}' ({n_tokens[split]} "
              f'tokens; a window needs block_size+1)')
    return data_path, meta, data_dtype, n_tokens


def model_config(c, meta_vocab_size):
    """The MoEGPTConfig of the config's model keys; MoEGPTConfig validates its own fields (top_k <=
    n_experts, n_embd % n_head, ...). vocab_size None = the dataset's, padded to a multiple of 64 when
    large (GPU matmuls like them: 50257 -> 50304); small char vocabs stay as they are."""
    c = dict(c)
    if c['vocab_size'] is None:
        c['vocab_size'] = meta_vocab_size if meta_vocab_size <= 256 else -(-meta_vocab_size // 64) * 64
    check(c['vocab_size'] >= meta_vocab_size,
          f"vocab_size={c['vocab_size']} is smaller than the dataset's ({meta_vocab_size})")
    try:
        gptconf = MoEGPTConfig(**{k: c[k] for k in MoEGPTConfig.field_names()})
    except (ValueError, TypeError) as e:
        die(e)
    check_fits(gptconf, c['device'], int(os.environ.get('WORLD_SIZE', 1)))
    return gptconf


STATE_BYTES_PER_PARAM = 12  # at least: fp32 weights, their gradients, one optimizer moment (AdamW keeps two)


def count_params(gptconf):
    """The model's parameter count, from one block of each kind built on the meta device (nothing is
    allocated, and n_layer=10**9 costs no more than 1)."""
    import torch
    from model import Block
    E, L, first, every = gptconf.n_experts, gptconf.n_layer, gptconf.moe_first_dense, gptconf.moe_every
    n_moe = 0 if E == 1 or L <= first else -(-(L - first) // every)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device('meta'):
        one = MoEGPT(dataclasses.replace(gptconf, n_layer=1, moe_first_dense=0, moe_every=1))
        outside_blocks = count(one) - count(one.transformer.h[0])
        moe = count(Block(gptconf, True)) if n_moe else 0
        dense = count(Block(gptconf, False)) if L > n_moe else 0
    return outside_blocks + n_moe * moe + (L - n_moe) * dense


def check_fits(gptconf, device, world_size):
    """Sizes that are valid integers but absurd (n_layer=10**9): refused before anything is built, when
    even the training state split evenly over every process is more than this device's memory."""
    import torch
    if device.startswith('cuda'):
        try:
            memory, where = torch.cuda.get_device_properties(torch.device(device)).total_memory, 'GPU memory'
        except Exception:  # noqa: BLE001  no such GPU here (a dry run elsewhere): nothing to measure against
            return
    else:  # the CPU, and MPS (unified memory)
        memory, where = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'RAM'
    n = count_params(gptconf)
    need = STATE_BYTES_PER_PARAM * n / world_size
    check(need <= memory, f'the model has {n:,} parameters: training them needs at least {need / 2**30:,.0f} GiB per '
                          f'process ({STATE_BYTES_PER_PARAM} bytes each over {world_size} process'
                          f'{"es" * (world_size > 1)}), more than the {memory / 2**30:,.0f} GiB of {where} here; '
                          f'make n_layer, n_embd, n_experts or vocab_size smaller')


def latest_checkpoint(out_dir):
    """The checkpoint a resume in out_dir reads, or None if out_dir holds none. The one place that says
    what counts as a checkpoint (init_from='auto' asks it): out_dir/ckpt.pt or the sharded out_dir/ckpt.dcp,
    the one saved last (checkpoint.latest). One that exists but does not load still counts: resuming it
    fails clearly (exit 2) rather than silently starting over."""
    path = checkpoint.latest(out_dir)
    return path if os.path.lexists(path) else None


def resolve_init_from(init_from, out_dir):
    """init_from='auto' (elastic restarts: `torchrun --max-restarts=N ... --init_from=auto` relaunches the same
    command): 'resume' when out_dir holds a checkpoint, else 'scratch' (and a scratch start moves an earlier
    run's files aside, as ever). Every rank decides for itself from the same files: out_dir must be on a
    filesystem all ranks share, as it must for init_from='resume'. Any other value is returned as it is."""
    if init_from != 'auto':
        return init_from
    found = latest_checkpoint(out_dir)
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"init_from='auto': resuming from {found}" if found else
              f"init_from='auto': no checkpoint in {out_dir}, starting from scratch")
    return 'resume' if found else 'scratch'


def load_resume(ckpt_path, model_args, tunable, meta_vocab_size, dataset, optimizer='adamw'):
    """init_from=resume: the checkpoint must load and match the model config (but for the `tunable`
    fields), the data and the optimizer (its state is another optimizer's). Returns it."""
    try:
        ckpt = checkpoint.load(ckpt_path, tensors=False)  # DCP: the run state (restore_run reads the shards)
    except checkpoint.CheckpointError as e:
        die(f'init_from=resume: {e}')
    try:  # a checkpoint from before a model field existed has that field's default
        ckpt_args = dataclasses.asdict(MoEGPTConfig(**ckpt['model_args']))
    except (TypeError, ValueError) as e:
        die(f'init_from=resume: {ckpt_path} was written by another version of model.py: {e}')
    diff = [f'{k}: checkpoint {ckpt_args.get(k)!r}, config {v!r}' for k, v in model_args.items()
            if k not in tunable and ckpt_args.get(k) != v]
    check(not diff, f'init_from=resume: {ckpt_path} was trained with a different model config; pass the '
                    f'same settings (e.g. --key=value) to resume:\n    ' + '\n    '.join(diff))
    saved = ckpt.get('config', {}).get('optimizer', 'adamw')  # (checkpoints from before the key: AdamW)
    check(saved == optimizer, f"init_from=resume: {ckpt_path} was trained with optimizer={saved!r}, not {optimizer!r}; "
                              f"its optimizer state only resumes the same (pass --optimizer={saved})")
    check(ckpt.get('meta_vocab_size') in (None, meta_vocab_size),
          f"init_from=resume: {ckpt_path} was trained on a vocabulary of {ckpt.get('meta_vocab_size')} but "
          f"'{dataset}' has {meta_vocab_size}")
    return ckpt


def check_out_dir(out_dir, dry_run, master):
    """out_dir must be writable: checked by writing a probe file (a dry run writes nothing: then the
    nearest existing folder on its path must be a writable folder)."""
    if dry_run:
        d = os.path.abspath(out_dir)
        while not os.path.exists(d):
            d = os.path.dirname(d)
        check(os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK), f'out_dir={out_dir!r} is not writable ({d})')
    elif master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as e:
            die(f'out_dir={out_dir!r} is not writable ({e.strerror or e})')


def cudagraph_step_marker(compile, compile_mode):
    """What train.py calls before each forward: with CUDA graphs (compile_mode 'reduce-overhead' or
    'max-autotune'), torch.compiler.cudagraph_mark_step_begin, which tells cudagraph trees that the last
    call's outputs are consumed (gradient accumulation runs the graph several times a step); else nothing."""
    import torch
    if compile and compile_mode in ('reduce-overhead', 'max-autotune'):
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None


def cpu_hint(gptconf, tokens_per_iter, max_iters, threads):
    """One line for a GPU-sized model about to train on the CPU (`python train.py` on a laptop), or None.
    The rule: the iteration is estimated (hardware.CPU_FLOPS_PER_THREAD) to take over CPU_HINT_SECONDS."""
    import torch
    with torch.device('meta'):  # parameter counts only: nothing is allocated
        flops = MoEGPT(gptconf).flops_per_token() * tokens_per_iter
    secs = flops / (hardware.CPU_FLOPS_PER_THREAD * threads)
    if secs < hardware.CPU_HINT_SECONDS:
        return None
    total = secs * max_iters
    took = f'{total / 86400:.1f} days' if total >= 86400 else f'{total / 3600:.1f} hours' if total >= 3600 \
        else f'{math.ceil(total / 60)} minutes'
    return (f'note: this model is GPU-sized and the device is the CPU: an iteration is estimated at ~{secs:.0f} s '
            f'on {threads} thread{"s" * (threads > 1)} ({flops / 1e12:.1f} TFLOP), {max_iters} iterations ~{took}; '
            f'for a CPU run use config/moe_8e_cpu.py (minutes)')

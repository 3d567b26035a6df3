"""
Train MoEGPT, nanoGPT style: a flat script, read top to bottom.

Single process (GPU, or CPU with a smaller model):
$ python train.py config/moe_8e.py
$ python train.py config/moe_8e_cpu.py
DDP on 4 GPUs of one node:
$ torchrun --standalone --nproc_per_node=4 train.py config/moe_8e.py
DDP on 2 CPU processes (gloo):
$ torchrun --standalone --nproc_per_node=2 train.py config/moe_8e_cpu.py
DDP on 2 nodes of 8 GPUs (run on node 0, then on node 1 with --node_rank=1):
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=IP --master_port=1234 train.py config/moe_owt.py
Expert parallelism (experts split over 8 GPUs, the rest data-parallel) and/or FSDP2 (docs/distributed.md):
$ torchrun --standalone --nproc_per_node=8 train.py config/moe_owt.py --expert_parallel=8
$ torchrun --standalone --nproc_per_node=8 train.py config/moe_owt.py --fsdp=True

Config: the defaults below, then config files and --key=value overrides in the order given
(python train.py --help lists every key; --flag alone means --flag=True). Everything is checked before
any work starts; --dry_run stops right there (world size and batch split, data, model config) and exits 0:
$ torchrun --standalone --nproc_per_node=2 train.py config/moe_owt.py --dry_run
"""
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import textwrap
import time
from contextlib import nullcontext

import numpy as np
import torch

import checkpoint
import configurator
import hardware
from metrics import MoEMetrics, RunLog, trim_log
from model import TUNABLE, MoEGPT, MoEGPTConfig
from prepare import DataError, load_meta, prepare_command

_before = set(globals())
# -----------------------------------------------------------------------------
# default config values: exactly config/moe_8e.py (shakespeare_char, baby GPT with 8 experts, top-2)
# I/O
out_dir = 'out-moe-8e'
eval_interval = 250
log_interval = 10
eval_iters = 200  # batches per split (per process) for each eval
eval_only = False  # evaluate once and exit
always_save_checkpoint = False  # if False, save only when val CE improves
keep_last = 1  # checkpoints kept: ckpt.pt, plus (if > 1) ckpt-<iter>.pt for the keep_last newest saves
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt), GPT-2: 'gpt2', 'gpt2-medium', ... (HF hub) or
# 'gpt2:PATH' (a save_pretrained dir), or 'hf:NAME_OR_PATH': Mixtral, OLMoE, Qwen2/3-MoE, Llama, Qwen2/3 (hf.py);
# a dense checkpoint with n_experts > 1 is sparsely upcycled
upcycle_noise = 0.0  # upcycling: Gaussian noise (x weight std) on each expert's copy
# wandb logging
wandb_log = False
wandb_project = 'moe-gpt'
wandb_run_name = ''  # '' = the name of out_dir
# data
dataset = 'shakespeare_char'
data_dir = 'data'  # prepared data lives in data_dir/dataset/{train.bin,val.bin,meta.json}
gradient_accumulation_steps = 1  # as in nanoGPT, an iteration is gradient_accumulation_steps x batch_size
batch_size = 64  # rows in all, whatever the world size: split evenly over the processes (split_rows)
# model (every MoEGPTConfig field is a config key; the ones not set here keep the model's defaults)
block_size = 256
vocab_size = None  # None = the dataset's (meta.json), padded to a multiple of 64 when large
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
bias = False
n_experts = 8
top_k = 2
# AdamW
learning_rate = 1e-3
max_iters = 5000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip the global grad norm to this; 0 = off
# learning rate schedule: linear warmup, then cosine down to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 100
lr_decay_iters = 5000
min_lr = 1e-4
# system
backend = 'auto'  # DDP backend: 'auto' = nccl on CUDA, gloo on CPU
device = 'auto'  # 'auto' = cuda, else mps, else cpu; or 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto' = bfloat16 on a GPU that has it natively, else float16 (GradScaler); float32 elsewhere
compile = 'auto'  # torch.compile; 'auto' = on for CUDA only (off with expert_parallel > 1 or fsdp)
seed = 1337
expert_parallel = 1  # split each MoE layer's experts over this many ranks (parallel.py); divides world size
fsdp = False  # FSDP2 (fully_shard per block): shard parameters, gradients and AdamW state over all ranks
mfu_peak_flops = 0.0  # 0 = the GPU's datasheet peak (hardware.py); no MFU where none is known (CPU)
dry_run = False  # check everything (device, world size, batch split, data, checkpoint), print the config, exit 0
# MoE logging
dead_expert_threshold = 0.1  # an expert is dead when its load over a log interval < this x uniform
# reliability (docs/reliability.md)
max_bad_steps = 10  # a step with a non-finite loss or grad norm is skipped; this many in a row stop the run
debug_nan_at_iters = []  # test hook: the loss is poisoned with NaN at these iters (e.g. [3, 4])
# -----------------------------------------------------------------------------
for _f in dataclasses.fields(MoEGPTConfig):  # new model fields become config keys automatically
    if _f.name not in globals():
        globals()[_f.name] = _f.default
config_keys = [k for k in globals() if k not in _before and not k.startswith('_')]
key_types = configurator.field_types(MoEGPTConfig)  # Literal fields: their choices are checked
key_types.update(vocab_size=(int, type(None)), compile=(bool, str), debug_nan_at_iters=(list, tuple))
# tunable on resume; every other model field must match the checkpoint's
RESUME_TUNABLE = TUNABLE  # model.py says which fields a checkpoint fixes


def die(msg):
    """Bad input: one clear message, exit code 2, no traceback, nothing written."""
    if int(os.environ.get('RANK', 0)) == 0:
        print(f'train.py: error: {msg}', file=sys.stderr)
    sys.exit(2)


def check(ok, msg):
    if not ok:
        die(msg)


sys.stdout.reconfigure(line_buffering=True)  # log lines show up at once under nohup / tee / slurm
if any(a in ('-h', '--help') for a in sys.argv[1:]):
    print(configurator.usage({k: globals()[k] for k in config_keys}))
    sys.exit(0)
try:
    _config, _overridden = configurator.load({k: globals()[k] for k in config_keys}, sys.argv[1:], key_types)
except configurator.ConfigError as e:
    die(e)
globals().update(_config)

# ----------------------------------------------------------------------------- validate (before any work)
check(init_from in ('scratch', 'resume') or init_from.startswith('gpt2') or init_from.startswith('hf:'),
      f"init_from={init_from!r} must be 'scratch', 'resume', a GPT-2 name ('gpt2', 'gpt2-medium', ...), "
      f"'gpt2:PATH' or 'hf:NAME_OR_PATH'")
check(upcycle_noise >= 0, f'upcycle_noise={upcycle_noise} must be >= 0')
check(dtype in ('auto', 'float32', 'bfloat16', 'float16'),
      f"dtype={dtype!r} must be 'auto', 'float32', 'bfloat16' or 'float16'")
check(compile in (True, False, 'auto'), f"compile={compile!r} must be True, False or 'auto'")
check(backend in ('auto', 'nccl', 'gloo'), f"backend={backend!r} must be 'auto', 'nccl' or 'gloo'")
check(device in ('auto', 'cpu', 'cuda', 'mps') or re.fullmatch(r'cuda:\d+', device),
      f"device={device!r} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
for _k in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'eval_iters'):
    check(globals()[_k] >= 1, f'{_k}={globals()[_k]} must be >= 1')
for _k in ('max_iters', 'warmup_iters', 'lr_decay_iters', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip',
           'mfu_peak_flops'):
    check(globals()[_k] >= 0, f'{_k}={globals()[_k]} must be >= 0')
check(0 <= beta1 < 1 and 0 <= beta2 < 1, f'beta1={beta1}, beta2={beta2} must be in [0, 1)')
check(not decay_lr or lr_decay_iters > warmup_iters,
      f'lr_decay_iters={lr_decay_iters} must be > warmup_iters={warmup_iters} (or set decay_lr=False)')
check(0 <= dead_expert_threshold <= 1, f'dead_expert_threshold={dead_expert_threshold} must be in [0, 1]')
check(keep_last >= 1, f'keep_last={keep_last} must be >= 1')
check(max_bad_steps >= 1, f'max_bad_steps={max_bad_steps} must be >= 1')
check(all(type(i) is int for i in debug_nan_at_iters),
      f'debug_nan_at_iters={debug_nan_at_iters!r} must be a list of iteration numbers (ints)')
debug_nan_at_iters = list(debug_nan_at_iters)  # plain list in config.json and the checkpoint
nan_iters = set(debug_nan_at_iters)

# DDP: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; the process group is created after validation
ddp = int(os.environ.get('RANK', -1)) != -1
rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
world_size = int(os.environ.get('WORLD_SIZE', 1))
master_process = rank == 0


def split_rows(ga, bs, world):
    """nanoGPT's meaning whatever the world size: an iteration is ga x bs rows in all; each process takes
    an equal share, in ceil(ga / world) equal micro-steps. (micro-steps, rows each), or None: no even split."""
    rows, steps = ga * bs, -(-ga // world)
    return None if rows % world or rows // world % steps else (steps, rows // world // steps)


_ga, _bs = gradient_accumulation_steps, batch_size
if not split_rows(_ga, _bs, world_size):
    _near = lambda works, x: ' or '.join(str(v) for v in sorted(  # the nearest values that split evenly
        filter(works, range(1, 4 * (x + world_size * _ga))), key=lambda v: abs(v - x))[:2])
    die(f'gradient_accumulation_steps={_ga} x batch_size={_bs} = {_ga * _bs} rows per iteration do not split evenly '
        f'over {world_size} processes (each runs ceil({_ga}/{world_size}) = {-(-_ga // world_size)} micro-steps of '
        f'equal size); values that work: batch_size={_near(lambda b: split_rows(_ga, b, world_size), _bs)} '
        f'(gradient_accumulation_steps={_ga}), or gradient_accumulation_steps='
        f'{_near(lambda g: split_rows(g, _bs, world_size), _ga)} (batch_size={_bs})')
ga_local, micro_rows = split_rows(_ga, _bs, world_size)
rows_per_rank = ga_local * micro_rows
check(expert_parallel >= 1 and world_size % expert_parallel == 0,
      f'expert_parallel={expert_parallel} must be >= 1 and divide the number of processes ({world_size})')
check(expert_parallel == 1 or (n_experts > 1 and n_experts % expert_parallel == 0),
      f'expert_parallel={expert_parallel} must divide n_experts={n_experts}')
check(fsdp in (True, False), f'fsdp={fsdp!r} must be True or False')
check(not fsdp or ddp, 'fsdp=True needs several processes: launch with torchrun')
sharded = expert_parallel > 1 or fsdp  # state is split over ranks: gather on save, shard on load

# device, dtype, compile, backend: 'auto' follows the device. A dry run may check a device this machine
# lacks (a GPU job, from a laptop): resolved as that device with native bf16, nothing touches it.
_has_mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'mps' if _has_mps else 'cpu'
device_type = 'cuda' if device.startswith('cuda') else device
device_here = {'cuda': torch.cuda.is_available(), 'mps': _has_mps, 'cpu': True}[device_type]
check(device_here or dry_run, f"device={device!r} but {'CUDA' if device_type == 'cuda' else 'MPS'} is not available")
if ddp and device_type == 'cuda':
    device = f'cuda:{local_rank}'
if dtype == 'auto':
    dtype = 'bfloat16' if device_type == 'cuda' and not device_here else hardware.auto_dtype(device_type)
check(dtype != 'bfloat16' or device_type != 'cuda' or not device_here or hardware.bf16_supported(),
      "dtype='bfloat16' is not supported natively by this GPU (emulated bf16 is slow and is not compiled); "
      "use 'float16' (or 'auto')")
check(dtype != 'float16' or device_type == 'cuda',
      f"dtype='float16' trains with a CUDA GradScaler; on {device_type} use 'bfloat16' or 'float32'")
if compile == 'auto':
    compile = device_type == 'cuda' and not sharded  # untested with EP's all-to-all and FSDP hooks
check(not (expert_parallel > 1 and dtype == 'float16'),
      "expert_parallel with dtype='float16': each rank's GradScaler would see only its own experts' "
      "overflows and skip steps on its own; use 'bfloat16' or 'float32'")
if backend == 'auto':
    backend = 'nccl' if device_type == 'cuda' else 'gloo'
check(backend != 'nccl' or device_type == 'cuda', "backend='nccl' needs CUDA; use backend='gloo' on CPU")

# data: only the files matter (train.bin, val.bin, meta.json), not how prepare.py made them
data_path = os.path.join(data_dir, dataset)
check(os.path.isfile(os.path.join(data_path, 'meta.json')),
      f"dataset '{dataset}' is not prepared ({os.path.join(data_path, 'meta.json')} not found); prepare it "
      f'with:\n    {prepare_command(dataset, data_dir)}')
try:  # prepare.load_meta checks the .bin sizes against meta.json
    meta = load_meta(data_dir, dataset)
    meta_vocab_size, data_dtype = int(meta['vocab_size']), np.dtype(meta['dtype'])
    n_tokens = {'train': int(meta['train_tokens']), 'val': int(meta['val_tokens'])}
    assert data_dtype in (np.uint16, np.uint32), f"dtype {meta['dtype']!r} is not uint16/uint32"
except DataError as e:
    die(f"dataset '{dataset}': {e}")
except Exception as e:  # a meta.json that parses but lacks a field or holds a wrong value
    die(f"dataset '{dataset}': {os.path.join(data_path, 'meta.json')} is unreadable ({type(e).__name__}: {e}); "
        f're-create it with:\n    {prepare_command(dataset, data_dir)} --force')
for _split in ('train', 'val'):
    check(n_tokens[_split] > block_size,
          f"block_size={block_size} is too long for the {_split} split of '{dataset}' ({n_tokens[_split]} "
          f'tokens; a window needs block_size+1)')

# GPT-2 start: its shape comes from the checkpoint; the other model keys are overrides (n_experts,
# top_k, router, dropout, block_size, ...). With n_experts > 1 from_pretrained upcycles (model.py).
pretrained = None
if init_from.startswith('gpt2'):
    check(meta.get('tokenizer') == 'gpt2', f"init_from={init_from!r} needs a GPT-2 BPE dataset, not '{dataset}' "
                                           f"({meta.get('tokenizer')}); e.g. python prepare.py shakespeare")
    _fixed = {'n_layer', 'n_head', 'n_embd', 'vocab_size', 'bias', 'activation', 'expert_hidden', 'granularity'}
    if dry_run:  # no weights are loaded (nor transformers, nor the network): the config is checked as set
        check(not init_from.startswith('gpt2:') or os.path.isdir(init_from[5:]),
              f'init_from={init_from!r}: no such directory')
    else:
        try:
            with torch.random.fork_rng(devices=[]):  # the same upcycle noise on every process
                torch.manual_seed(seed)
                pretrained = MoEGPT.from_pretrained(
                    init_from[5:] if init_from.startswith('gpt2:') else init_from, upcycle_noise=upcycle_noise,
                    **{k: globals()[k] for k in MoEGPTConfig.field_names() if k not in _fixed})
        except Exception as e:  # no transformers, no network, no such directory, a bad override
            die(f'init_from={init_from!r}: cannot load GPT-2 weights: {type(e).__name__}: {str(e).splitlines()[0]}')
        globals().update({k: getattr(pretrained.config, k) for k in _fixed})
elif init_from.startswith('hf:'):
    # Any family hf.py speaks. Its shape (and, for an MoE checkpoint, its routing) comes from the checkpoint;
    # the other model keys are overrides, except the losses: unless set here they keep HF's (hf.py's mapping).
    import hf
    _src = init_from[3:]
    _hf_losses = {'aux_loss_coef', 'z_loss_coef', 'aux_loss_layers'} - set(_overridden)
    try:
        _fixed = set(hf.fixed_fields(_src)) | _hf_losses
        _over = {k: globals()[k] for k in MoEGPTConfig.field_names() if k not in _fixed}
        if dry_run:  # the config only, no weights
            _cfg = hf.load_config(_src, **_over)
        else:
            with torch.random.fork_rng(devices=[]):  # the same upcycle noise on every process
                torch.manual_seed(seed)
                pretrained = hf.load(_src, upcycle_noise=upcycle_noise, **_over)
            _cfg = pretrained.config
    except Exception as e:  # no transformers, no network, no such directory, an unsupported family, a bad override
        die(f'init_from={init_from!r}: cannot load it: {type(e).__name__}: {str(e).splitlines()[0]}')
    globals().update(dataclasses.asdict(_cfg))

# model config: MoEGPTConfig validates its own fields (top_k <= n_experts, n_embd % n_head, ...)
if vocab_size is None:  # GPU matmuls like multiples of 64 (50257 -> 50304); small char vocabs stay as is
    vocab_size = meta_vocab_size if meta_vocab_size <= 256 else -(-meta_vocab_size // 64) * 64
check(vocab_size >= meta_vocab_size, f'vocab_size={vocab_size} is smaller than the dataset\'s ({meta_vocab_size})')
try:
    gptconf = MoEGPTConfig(**{k: globals()[k] for k in MoEGPTConfig.field_names()})
except (ValueError, TypeError) as e:
    die(e)
model_args = dataclasses.asdict(gptconf)
globals().update(model_args)  # resolved values (expert_hidden=None -> 4*n_embd, ...) go into the config

# resume: the checkpoint must load and match the model config and the data
ckpt, ckpt_path = None, os.path.join(out_dir, 'ckpt.pt')
if init_from == 'resume':
    try:
        ckpt = checkpoint.load(ckpt_path)
    except checkpoint.CheckpointError as e:
        die(f'init_from=resume: {e}')
    try:  # a checkpoint from before a model field existed has that field's default
        _ckpt_args = dataclasses.asdict(MoEGPTConfig(**ckpt['model_args']))
    except (TypeError, ValueError) as e:
        die(f'init_from=resume: {ckpt_path} was written by another version of model.py: {e}')
    _diff = [f'{k}: checkpoint {_ckpt_args.get(k)!r}, config {v!r}' for k, v in model_args.items()
             if k not in RESUME_TUNABLE and _ckpt_args.get(k) != v]
    check(not _diff, f'init_from=resume: {ckpt_path} was trained with a different model config; pass the '
                     f'same settings (e.g. --key=value) to resume:\n    ' + '\n    '.join(_diff))
    check(ckpt.get('meta_vocab_size') in (None, meta_vocab_size),
          f"init_from=resume: {ckpt_path} was trained on a vocabulary of {ckpt.get('meta_vocab_size')} but "
          f"'{dataset}' has {meta_vocab_size}")

# out_dir must be writable: checked by writing a probe file (a dry run writes nothing: then the nearest
# existing folder on its path must be a writable folder)
if dry_run:
    _d = os.path.abspath(out_dir)
    while not os.path.exists(_d):
        _d = os.path.dirname(_d)
    check(os.path.isdir(_d) and os.access(_d, os.W_OK | os.X_OK), f'out_dir={out_dir!r} is not writable ({_d})')
elif master_process:
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        die(f'out_dir={out_dir!r} is not writable ({e.strerror or e})')
if wandb_run_name == '':
    wandb_run_name = os.path.basename(os.path.abspath(out_dir))
config = {k: globals()[k] for k in config_keys}  # the resolved config: plain values only
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    print('config (resolved):')
    print(textwrap.fill('  '.join(f'{k}={v!r}' for k, v in config.items()), width=110, initial_indent='  ',
                        subsequent_indent='  ', break_long_words=False, break_on_hyphens=False))
    print(f'world size {world_size}: {_ga} x {_bs} = {_ga * _bs} rows per iteration (gradient_accumulation_steps '
          f'x batch_size), {rows_per_rank} per process as {ga_local} micro-step{"s" * (ga_local > 1)} of '
          f'{micro_rows}; tokens per iteration {tokens_per_iter:,}')
if dry_run:  # before the model, the process group and out_dir
    if master_process:
        _not_here = (f'; {device} is not available here: checked as ' + ('a CUDA GPU with native bf16' if
                     device_type == 'cuda' else 'MPS') + ', which nothing touched')
        print(f"dry run: every check passed ({data_path}: {n_tokens['train']:,} train, {n_tokens['val']:,} val "
              f"tokens{'' if device_here else _not_here}); nothing was built, written or started")
    sys.exit(0)

# ----------------------------------------------------------------------------- setup
if ddp:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device_type == 'cuda':
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    import parallel
    ep_groups = parallel.init_expert_parallel(expert_parallel) if expert_parallel > 1 else None
if master_process:
    with open(os.path.join(out_dir, 'config.json'), 'w') as _f:
        json.dump(config, _f, indent=1)
    for _f in checkpoint.remove_stale_temps(out_dir):  # never read as checkpoints; just disk to free
        print(f'removed {_f}: the temp file of a checkpoint save that was killed before it completed')
torch.manual_seed(seed + rank)  # dropout differs per process...
np.random.seed(seed + rank)
data_gen = torch.Generator().manual_seed(seed)  # ...but batches are drawn identically on every process
if device_type == 'cuda':
    torch.set_float32_matmul_precision('high')  # TF32 matmuls
    torch.backends.cudnn.allow_tf32 = True
if device_type == 'cpu':  # glibc would unmap each step's freed activations and page-fault them back
    hardware.keep_freed_memory()
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)


def get_batch(split, starts):
    # re-open the memmap every batch: a long-lived np.memmap leaks memory (nanoGPT's note)
    data = np.memmap(os.path.join(data_path, f'{split}.bin'), dtype=data_dtype, mode='r')
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts.tolist()]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts.tolist()]).astype(np.int64))
    if device_type == 'cuda':  # pinned + non_blocking: the copy overlaps the GPU's work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def next_iter_starts():
    """This process's window starts for one iteration, (ga_local, micro_rows). The whole iteration's
    (gradient_accumulation_steps, batch_size) starts are drawn identically on every process and each
    takes its own contiguous rows_per_rank of them, so N processes train on exactly the rows one
    process would. sampler_state (checkpointed) redraws them on resume."""
    global sampler_state
    sampler_state = data_gen.get_state()
    starts = torch.randint(n_tokens['train'] - block_size, (gradient_accumulation_steps, batch_size),
                           generator=data_gen)
    return starts.flatten()[rank * rows_per_rank:(rank + 1) * rows_per_rank].view(ga_local, micro_rows)


# model
if pretrained is not None:
    model = pretrained
elif sharded:  # every rank builds the same full model, then keeps its own shards of it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MoEGPT(gptconf)
else:
    model = MoEGPT(gptconf)
moe_layer_ids = [i for i in range(n_layer) if gptconf.is_moe_layer(i)]  # block index of each MoE layer
n_moe, E = len(moe_layer_ids), n_experts
aux_free = model.uses_expert_bias  # DeepSeek-V3 balancing: expert_bias follows each step's load
iter_num, best_val_loss = 0, float('inf')
last_ckpt = None  # (path, iter) of the newest checkpoint known good: named when the run has to stop
if ckpt is not None:
    model.load_state_dict(checkpoint.strip_compile_prefix(ckpt['model']))
    iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    last_ckpt = (ckpt_path, iter_num)
    resume_evaluated = ckpt.get('evaluated', True)  # False: a preemption save, its iter's eval is still due
model.to(device)
params = model.get_num_params()
if master_process:
    print(f'model: {params.total / 1e6:.2f}M parameters, {params.active / 1e6:.2f}M active per token; '
          f'{n_moe} MoE layers x {E} experts, top-{top_k}; device {device}, dtype {dtype}, compile {compile}')

if expert_parallel > 1:
    parallel.enable_expert_parallel(model, ep_groups)  # slices the full (loaded) experts
if fsdp:
    parallel.apply_fsdp(model)  # the optimizer must see the sharded parameters

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if ckpt is not None:
    if sharded:  # the checkpoint holds the full optimizer state, whatever N it was saved with
        parallel.load_full_optim_state_dict(model, optimizer, ckpt['optimizer'])
    else:
        optimizer.load_state_dict(ckpt['optimizer'])
    if scaler.is_enabled() and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    data_gen.set_state(ckpt['sampler_state'])
    if master_process:
        checkpoint.set_rng_state(ckpt['rng'])
    else:  # only rank 0's RNG is saved; the others just need fresh dropout streams
        torch.manual_seed(seed + rank + world_size * iter_num)
    print(f'resumed from {ckpt_path} at iter {iter_num} (best val CE {best_val_loss:.4f})') if master_process else None
ckpt = None  # free memory
raw_model = model  # the plain module: state_dict, MFU, eval
if compile:
    print('compiling the model... (takes a ~minute)') if master_process else None
    model = torch.compile(model)
eval_model = model  # compiled if compile, never DDP-wrapped (eval needs no gradient sync)
if ddp and not fsdp:  # FSDP reduces its own gradients
    if expert_parallel > 1:  # expert shards: reduced by parallel.reduce_expert_gradients, not DDP
        parallel.ddp_ignore_expert_params(model)
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

# ----------------------------------------------------------------------------- metrics, logging
# metrics.py: per-micro-step MoE stats summed on device, reduced over processes at log time, per-layer load
metrics = MoEMetrics(moe_layer_ids, E, device, ddp=ddp, dead_expert_threshold=dead_expert_threshold)
peak_flops = mfu_peak_flops or hardware.peak_flops(device, dtype)  # None: no MFU (CPU, MPS, an unknown GPU)


@torch.no_grad()
def estimate_loss():
    """CE, aux and z over eval_iters batches per split, on batches that are the same at every eval
    (a fixed generator), so successive evals are comparable. Expert usage is measured on val."""
    out = {}
    eval_model.eval()
    for i, split in enumerate(('train', 'val')):
        gen = torch.Generator().manual_seed(seed + 1000 * (rank + 1) + i)
        acc = metrics.new_acc()
        for _ in range(eval_iters):
            X, Y = get_batch(split, torch.randint(n_tokens[split] - block_size, (batch_size,), generator=gen))
            with ctx:
                _, _, stats = eval_model(X, Y)
            metrics.add(acc, stats)
        out[split] = metrics.reduce(acc)
    eval_model.train()
    return out


def get_lr(it):
    if it < warmup_iters:  # linear warmup
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)


if master_process:
    _log = os.path.join(out_dir, 'log.jsonl')
    _history = []
    if init_from == 'resume':  # log.jsonl keeps only the history up to the checkpoint (feeds the heatmap)
        _history = trim_log(_log, iter_num, n_moe)
    elif os.path.isfile(_log):  # a fresh run starts its own log: appended, two runs' curves would mix
        os.replace(_log, _log + '.prev')
        print(f"moved the previous run's {_log} to {_log}.prev")
    if wandb_log:
        import wandb  # only imported when asked for
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    runlog = RunLog(metrics, out_dir, wandb if wandb_log else None, _history)

# ----------------------------------------------------------------------------- reliability helpers
def weights_finite():
    """Whether every parameter is finite on every rank (a collective under DDP); checked before each
    save, so a NaN/Inf checkpoint never replaces a good one."""
    bad = torch.zeros((), device=device)
    for p in raw_model.parameters():
        t = p.to_local() if hasattr(p, 'to_local') else p  # FSDP2: this rank's shard
        bad += (~torch.isfinite(t.detach())).any()
    if ddp:
        dist.all_reduce(bad)
    return bad.item() == 0


def stop_run(msg):
    """Training went wrong (not the input): name the last good checkpoint, exit 3 on every rank."""
    if master_process:
        where = (f'last good checkpoint: {last_ckpt[0]} (iter {last_ckpt[1]}); fix the cause (e.g. a lower '
                 f'learning_rate), then resume from it with --init_from=resume' if last_ckpt
                 else 'no checkpoint was saved by this run')
        print(f'train.py: error: {msg}\n  {where}', file=sys.stderr)
    if ddp:
        dist.destroy_process_group()
    sys.exit(3)


def save_checkpoint(evaluated):
    """Every rank calls this (sharded state is gathered); rank 0 writes ckpt.pt atomically. evaluated:
    this iter's eval ran (False for a preemption save, so a resume runs that eval)."""
    global last_ckpt
    if not weights_finite():
        stop_run(f'iter {iter_num}: the weights are not finite (NaN/Inf); not saving a checkpoint')
    if sharded:  # collective: every rank sends its shards, the full model comes back
        model_sd = parallel.full_state_dict(raw_model)
        optim_sd = parallel.full_optim_state_dict(raw_model, optimizer)
    elif master_process:
        model_sd, optim_sd = checkpoint.strip_compile_prefix(raw_model.state_dict()), optimizer.state_dict()
    if master_process:
        print(f'saving checkpoint to {ckpt_path}')
        checkpoint.save({
            'format_version': checkpoint.FORMAT_VERSION,
            'model': model_sd,
            'optimizer': optim_sd,
            'scaler': scaler.state_dict(),
            'model_args': model_args,
            'config': config,
            'iter_num': iter_num,
            'best_val_loss': best_val_loss,
            'evaluated': evaluated,
            'meta_vocab_size': meta_vocab_size,
            'sampler_state': sampler_state,  # redraws the pending batch on resume
            'rng': checkpoint.rng_state(),
        }, ckpt_path)
        checkpoint.keep_history(ckpt_path, iter_num, keep_last)
    last_ckpt = (ckpt_path, iter_num)


def resume_command():
    """This run's command line, resuming: printed when a preemption stops it."""
    args = [a for a in sys.argv[1:] if not a.startswith('--init_from=')]
    if init_from.startswith(('gpt2', 'hf:')):  # the shape came from the checkpoint; a resume must be told it
        args += [f'--{k}={globals()[k]!r}' for k in sorted(_fixed)]
    return shlex.join(['python', 'train.py', *args, '--init_from=resume'])


# Preemption: the first SIGTERM/SIGINT only sets a flag; the loop finishes its step, saves and exits 0
# (all DDP ranks stop at the same iter: the flag is all-reduced with the step's finiteness check).
# A second signal exits at once: the user or the scheduler means now, and ckpt.pt is never half-written.
preempted = None


def on_signal(signum, frame):
    global preempted
    name = signal.Signals(signum).name
    if preempted is not None:
        if master_process:  # os.write: safe whatever the main thread was in the middle of printing
            os.write(2, f'train.py: second signal ({name}): exiting now without saving; the last complete '
                        f'checkpoint (if any) is {ckpt_path}\n'.encode())
        os._exit(128 + signum)
    preempted = name
    if master_process:
        os.write(2, f'train.py: {name} received: finishing this step, then saving a checkpoint and exiting '
                    f'(send it again to exit at once, without saving)\n'.encode())


if not eval_only:
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

# ----------------------------------------------------------------------------- training loop
def read_flags(step_flags):
    """The host side of the NaN/Inf guard for one step (one device->host sync): count and print a
    skipped step, stop the run after max_bad_steps in a row. Returns (skipped, preempted)."""
    global bad_in_a_row, bad_since_log
    it, flags, step_loss, grad_norm = step_flags
    bad_step, stop = (f > 0 for f in flags.tolist())
    if not bad_step:
        bad_in_a_row = 0
        return False, stop
    bad_in_a_row, bad_since_log = bad_in_a_row + 1, bad_since_log + 1
    if master_process:
        print(f'iter {it}: non-finite loss {step_loss.item():.4g} or grad norm {grad_norm.item():.4g}: '
              f'step skipped ({bad_in_a_row} in a row; the run stops at max_bad_steps={max_bad_steps})')
    if bad_in_a_row >= max_bad_steps:
        stop_run(f'iter {it}: {bad_in_a_row} consecutive steps with a non-finite loss or gradient '
                 f'norm (max_bad_steps={max_bad_steps}); stopping')
    return True, stop


# fused AdamW can skip a step on the device (found_inf); the GradScaler (float16) runs its own skip
skip_on_device = not scaler.is_enabled() and bool(optimizer.defaults.get('fused'))
pending_flags = None  # (iter, flags, loss, grad norm) of a step whose flags the host has not read yet
start_iter = iter_num
skip_eval_at = start_iter if init_from == 'resume' and resume_evaluated else -1  # already evaluated
rows = next_iter_starts()
X, Y = get_batch('train', rows[0])  # fetch the very first batch
acc = metrics.new_acc()
t_log, eval_time, iters_since_log, grad_norm = time.perf_counter(), 0.0, 0, None
bad_in_a_row, bad_since_log = 0, 0  # skipped (non-finite) steps
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    # evaluate, log expert usage, checkpoint
    if eval_only or ((iter_num % eval_interval == 0 or iter_num >= max_iters) and iter_num != skip_eval_at):
        t_eval = time.perf_counter()
        losses = estimate_loss()
        tr, va = losses['train'], losses['val']
        improved = va['ce'] < best_val_loss
        best_val_loss = min(best_val_loss, va['ce'])
        save_now = not eval_only and iter_num > 0 and (improved or always_save_checkpoint)  # same on all ranks
        if master_process:
            runlog.eval(iter_num, lr, tr, va, best_val_loss)
        if save_now:
            save_checkpoint(evaluated=True)
        eval_time += time.perf_counter() - t_eval
    if eval_only or iter_num >= max_iters:
        if pending_flags:  # the last step's flags: print and count it like any other
            read_flags(pending_flags)
        break

    # one optimizer step: gradient_accumulation_steps micro-steps over all processes
    step_counts = torch.zeros(n_moe, E, device=device) if aux_free else None
    step_loss = torch.zeros((), device=device)  # this process's loss, for the finiteness check
    for micro_step in range(ga_local):
        if fsdp:  # FSDP2's no_sync: reduce-scatter only on the last micro-step
            model.set_requires_gradient_sync(micro_step == ga_local - 1)
        elif ddp:  # sync gradients only on the last micro-step (nanoGPT's no_sync equivalent)
            model.require_backward_grad_sync = micro_step == ga_local - 1
        with ctx:
            _, loss, stats = model(X, Y)  # loss = ce + each loss term x its coefficient
            loss = loss / ga_local  # the accumulated gradient is the mean over micro-steps
            if iter_num in nan_iters:  # test hook (debug_nan_at_iters): a NaN loss, and so NaN gradients
                loss = loss * float('nan')
        step_loss += loss.detach()
        metrics.add(acc, stats)
        if aux_free:
            step_counts += stats['expert_counts']
        # fetch the next micro-batch (or the next iteration's first) while this one computes
        if micro_step + 1 < ga_local:
            X, Y = get_batch('train', rows[micro_step + 1])
        else:
            rows = next_iter_starts()
            X, Y = get_batch('train', rows[0])
        scaler.scale(loss).backward()
    if expert_parallel > 1:  # sum over the replicas of each shard / world size = the mean-loss gradient
        parallel.reduce_expert_gradients(raw_model)
    scaler.unscale_(optimizer)  # (a no-op unless float16) the true gradients, to clip and check
    max_norm = grad_clip if grad_clip != 0.0 else float('inf')  # inf: measure the norm, don't clip
    if sharded:  # the global norm over all shards, the same clip factor on every rank
        grad_norm = parallel.clip_grad_norm_(raw_model, max_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # NaN/Inf guard: a non-finite loss or grad norm skips the step (with float16 the GradScaler skips
    # overflowing steps itself, so there only a non-finite loss counts). The flags are all-reduced (MAX)
    # on the device, so every rank skips, or stops on preemption, at the same iter. With fused AdamW
    # the skip itself happens on the device (found_inf: the kernel leaves weights, moments and step
    # count alone) and the host reads the flags one step late, or at the next log line: a CUDA step
    # never waits for the GPU. Otherwise (GradScaler, no fused kernel) they are read at once.
    bad = ~torch.isfinite(step_loss)
    if not scaler.is_enabled():
        bad |= ~torch.isfinite(grad_norm).to(bad.device)
    flags = torch.stack([bad.float(), torch.tensor(float(preempted is not None), device=device)])
    if ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    step_flags = (iter_num, flags, step_loss, grad_norm)
    if skip_on_device:
        optimizer.found_inf = flags[0]
        scaler.step(optimizer)
        stop = read_flags(pending_flags)[1] if pending_flags else False
        pending_flags = step_flags
    else:
        bad_step, stop = read_flags(step_flags)
        if not bad_step:
            scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped here
    if aux_free:  # the step's load over all micro-steps and processes (none if skipped): all move alike
        if ddp:
            dist.all_reduce(step_counts)
        raw_model.update_expert_bias(step_counts * (1 - flags[0]))
    iters_since_log += 1

    # log: stats over the whole interval, all micro-steps, all processes
    if iter_num % log_interval == 0:
        if pending_flags:  # the log line syncs anyway: settle this step's flags first
            stop |= read_flags(pending_flags)[1]
            pending_flags = None
        s = metrics.reduce(acc)  # all processes take part (all_reduce)
        dt = (time.perf_counter() - t_log - eval_time) / iters_since_log
        mfu = raw_model.estimate_mfu(rows_per_rank, dt, peak_flops) if peak_flops else None
        gn = grad_norm.item() if grad_norm is not None else None
        if master_process:
            runlog.train(iter_num, iters_since_log, lr, s, gn, dt, tokens_per_iter, mfu, bad_since_log)
        acc, t_log, eval_time, iters_since_log, bad_since_log = metrics.new_acc(), time.perf_counter(), 0.0, 0, 0
    iter_num += 1
    if stop:  # preempted: this step is done; save (improved or not) so a resume continues exactly here
        save_checkpoint(evaluated=False)
        if master_process:
            print(f'{preempted or "a signal to another rank"}: stopped at iter {iter_num} and saved a checkpoint '
                  f'({ckpt_path}); resume with:\n    {resume_command()}'
                  + ('\n  (launched with torchrun, as this run was)' if ddp else ''))
        break

if wandb_log and master_process:
    wandb.finish()
if ddp:
    # wait until rank 0 has written its last checkpoint: a rank that tears gloo down while a peer is still
    # busy can abort at exit ("terminate called without an active exception", seen 1 in ~20 test runs)
    dist.barrier()
    dist.destroy_process_group()

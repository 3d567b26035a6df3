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
The rest sits behind a few calls: train_config.py (the checks), hf.py (pretrained starts), parallel.py
(DDP/EP/FSDP), guard.py (NaN/Inf and preemption), checkpoint.py (save, resume), metrics.py (logs).
"""
import dataclasses
import json
import math
import os
import shlex
import sys
import textwrap
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import configurator
import hardware
import optim
import parallel
import train_config
from guard import Guard, sync_debug_mode
from metrics import MoEMetrics, RunLog, trim_log
from model import TUNABLE, MoEGPT, MoEGPTConfig
from train_config import check, die

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
ckpt_format = 'auto'  # 'single' (ckpt.pt), 'dcp' (ckpt.dcp/: each rank writes its shard); 'auto': dcp if sharded
async_save = False  # dcp: a save copies the state to host memory, then writes it while training goes on
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt), 'auto' (resume if out_dir holds a checkpoint, else
# scratch), GPT-2: 'gpt2', 'gpt2-medium', ... (HF hub) or 'gpt2:PATH' (a save_pretrained dir), or 'hf:NAME_OR_PATH':
# Mixtral, OLMoE, Qwen2/3-MoE, Llama, Qwen2/3 (hf.py); a dense checkpoint with n_experts > 1 is sparsely upcycled
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
optimizer, muon_lr, muon_momentum = 'adamw', 0.0, 0.95  # or 'muon' (docs/training.md); muon_lr 0 = learning_rate
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
compile_mode = 'default'  # torch.compile's mode; 'reduce-overhead', 'max-autotune': CUDA graphs (docs/performance.md)
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
sync_debug = False  # CUDA: an op in a step that makes the host wait for the GPU raises (from the 3rd step on)
# -----------------------------------------------------------------------------
for _f in dataclasses.fields(MoEGPTConfig):  # new model fields become config keys automatically
    if _f.name not in globals():
        globals()[_f.name] = _f.default
config_keys = [k for k in globals() if k not in _before and not k.startswith('_')]
key_types = configurator.field_types(MoEGPTConfig)  # Literal fields: their choices are checked
key_types.update(vocab_size=(int, type(None)), compile=(bool, str), debug_nan_at_iters=(list, tuple),
                 compile_mode=train_config.COMPILE_MODES)


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
# train_config.py: every check is one clear line and exit 2, and all of them run before anything is written
train_config.check_keys(_config)
debug_nan_at_iters = list(debug_nan_at_iters)  # plain list in config.json and the checkpoint
nan_iters = set(debug_nan_at_iters)
# DDP: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; the process group is created after validation
ddp = int(os.environ.get('RANK', -1)) != -1
rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
world_size = int(os.environ.get('WORLD_SIZE', 1))
master_process = rank == 0
ga_local, micro_rows = train_config.split_batch(gradient_accumulation_steps, batch_size, world_size)
rows_per_rank = ga_local * micro_rows
train_config.check_parallel(_config, ddp, world_size)
sharded = expert_parallel > 1 or fsdp  # state is split over ranks: gather on save, shard on load
device, device_type, device_here, dtype, compile, backend = train_config.resolve_system(
    _config, local_rank if ddp else None, sharded)
data_path, meta, data_dtype, n_tokens = train_config.load_data(data_dir, dataset, block_size)
meta_vocab_size = int(meta['vocab_size'])

# A pretrained start, GPT-2 or any family hf.py reads: the checkpoint fixes the shape (and an MoE's routing); the
# other model keys override (n_experts > 1 upcycles a dense one), but the losses keep its own unless set here.
pretrained, _fixed = None, set()
if init_from.startswith(('gpt2', 'hf:')):
    check(not init_from.startswith('gpt2') or meta.get('tokenizer') == 'gpt2',
          f"init_from={init_from!r} needs a GPT-2 BPE dataset, not '{dataset}' ({meta.get('tokenizer')}); "
          f"e.g. python prepare.py shakespeare")
    import hf
    _src = init_from.split(':', 1)[1] if init_from.startswith(('gpt2:', 'hf:')) else init_from
    try:
        _fixed = set(hf.fixed_fields(_src)) | {'aux_loss_coef', 'z_loss_coef', 'balance_scope'} - set(_overridden)
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

gptconf = train_config.model_config({k: globals()[k] for k in config_keys}, meta_vocab_size)
model_args = dataclasses.asdict(gptconf)
globals().update(model_args)  # resolved values (expert_hidden=None -> 4*n_embd, ...) go into the config
ckpt, ckpt_path = None, checkpoint.path_for(out_dir, ckpt_format, sharded)  # where this run saves
init_from = train_config.resolve_init_from(init_from, out_dir)  # 'auto': resume if out_dir holds a checkpoint
if init_from == 'resume':  # the newest checkpoint (either format) must match the model config and the data
    ckpt = train_config.load_resume(checkpoint.latest(out_dir), model_args, TUNABLE, meta_vocab_size, dataset, optimizer)
train_config.check_out_dir(out_dir, dry_run, master_process)
wandb_run_name = wandb_run_name or os.path.basename(os.path.abspath(out_dir))  # '' = the name of out_dir
config = {k: globals()[k] for k in config_keys}  # the resolved config: plain values only
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    print('config (resolved):')
    print(textwrap.fill('  '.join(f'{k}={v!r}' for k, v in config.items()), width=110, initial_indent='  ',
                        subsequent_indent='  ', break_long_words=False, break_on_hyphens=False))
    print(f'world size {world_size}: {gradient_accumulation_steps} x {batch_size} = '
          f'{gradient_accumulation_steps * batch_size} rows per iteration (gradient_accumulation_steps x batch_size), '
          f'{rows_per_rank} per process as {ga_local} micro-step{"s" * (ga_local > 1)} of {micro_rows}; '
          f'tokens per iteration {tokens_per_iter:,}')
    if device_type == 'cpu' and not eval_only:  # `python train.py` on a laptop: say so before a day of training
        _hint = train_config.cpu_hint(gptconf, tokens_per_iter, max_iters, torch.get_num_threads())
        if _hint: print(_hint)
_fresh = init_from != 'resume' and checkpoint.previous_run(out_dir)  # an earlier run's files (moved aside below)
if dry_run:  # before the model, the process group and out_dir
    if master_process:
        _not_here = (f'; {device} is not available here: checked as ' + ('a CUDA GPU with native bf16' if
                     device_type == 'cuda' else 'MPS') + ', which nothing touched')
        print(f"dry run: every check passed ({data_path}: {n_tokens['train']:,} train, {n_tokens['val']:,} val "
              f"tokens{'' if device_here else _not_here}); nothing was built, written or started")
        if _fresh: print(f'a real run would move the earlier run in {out_dir} to {out_dir}/prev-run-N')
    sys.exit(0)

# ----------------------------------------------------------------------------- setup
ep_groups = parallel.setup(backend, device, expert_parallel) if ddp else None
if master_process:
    if _fresh:  # whole (checkpoints, log, config): two runs never mix, e.g. its ckpt-<iter>.pt beside our ckpt.pt
        print(f'moved the earlier run in out_dir ({", ".join(_fresh)}) to {checkpoint.move_previous_run(out_dir)}')
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
cast_once = ptdtype if ga_local > 1 and dtype != 'float32' and not fsdp else None  # FSDP2 casts when it gathers


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
guard = Guard(max_bad_steps, device, ddp, master_process, ckpt_path)  # NaN/Inf and preemption
if ckpt is not None:
    checkpoint.load_model(model, ckpt)  # (DCP: restore_run loads the shards)
    iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
    guard.last_ckpt = (ckpt_path, iter_num)
    resume_evaluated = ckpt.get('evaluated', True)  # False: a preemption save, its iter's eval is still due
model.to(device)
params = model.get_num_params()
if master_process:
    print(f'model: {params.total / 1e6:.2f}M parameters, {params.active / 1e6:.2f}M active per token; '
          f'{n_moe} MoE layers x {E} experts, top-{top_k}; device {device}, dtype {dtype}, compile {compile}')
parallel.shard(model, ep_groups, fsdp)  # EP slices the full (loaded) experts; before the optimizer is built
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = optim.from_config(model, config, device_type)  # AdamW, or Muon + AdamW (optimizer='muon')
if ckpt is not None:
    checkpoint.restore_run(ckpt, model, optimizer, scaler, data_gen, sharded,
                           reseed=None if master_process else seed + rank + world_size * iter_num)
    if master_process: print(f'resumed from {ckpt_path} at iter {iter_num} (best val CE {best_val_loss:.4f})')
ckpt, raw_model = None, model  # free memory; raw_model: the plain module (state_dict, MFU, eval)
if compile:
    if master_process: print('compiling the model... (takes a ~minute)')
    model = torch.compile(model, mode=compile_mode)
mark_step = train_config.cudagraph_step_marker(compile, compile_mode)  # before each forward (CUDA graphs)
eval_model = model  # compiled if compile, never DDP-wrapped (eval needs no gradient sync)
model = parallel.wrap(model, ddp, fsdp, device_ids=[local_rank] if device_type == 'cuda' else None)

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
            mark_step()
            with ctx:
                _, _, stats = eval_model(X, Y, return_logits=False)
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
    # resume: log.jsonl keeps only the history up to the checkpoint (feeds the heatmap); a fresh run's is new
    _history = trim_log(_log, iter_num, n_moe) if init_from == 'resume' else []
    if wandb_log:
        import wandb  # only imported when asked for
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    runlog = RunLog(metrics, out_dir, wandb if wandb_log else None, _history)


def save_checkpoint(evaluated):
    """Every rank calls this (sharded state is gathered); rank 0 writes ckpt.pt atomically, never with
    NaN/Inf weights. evaluated: this iter's eval ran (False for a preemption save: a resume runs it)."""
    guard.settle()  # the steps not read yet: a run that must stop (max_bad_steps) stops before it saves
    guard.check_weights(raw_model, iter_num)
    if master_process: print(f'saving checkpoint to {ckpt_path}' + ' (in the background)' * async_save)
    checkpoint.save_run(ckpt_path, raw_model, optimizer, dict(
        scaler=scaler.state_dict(), model_args=model_args, config=config, iter_num=iter_num,
        best_val_loss=best_val_loss, evaluated=evaluated, meta_vocab_size=meta_vocab_size,
        sampler_state=sampler_state,  # redraws the pending batch on resume
        rng=checkpoint.rng_state()), keep_last, sharded, master_process, async_save)
    guard.last_ckpt = (ckpt_path, iter_num)


def resume_command():
    """This run's command line, resuming: printed when a preemption stops it. A pretrained start's
    shape came from its checkpoint (_fixed): a resume must be told it."""
    args = [a for a in sys.argv[1:] if not a.startswith('--init_from=')]
    args += [f'--{k}={globals()[k]!r}' for k in sorted(_fixed)]
    return shlex.join(['python', 'train.py', *args, '--init_from=resume'])


# ----------------------------------------------------------------------------- training loop
guard.catch_signals() if not eval_only else None  # preemption: a signal lets the step finish, then saves
start_iter = iter_num
skip_eval_at = start_iter if init_from == 'resume' and resume_evaluated else -1  # already evaluated
rows = next_iter_starts()
X, Y = get_batch('train', rows[0])  # fetch the very first batch
acc = metrics.new_acc()
t_log, eval_time, iters_since_log, grad_norm = time.perf_counter(), 0.0, 0, None
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
        guard.close()  # the last steps' flags: printed and counted like any other
        break

    # one optimizer step: gradient_accumulation_steps micro-steps over all processes, no host read (sync_debug)
    if sync_debug and iter_num >= start_iter + 2: sync_debug_mode(device_type, True)
    step_counts = torch.zeros(n_moe, E, device=device) if aux_free else None
    step_loss = torch.zeros((), device=device)  # this process's loss, for the finiteness check
    # inside: the experts' weights cast once for all micro-steps; drops and router entropy only if this step logs
    with raw_model.train_step(cast_once, statistics=iter_num % log_interval == 0):
        for micro_step in range(ga_local):
            parallel.sync_gradients(model, micro_step == ga_local - 1)  # reduce only on the last micro-step
            mark_step()
            with ctx:
                _, loss, stats = model(X, Y, return_logits=False)  # ce + each loss term x its coef; LM head chunked
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
    scaler.unscale_(optimizer)  # (a no-op unless float16) the true gradients, to clip and check
    # EP's expert shards reduced, the norm, the clip factor: fused AdamW applies it (grad_scale), else done here
    grad_norm, clip = parallel.finish_gradients(model, grad_clip, sharded, fold=optimizer.defaults.get('fused'))
    guard.step(iter_num, step_loss, grad_norm, clip, optimizer, scaler)  # skipped if not finite on any rank
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped here
    if aux_free:  # DeepSeek-V3's expert_bias follows the step's load, all micro-steps and ranks (none if skipped)
        if ddp:
            dist.all_reduce(step_counts)
        raw_model.update_expert_bias(step_counts * (1 - guard.skipped))
    iters_since_log += 1
    stop = guard.stop_requested()  # preempted (under DDP: on any rank, agreed without a GPU read)
    if sync_debug: sync_debug_mode(device_type, False)

    # log: stats over the whole interval, all micro-steps, all processes
    if iter_num % log_interval == 0:
        guard.settle()  # the log line syncs anyway: read the steps' flags first
        s = metrics.reduce(acc)  # all processes take part (all_reduce)
        dt = (time.perf_counter() - t_log - eval_time) / iters_since_log
        mfu = raw_model.estimate_mfu(rows_per_rank, dt, peak_flops) if peak_flops else None
        gn = grad_norm.item() if grad_norm is not None else None
        bad_steps = guard.take_bad_count()
        if master_process:
            runlog.train(iter_num, iters_since_log, lr, s, gn, dt, tokens_per_iter, mfu, bad_steps)
        acc, t_log, eval_time, iters_since_log = metrics.new_acc(), time.perf_counter(), 0.0, 0
    iter_num += 1
    if stop:  # preempted: this step is done; save (improved or not) so a resume continues exactly here
        save_checkpoint(evaluated=False)
        if master_process:
            print(f'{guard.preempted or "a signal to another rank"}: stopped at iter {iter_num} and saved a '
                  f'checkpoint ({ckpt_path}); resume with:\n    {resume_command()}'
                  + ('\n  (launched with torchrun, as this run was)' if ddp else ''))
        break

if wandb_log and master_process: wandb.finish()
checkpoint.wait_for_saves()  # async_save: the last checkpoint is written and committed before any rank exits
if ddp:
    # wait until rank 0 has written its last checkpoint: a rank that tears gloo down while a peer is still
    # busy can abort at exit ("terminate called without an active exception", seen 1 in ~20 test runs)
    dist.barrier()
    dist.destroy_process_group()

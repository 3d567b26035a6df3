"""
train.py's run guard (docs/reliability.md): the NaN/Inf guard and preemption, in one small class.

- NaN/Inf: a step whose loss or grad norm is not finite is skipped (with float16 the GradScaler skips
  overflowing steps itself, so there only a non-finite loss counts); max_bad_steps in a row stop the run
  (exit 3, naming the last good checkpoint). Weights are checked before every save.
- Preemption: the first SIGTERM/SIGINT only sets a flag; the loop finishes its step, saves and exits 0.
  A second signal exits at once: the user or the scheduler means now, and ckpt.pt is never half-written.

No host read of a device value on a step (docs/reliability.md, "What the host waits for"): the step's bad
flag is all-reduced (MAX) on the device, so every DDP rank skips the same steps, and with fused AdamW the
skip itself happens on the device (found_inf: the kernel leaves weights, moments and step count alone).
The host reads the flags at the next log line, save or the end of the run (settle), all at once. The
preemption flag never touches the device: single-process it is a Python flag; under DDP it travels in an
asynchronous all-reduce on a host-side gloo group, read one step later, so every rank stops at the same iter.
Without a fused kernel the flags are read at once: one sync per step.
"""
import os
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

import checkpoint


def fused(optimizer):
    return bool(optimizer.defaults.get('fused'))


def sync_debug_mode(device_type, strict):
    """sync_debug=True: on CUDA, any op that makes the host wait for the GPU raises while strict (the
    steps), and is allowed again around log lines, evals and saves. Elsewhere nothing (the CPU test
    tests/test_host_sync.py hooks this function to count such ops in the same zones)."""
    if device_type == 'cuda':
        torch.cuda.set_sync_debug_mode('error' if strict else 'default')


class Guard:
    def __init__(self, max_bad_steps, device, ddp, master, ckpt_path):
        self.max_bad_steps, self.device, self.ddp, self.master = max_bad_steps, device, ddp, master
        self.ckpt_path = ckpt_path
        self.last_ckpt = None  # (path, iter) of the newest checkpoint known good: named when the run has to stop
        self.preempted = None  # the name of the first signal received
        self.bad_in_a_row = self.bad_since_log = 0  # skipped (non-finite) steps
        # the steps whose flags the host has not read yet: their iters, and a (1, 3) device tensor each of
        # (bad flag, loss, grad norm), every 256 of them packed into one (small, whatever log_interval)
        self.pending_iters, self.pending, self.packed = [], [], []
        self.skipped = None  # this step's bad flag (a device tensor, 1.0 = skipped), for per-step state
        # the preemption flag's own all-reduce, host memory only (a gloo group beside NCCL's); one in flight
        self.host_group = dist.new_group(backend='gloo') if ddp else None
        self.peer_flag = None  # (buffer, work) of the last step's preemption all-reduce

    # ------------------------------------------------------------------------- preemption
    def catch_signals(self):
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.preempted is not None:
            if self.master:  # os.write: safe whatever the main thread was in the middle of printing
                os.write(2, f'train.py: second signal ({name}): exiting now without saving; the last complete '
                            f'checkpoint (if any) is {self.ckpt_path}\n'.encode())
            os._exit(128 + signum)
        self.preempted = name
        if self.master:
            os.write(2, f'train.py: {name} received: finishing this step, then saving a checkpoint and exiting '
                        f'(send it again to exit at once, without saving)\n'.encode())

    def stop_requested(self):
        """After each step: whether to stop (preempted). Under DDP, whether any rank was preempted by the
        previous step: its flags were posted then (an async all-reduce on the host, no GPU involved) and
        are waited for now, so every rank stops at the same iter, one step after the signal."""
        if not self.ddp:
            return self.preempted is not None
        stop = False
        if self.peer_flag is not None:
            buf, work = self.peer_flag
            work.wait()  # waits for the other hosts to reach the previous step, never for a GPU
            stop = bool(buf.numpy()[0])
        self.peer_flag = None
        if not stop:  # a fresh buffer: the signal handler never writes into one in flight
            buf = torch.from_numpy(np.array([float(self.preempted is not None)], dtype=np.float32))
            self.peer_flag = (buf, dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.host_group, async_op=True))
        return stop

    def close(self):
        """The run ends: read the flags of the steps not read yet, let the last preemption all-reduce
        finish (every rank posted it)."""
        self.settle()
        if self.peer_flag is not None:
            self.peer_flag[1].wait()
            self.peer_flag = None

    # ------------------------------------------------------------------------- stopping
    def stop_run(self, msg):
        """Training went wrong (not the input): name the last good checkpoint, exit 3 on every rank."""
        checkpoint.wait_for_saves()  # async_save: the last save is committed before it is named (and its group goes)
        if self.master:
            where = (f'last good checkpoint: {self.last_ckpt[0]} (iter {self.last_ckpt[1]}); fix the cause (e.g. a '
                     f'lower learning_rate), then resume from it with --init_from=resume' if self.last_ckpt
                     else 'no checkpoint was saved by this run')
            print(f'train.py: error: {msg}\n  {where}', file=sys.stderr)
        if self.ddp:
            self.close()
            dist.destroy_process_group()
        sys.exit(3)

    def check_weights(self, model, it):
        """Before a save: every parameter finite on every rank (a collective under DDP), so a NaN/Inf
        checkpoint never replaces a good one."""
        bad = torch.zeros((), device=self.device)
        for p in model.parameters():
            t = p.to_local() if hasattr(p, 'to_local') else p  # FSDP2: this rank's shard
            bad += (~torch.isfinite(t.detach())).any()
        if self.ddp:
            dist.all_reduce(bad)
        if bad.item() != 0:
            self.stop_run(f'iter {it}: the weights are not finite (NaN/Inf); not saving a checkpoint')

    # ------------------------------------------------------------------------- the optimizer step
    def step(self, it, step_loss, grad_norm, clip_coef, optimizer, scaler):
        """The optimizer step, skipped if not finite on some rank. clip_coef (fused AdamW only, else None):
        the clip factor the kernel applies as grad_scale = 1 / clip_coef, instead of a pass over the
        gradients. With fused AdamW nothing here reads a device value."""
        bad = ~torch.isfinite(step_loss)
        if not scaler.is_enabled():
            bad |= ~torch.isfinite(grad_norm).to(bad.device)
        bad = bad.float()
        if self.ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # on the device: no rank steps when another skips
        self.skipped = bad
        self.pending_iters.append(it)
        self.pending.append(torch.stack([bad, step_loss.float(), grad_norm.float().to(bad.device)])[None])
        if len(self.pending) == 256:
            self.packed, self.pending = self.packed + [torch.cat(self.pending)], []
        if fused(optimizer):  # skip on the device: what GradScaler.step does with a fused optimizer
            # float16: unscale_ ran (it records the overflow for scaler.update); unscaled gradients overflowed
            # exactly when their norm is not finite
            optimizer.found_inf = torch.maximum(bad, (~torch.isfinite(grad_norm)).float()) if scaler.is_enabled() \
                else bad
            optimizer.grad_scale = clip_coef.reciprocal().float() if clip_coef is not None else None
            optimizer.step()
            del optimizer.found_inf, optimizer.grad_scale
        elif not self.settle():  # no fused kernel: read the flags now (one sync per step)
            scaler.step(optimizer)

    def settle(self):
        """Read the flags of the steps the host has not read yet, in one transfer (at a log line, a
        save and the end): count and print each skipped step, stop the run after max_bad_steps
        in a row. Returns whether the last of them was skipped."""
        if not self.pending_iters:
            return False
        its, values = self.pending_iters, torch.cat(self.packed + self.pending).tolist()
        self.pending_iters, self.pending, self.packed = [], [], []
        bad_step = False
        for it, (bad, loss, norm) in zip(its, values):
            bad_step = bad > 0
            if not bad_step:
                self.bad_in_a_row = 0
                continue
            self.bad_in_a_row, self.bad_since_log = self.bad_in_a_row + 1, self.bad_since_log + 1
            if self.master:
                print(f'iter {it}: non-finite loss {loss:.4g} or grad norm {norm:.4g}: step skipped '
                      f'({self.bad_in_a_row} in a row; the run stops at max_bad_steps={self.max_bad_steps})')
            if self.bad_in_a_row >= self.max_bad_steps:
                self.stop_run(f'iter {it}: {self.bad_in_a_row} consecutive steps with a non-finite loss or gradient '
                              f'norm (max_bad_steps={self.max_bad_steps}); stopping')
        return bad_step

    def take_bad_count(self):
        """Skipped steps since the last call (each log line's bad_steps)."""
        n, self.bad_since_log = self.bad_since_log, 0
        return n

"""
train.py's run guard (docs/reliability.md): the NaN/Inf guard and preemption, in one small class.

- NaN/Inf: a step whose loss or grad norm is not finite is skipped (with float16 the GradScaler skips
  overflowing steps itself, so there only a non-finite loss counts); max_bad_steps in a row stop the run
  (exit 3, naming the last good checkpoint). Weights are checked before every save.
- Preemption: the first SIGTERM/SIGINT only sets a flag; the loop finishes its step, saves and exits 0.
  A second signal exits at once: the user or the scheduler means now, and ckpt.pt is never half-written.

The step's two flags (bad, preempted) are all-reduced (MAX) on the device in one collective, so every
DDP rank skips, or stops, at the same iter. With fused AdamW the skip itself happens on the device
(found_inf: the kernel leaves weights, moments and step count alone) and the host reads the flags one
step late, or at the next log line: a CUDA step never waits for the GPU. Otherwise (GradScaler, no
fused kernel) they are read at once.
"""
import os
import signal
import sys

import torch
import torch.distributed as dist


class Guard:
    def __init__(self, max_bad_steps, device, ddp, master, ckpt_path):
        self.max_bad_steps, self.device, self.ddp, self.master = max_bad_steps, device, ddp, master
        self.ckpt_path = ckpt_path
        self.last_ckpt = None  # (path, iter) of the newest checkpoint known good: named when the run has to stop
        self.preempted = None  # the name of the first signal received
        self.bad_in_a_row = self.bad_since_log = 0  # skipped (non-finite) steps
        self.pending = None  # (iter, flags, loss, grad norm) of a step whose flags the host has not read yet
        self.skipped = None  # this step's bad flag (a device tensor, 1.0 = skipped), for per-step state

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

    # ------------------------------------------------------------------------- stopping
    def stop_run(self, msg):
        """Training went wrong (not the input): name the last good checkpoint, exit 3 on every rank."""
        if self.master:
            where = (f'last good checkpoint: {self.last_ckpt[0]} (iter {self.last_ckpt[1]}); fix the cause (e.g. a '
                     f'lower learning_rate), then resume from it with --init_from=resume' if self.last_ckpt
                     else 'no checkpoint was saved by this run')
            print(f'train.py: error: {msg}\n  {where}', file=sys.stderr)
        if self.ddp:
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
    def step(self, it, step_loss, grad_norm, optimizer, scaler):
        """The optimizer step, unless the step is not finite on some rank. Returns whether to stop
        (preempted, on any rank)."""
        bad = ~torch.isfinite(step_loss)
        if not scaler.is_enabled():
            bad |= ~torch.isfinite(grad_norm).to(bad.device)
        flags = torch.stack([bad.float(), torch.tensor(float(self.preempted is not None), device=self.device)])
        if self.ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.skipped = flags[0]
        step_flags = (it, flags, step_loss, grad_norm)
        if not scaler.is_enabled() and optimizer.defaults.get('fused'):  # skip on the device, read late
            optimizer.found_inf = flags[0]
            scaler.step(optimizer)
            stop = self.settle()
            self.pending = step_flags
            return stop
        bad_step, stop = self._read(step_flags)
        if not bad_step:
            scaler.step(optimizer)
        return stop

    def settle(self):
        """Read the flags of a step the host has not read yet (at a log line, and at the end). Returns
        whether to stop."""
        if self.pending is None:
            return False
        stop, self.pending = self._read(self.pending)[1], None
        return stop

    def take_bad_count(self):
        """Skipped steps since the last call (each log line's bad_steps)."""
        n, self.bad_since_log = self.bad_since_log, 0
        return n

    def _read(self, step_flags):
        """The host side of one step's flags (one device->host sync): count and print a skipped step,
        stop the run after max_bad_steps in a row. Returns (skipped, preempted)."""
        it, flags, step_loss, grad_norm = step_flags
        bad_step, stop = (f > 0 for f in flags.tolist())
        if not bad_step:
            self.bad_in_a_row = 0
            return False, stop
        self.bad_in_a_row, self.bad_since_log = self.bad_in_a_row + 1, self.bad_since_log + 1
        if self.master:
            print(f'iter {it}: non-finite loss {step_loss.item():.4g} or grad norm {grad_norm.item():.4g}: '
                  f'step skipped ({self.bad_in_a_row} in a row; the run stops at max_bad_steps={self.max_bad_steps})')
        if self.bad_in_a_row >= self.max_bad_steps:
            self.stop_run(f'iter {it}: {self.bad_in_a_row} consecutive steps with a non-finite loss or gradient '
                          f'norm (max_bad_steps={self.max_bad_steps}); stopping')
        return True, stop

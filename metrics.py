"""
MoE training metrics, kept apart from train.py's loop (as torchtitan keeps its metrics apart from its
train loop): per-micro-step sums kept on the device, reduced over processes only when logged; per-layer
expert load; the console summary and table; the expert-usage heatmap; wandb keys; log.jsonl on resume.

    metrics = MoEMetrics(moe_layer_ids, n_experts, device, ddp=..., dead_expert_threshold=0.1)
    acc = metrics.new_acc()
    metrics.add(acc, stats)       # every micro-step: the model's stats dict
    s = metrics.reduce(acc)       # at log time: a collective under DDP (every rank calls it)
    runlog = RunLog(metrics, out_dir, wandb_module_or_None)   # rank 0: console, log.jsonl, wandb, png
    runlog.train(iter_num, ..., s, ...)

Load is the fraction of a layer's routed assignments an expert took, x n_experts (1.0 = uniform).
"""
import json
import math
import os

import numpy as np
import torch


class MoEMetrics:
    def __init__(self, moe_layer_ids, n_experts, device, ddp=False, dead_expert_threshold=0.1):
        self.layer_ids, self.E, self.device, self.ddp = list(moe_layer_ids), n_experts, device, ddp
        self.n_moe = len(self.layer_ids)
        self.dead_expert_threshold = dead_expert_threshold
        self.acc_dtype = torch.float32 if torch.device(device).type == 'mps' else torch.float64  # exact counts

    def new_acc(self):
        """Sums of per-micro-step stats, kept on device (no sync until they are logged); n micro-steps, of
        which n_stats brought the drops and the entropy (train.py: the steps that log)."""
        return {'n': 0, 'n_stats': 0}

    def add(self, acc, stats):
        """stats: the model's. Whatever loss terms arrive are summed under their own names."""
        acc['n'] += 1
        has_stats = 'router_entropy' in stats
        acc['n_stats'] += has_stats
        for name, v in {'ce': stats['ce'], 'loss': stats['loss'], 'counts': stats['expert_counts'],
                        **({'drop': stats['drop_frac'], 'entropy': stats['router_entropy']} if has_stats else {}),
                        **{('losses', k): t for k, t in stats['losses'].items()}}.items():
            if name in acc:
                acc[name] += v  # in place, promoted to acc_dtype: one kernel a statistic
            else:
                acc[name] = v.to(self.acc_dtype, copy=True)

    def reduce(self, acc):
        """Means over micro-steps and processes (counts: sums), as plain Python numbers: ce, loss, each
        loss term under its name in 'losses', and the per-layer 'layers'. One all_reduce under DDP (a
        collective: every rank calls it), over the sums packed by their own shapes."""
        names = [k for k in acc if k not in ('n', 'n_stats')]
        flat = torch.cat([torch.tensor([float(acc['n']), float(acc['n_stats'])], dtype=self.acc_dtype,
                                       device=self.device)] + [acc[k].reshape(-1) for k in names])
        if self.ddp:
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        n, n_stats, *parts = flat.cpu().double().split([1, 1] + [acc[k].numel() for k in names])  # (MPS: no float64)
        n, n_stats = max(n.item(), 1.0), max(n_stats.item(), 1.0)
        sums = {k: v.view(acc[k].shape) for k, v in zip(names, parts)}
        none = torch.full((self.n_moe,), float('nan'), dtype=torch.float64)  # no step brought them
        layers = self.layer_stats(sums.pop('counts').view(self.n_moe, self.E), sums.pop('drop', none) / n_stats,
                                  sums.pop('entropy', none) / n_stats)
        return {'ce': sums['ce'].item() / n, 'loss': sums['loss'].item() / n, 'layers': layers,
                'losses': {k[1]: v.item() / n for k, v in sums.items() if isinstance(k, tuple)}}

    def layer_stats(self, counts, drop, entropy):
        """Per MoE layer: fraction of routed assignments per expert and the load summary."""
        E, layers = self.E, []
        for li, block in enumerate(self.layer_ids):
            frac = counts[li] / counts[li].sum().clamp_min(1)
            load = frac * E
            layers.append({'layer': block, 'routed': int(counts[li].sum().item()),  # token->expert assignments
                           'frac': [round(f, 6) for f in frac.tolist()],
                           'max_over_mean': load.max().item(), 'min_load': load.min().item(),
                           'std_load': load.std(unbiased=False).item(), 'drop_frac': drop[li].item(),
                           'router_entropy': entropy[li].item(),
                           'dead': [e for e in range(E) if frac[e] < self.dead_expert_threshold / E]})
        return layers

    def summary(self, layers):
        """The log line's tail: worst layer's max/mean and min load, mean drop and entropy, dead experts."""
        if not layers:
            return ''
        dead = [f'L{l["layer"]}:' + ','.join(f'e{e}' for e in l['dead']) for l in layers if l['dead']]
        dead_s = ' '.join(dead) if len(dead) <= 6 else ' '.join(dead[:6]) + f' (+{len(dead) - 6} layers)'
        return (f" | load max/mean {max(l['max_over_mean'] for l in layers):.2f}"
                f" min {min(l['min_load'] for l in layers):.2f}"
                f" drop {100 * np.mean([l['drop_frac'] for l in layers]):.1f}%"
                f" H {np.mean([l['router_entropy'] for l in layers]):.2f}/{math.log(self.E):.2f}"
                f" | dead: {dead_s or 'none'}")

    def table(self, layers, title):
        """Compact per-layer table of the % of routed tokens per expert (16 experts per row block)."""
        E = self.E
        lines = [f'{title} (% of routed tokens per expert; uniform = {100 / E:.1f}%)']
        for start in range(0, E, 16):
            ids = range(start, min(E, start + 16))
            lines.append('layer ' + ''.join(f'{"e" + str(e):>6}' for e in ids))
            for l in layers:
                lines.append(f'L{l["layer"]:<5}' + ''.join(f'{100 * l["frac"][e]:6.1f}' for e in ids))
        for l in layers:
            lines.append(f'L{l["layer"]:<5}max/mean {l["max_over_mean"]:.2f}  min {l["min_load"]:.2f}  '
                         f'std {l["std_load"]:.2f}  dead {",".join(f"e{e}" for e in l["dead"]) or "-"}')
        return '\n'.join(lines)

    def plot(self, history, path):
        """path (a png): layer x expert load at the last eval, and its evolution over the evals.
        history: [(iter, fractions (n_moe, E))], one per eval."""
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        E, n_moe, ids = self.E, self.n_moe, self.layer_ids
        iters = [it for it, _ in history]
        load = np.stack([f for _, f in history]) * E  # (n_evals, n_moe, E); 1.0 = uniform
        vmax = max(2.0, float(load.max()))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, min(12.0, 2.5 + 0.5 * n_moe)), layout='constrained',
                                     gridspec_kw={'width_ratios': [1, 1.3]})
        im = a1.imshow(load[-1], aspect='auto', cmap='viridis', vmin=0, vmax=vmax, interpolation='nearest')
        a1.set_title(f'expert load at iter {iters[-1]} (val; 1 = uniform)')
        a1.set_xlabel('expert')
        a1.set_yticks(range(n_moe), [f'L{b}' for b in ids])
        if E <= 16 and n_moe <= 24:
            for i in range(n_moe):
                for j in range(E):
                    a1.text(j, i, f'{load[-1, i, j]:.2f}', ha='center', va='center', fontsize=7,
                            color='w' if load[-1, i, j] < vmax / 2 else 'k')
        evo = load.transpose(1, 2, 0).reshape(n_moe * E, len(iters))  # rows: layer-major (layer, expert)
        a2.imshow(evo, aspect='auto', cmap='viridis', vmin=0, vmax=vmax, interpolation='nearest')
        a2.set_title('evolution over evals (rows: layer x expert)')
        a2.set_xlabel('iter')
        ticks = sorted(set(np.linspace(0, len(iters) - 1, min(len(iters), 8)).round().astype(int)))
        a2.set_xticks(ticks, [str(iters[t]) for t in ticks])
        a2.set_yticks([li * E + (E - 1) / 2 for li in range(n_moe)], [f'L{b}' for b in ids])
        for li in range(1, n_moe):
            a2.axhline(li * E - 0.5, color='w', linewidth=0.8)
        fig.colorbar(im, ax=[a1, a2], label='load (fraction x n_experts)')
        tmp = path + '.tmp'
        fig.savefig(tmp, format='png', dpi=100)
        plt.close(fig)
        os.replace(tmp, path)  # a reader never sees half a png

    def wandb_keys(self, prefix, layers, summary=False):
        """wandb keys, a bounded number however many experts: per layer a histogram of the per-expert
        fractions plus summary scalars; per-expert scalars only for small models. summary: also the
        across-layer scalars (prefix/max_over_mean, ...)."""
        import wandb  # only imported when asked for
        d, E = {}, self.E
        if summary and layers:
            d.update({f'{prefix}/max_over_mean': max(l['max_over_mean'] for l in layers),
                      f'{prefix}/min_load': min(l['min_load'] for l in layers),
                      f'{prefix}/drop_frac': float(np.mean([l['drop_frac'] for l in layers])),
                      f'{prefix}/router_entropy': float(np.mean([l['router_entropy'] for l in layers])),
                      f'{prefix}/dead_experts': sum(len(l['dead']) for l in layers)})
        for l in layers:
            p = f'{prefix}/L{l["layer"]}'
            d.update({f'{p}/max_over_mean': l['max_over_mean'], f'{p}/min_load': l['min_load'],
                      f'{p}/std_load': l['std_load'], f'{p}/drop_frac': l['drop_frac'],
                      f'{p}/router_entropy': l['router_entropy'], f'{p}/dead_experts': len(l['dead'])})
            if E <= 512:  # wandb's histogram limit
                d[f'{p}/load_hist'] = wandb.Histogram(np_histogram=(np.array(l['frac']), np.arange(E + 1)))
            if len(layers) * E <= 64:
                d.update({f'{p}/e{e}': f for e, f in enumerate(l['frac'])})
        return d


def log_keys(s, prefix=''):
    """A reduced stats dict as flat log keys: ce, loss and each loss term by its name (none for a dense
    model, which has no terms)."""
    return {f'{prefix}ce': s['ce'], f'{prefix}loss': s['loss'], **{f'{prefix}{k}': v for k, v in s['losses'].items()}}


class RunLog:
    """Rank 0's record of a run: one console line per log interval / eval (plus the per-layer table),
    out_dir/log.jsonl (one JSON record per line, the same numbers), wandb when given its module, and
    out_dir/expert_usage.png. history: the evals' expert fractions so far (trim_log's, on resume)."""

    def __init__(self, metrics, out_dir, wandb=None, history=None):
        self.m, self.out_dir, self.wandb, self.history = metrics, out_dir, wandb, list(history or [])

    def emit(self, line, record, wandb_dict):
        """Every sink, once: the console, log.jsonl, wandb (wandb_dict: a function, called only when
        wandb is on, so that wandb is never imported otherwise)."""
        print(line)
        with open(os.path.join(self.out_dir, 'log.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.wandb:
            self.wandb.log(wandb_dict(), step=record['iter'])

    def eval(self, iter_num, lr, tr, va, best_val_ce):
        """tr, va: MoEMetrics.reduce of the train and val eval batches."""
        m, png = self.m, os.path.join(self.out_dir, 'expert_usage.png')
        terms = ', '.join(f'{k} {v:.4f}' for k, v in va['losses'].items())
        line = (f"step {iter_num}: train CE {tr['ce']:.4f}, val CE {va['ce']:.4f}"
                f"{f' (val {terms})' if terms else ''}{m.summary(va['layers'])}")
        wandb_dict = lambda: {**{f'val/{k}': v for k, v in log_keys(va).items()}, 'val/best_ce': best_val_ce,
                              **{f'eval_train/{k}': v for k, v in log_keys(tr).items()},
                              **m.wandb_keys('val_moe', va['layers']),
                              **({'val_moe/expert_usage': self.wandb.Image(png)} if m.n_moe else {})}
        if m.n_moe:
            self.history.append((iter_num, np.array([l['frac'] for l in va['layers']])))
            m.plot(self.history, png)
            line += '\n' + m.table(va['layers'], f'expert load on val at iter {iter_num}')
        self.emit(line, {'type': 'eval', 'iter': iter_num, 'lr': lr, **log_keys(tr, 'train_'), **log_keys(va, 'val_'),
                         'best_val_ce': best_val_ce, 'layers': va['layers']}, wandb_dict)

    def train(self, iter_num, iters, lr, s, grad_norm, dt, tokens_per_iter, mfu, bad_steps):
        """s: MoEMetrics.reduce over the log interval (iters iterations); dt: seconds per iteration
        without evals; mfu: None where no peak FLOP/s is known (then it is not printed)."""
        terms = ''.join(f' {k} {v:.4f}' for k, v in s['losses'].items())
        line = (f"iter {iter_num}: ce {s['ce']:.4f}{terms} | {dt * 1000:.1f}ms/iter {tokens_per_iter / dt:,.0f} tok/s"
                f"{f' mfu {100 * mfu:.2f}%' if mfu is not None else ''}{self.m.summary(s['layers'])}")
        perf = {'ms_per_iter': dt * 1000, 'tokens_per_s': tokens_per_iter / dt, 'mfu': mfu}
        wandb_dict = lambda: {**{f'train/{k}': v for k, v in log_keys(s).items()}, 'lr': lr,
                              **{f'perf/{k}': v for k, v in perf.items() if v is not None},
                              **({'train/grad_norm': grad_norm} if grad_norm is not None else {}),
                              **self.m.wandb_keys('moe', s['layers'], summary=True)}
        self.emit(line, {'type': 'train', 'iter': iter_num, 'iters': iters, 'lr': lr, **log_keys(s),
                         'grad_norm': grad_norm, **perf, 'bad_steps': bad_steps, 'layers': s['layers']}, wandb_dict)


def trim_log(path, iter_num, n_moe):
    """On resume: keep log.jsonl's history up to the checkpoint at iter_num (a crashed run may have
    logged past it, and may have torn its last line). Returns the kept evals' expert fractions,
    [(iter, (n_moe, E) array)], which feed the heatmap's evolution panel."""
    kept, history = [], []
    if not os.path.isfile(path):
        return history
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
                if r['iter'] < iter_num or (r['type'] == 'eval' and r['iter'] == iter_num):
                    kept.append(line if line.endswith('\n') else line + '\n')
                    if r['type'] == 'eval' and len(r['layers']) == n_moe and n_moe:
                        history.append((r['iter'], np.array([l['frac'] for l in r['layers']])))
            except (ValueError, KeyError, TypeError):
                pass  # a torn last line from a crash: drop it
    with open(path + '.tmp', 'w') as f:
        f.writelines(kept)
    os.replace(path + '.tmp', path)
    return history

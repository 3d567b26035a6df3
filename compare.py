"""
Compare training runs from their out_dir/log.jsonl: one table (best val CE, ms/iter, expert-load
imbalance, dropped %) and one plot (val CE against iteration and against training wall-clock).

Run the routing zoo briefly at nanoGPT's CPU recipe sizes, then compare (README: Routing zoo):
$ python compare.py --run --max_iters=300
Only compare runs that already exist:
$ python compare.py out-zoo/dense out-zoo/switch_top1 ...
"""
import argparse
import json
import os
import subprocess
import sys

ZOO = ['dense', 'mixtral_top2', 'switch_top1', 'noisy_topk', 'shared_experts', 'fine_grained',
       'sigmoid_aux_free', 'balance_sequence', 'expert_choice', 'soft_moe']
CPU_RECIPE = ['--device=cpu', '--compile=False', '--n_layer=4', '--n_head=4', '--n_embd=128',
              '--block_size=64', '--batch_size=12', '--dropout=0.0', '--eval_iters=20', '--log_interval=10']


def read_run(out_dir):
    """Eval points (iter, wall-clock seconds of training so far, val CE) and train-side averages."""
    evals, train, wall = [], [], 0.0
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash
            if r.get('type') == 'train':
                wall += r['ms_per_iter'] * r['iters'] / 1000  # eval time excluded by train.py
                train.append(r)
            elif r.get('type') == 'eval':
                evals.append((r['iter'], wall, r['val_ce'], r['layers']))
    if not evals:
        raise ValueError(f'{out_dir}/log.jsonl has no eval records yet')
    return evals, train


def summarize(name, out_dir):
    evals, train = read_run(out_dir)
    layers = evals[-1][3]  # expert load on val at the last eval
    steady = train[len(train) // 5:] or train  # skip the first fifth: warm-up and one-off costs
    return {
        'run': name, 'iters': evals[-1][0], 'best_val_ce': min(e[2] for e in evals), 'final_val_ce': evals[-1][2],
        'ms_per_iter': sum(r['ms_per_iter'] * r['iters'] for r in steady) / sum(r['iters'] for r in steady),
        'max_over_mean': max((l['max_over_mean'] for l in layers), default=None),
        'dropped_pct': 100 * sum(l['drop_frac'] for l in layers) / len(layers) if layers else None,
    }


def plot(runs, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, (evals, _) in runs.items():
        it, wall, ce = zip(*[(e[0], e[1], e[2]) for e in evals])
        style = dict(lw=2.5, color='black') if name == 'dense' else dict(lw=1.3)
        a1.plot(it, ce, label=name, **style)
        a2.plot(wall, ce, label=name, **style)
    for a, xl in ((a1, 'iteration'), (a2, 'training wall-clock (s, eval excluded)')):
        a.set_xlabel(xl)
        a.set_ylabel('val cross-entropy')
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle('routing zoo: val CE (expert_choice sees the future: not comparable)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out_dirs', nargs='*', help='runs to compare (default: out-zoo/<name> for the zoo)')
    p.add_argument('--run', action='store_true', help='first train every zoo config at the CPU recipe')
    p.add_argument('--max_iters', type=int, default=300)
    p.add_argument('--eval_interval', type=int, default=50)
    p.add_argument('--root', default='out-zoo', help='where --run writes, one out_dir per config')
    p.add_argument('--data_dir', default='data')
    p.add_argument('--plot', default=None, help='PNG path (default: <root>/compare.png)')
    args = p.parse_args()

    if args.run:
        for name in ZOO:
            cmd = [sys.executable, 'train.py', f'config/{name}.py', *CPU_RECIPE, f'--max_iters={args.max_iters}',
                   f'--lr_decay_iters={args.max_iters}', f'--eval_interval={args.eval_interval}',
                   f'--warmup_iters={min(100, args.max_iters // 10)}', f'--out_dir={args.root}/{name}',
                   f'--data_dir={args.data_dir}', '--always_save_checkpoint=False']
            print('$', ' '.join(cmd[1:]), flush=True)
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL)
            if r.returncode != 0:
                sys.exit(f'compare.py: {name} failed (exit {r.returncode}); rerun the command above to see why')
    dirs = args.out_dirs or [os.path.join(args.root, n) for n in ZOO if os.path.isdir(os.path.join(args.root, n))]
    if not dirs:
        sys.exit(f'compare.py: no runs found; pass out_dirs or use --run')
    runs, rows = {}, []
    for d in dirs:
        name = os.path.basename(os.path.normpath(d))
        try:
            runs[name] = read_run(d)
            rows.append(summarize(name, d))
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f'compare.py: cannot read {d}: {e}')
    base = next((r['ms_per_iter'] for r in rows if r['run'] == 'dense'), None)
    print(f"| run | iters | best val CE | final val CE | ms/iter | vs dense | load max/mean | dropped % |")
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        fmt = lambda v, f: '-' if v is None else format(v, f)  # noqa: E731
        print(f"| {r['run']} | {r['iters']} | {r['best_val_ce']:.4f} | {r['final_val_ce']:.4f} | "
              f"{r['ms_per_iter']:.1f} | {fmt(base and r['ms_per_iter'] / base, '.2f')}x | "
              f"{fmt(r['max_over_mean'], '.2f')} | {fmt(r['dropped_pct'], '.1f')} |")
    path = args.plot or os.path.join(args.root if not args.out_dirs else '.', 'compare.png')
    plot(runs, path)
    print(f'plot: {path}')


if __name__ == '__main__':
    main()

"""
MoE against dense per training FLOP and per second of wall clock, over seeds, in one command.

Run a suite (every run x seed not finished yet; a finished one is never redone, an interrupted one
resumes from its checkpoint), then report: a markdown table and a plot (docs/results.md):
$ OMP_NUM_THREADS=1 python compare.py --suite cpu_baby --seeds 3
Report on runs you already have (several seeds of one run: name them <run>-s<seed>):
$ python compare.py out-cpu_baby/dense-s1337 out-cpu_baby/moe_8e_top2-s1337 ...
Run the routing zoo briefly at nanoGPT's CPU recipe sizes, then compare (docs/routing_zoo.md):
$ python compare.py --run --max_iters=300
"""
import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

SEEDS = [1337, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # --seeds N takes the first N (1337: nanoGPT's and train.py's default)

# A suite: a base recipe (config files + overrides) and named runs (config file + overrides) x seeds.
# The first run is the reference the multipliers are measured against. ladder (--ladder): the reference again
# (its overrides too) at k x the iterations, each with its own full schedule; their final points extend the
# reference's curve, so a run better than the reference's best gets a measured multiplier, not just a lower bound.
FAIR = ['dense', 'moe_8e_top2', 'moe_8e_top2_full', 'fine_32e_top8', 'shared_8e_top1', 'dense_total']
FAIR_FILES = dict(dense='fair_dense', moe_8e_top2='fair_moe_8e_top2', moe_8e_top2_full='fair_moe_8e_top2_full',
                  fine_32e_top8='fair_fine_32e_top8', shared_8e_top1='fair_shared_8e_top1',
                  dense_total='fair_dense_total')
SUITES = {
    # nanoGPT's CPU recipe (config/moe_8e_cpu.py: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000
    # iters, lr 1e-3, dropout 0, eval every 250 on 20 batches), shakespeare_char
    'cpu_baby': dict(recipe=['config/moe_8e_cpu.py'],
                     runs=[(n, f'config/{FAIR_FILES[n]}.py', []) for n in FAIR],
                     ladder=[('dense_x2', 'config/fair_dense.py', 2)]),
    # the same family at GPT-2 small width (12 x 768, block 1024, ~0.5M tokens per iter) on openwebtext, for a
    # GPU node: 5000 iters = 2.5B tokens per run (config/moe_owt.py's schedule shortened). docs/results.md has
    # the command (prepare.py openwebtext first; 8 GPUs: COMPARE_LAUNCH="torchrun --standalone --nproc_per_node=8")
    'gpu_owt': dict(recipe=['config/moe_owt.py', '--max_iters=5000', '--lr_decay_iters=5000', '--warmup_iters=200',
                            '--eval_interval=500', '--eval_iters=100', '--wandb_log=False'],
                    runs=[(n, f'config/{FAIR_FILES[n]}.py', ['--expert_hidden=12288'] if n == 'dense_total' else [])
                          for n in FAIR],
                    ladder=[('dense_x2', 'config/fair_dense.py', 2)]),
    # Muon against AdamW (issue 23; docs/results.md, "Muon"): dense and 8e top-2 at equal active FLOPs, each with
    # AdamW and with Muon (optimizer='muon': Muon on the hidden matrices and each expert's, AdamW on the rest), at
    # cpu_baby's recipe shortened to 1000 iterations (its own full schedule). The runs are a learning-rate sweep,
    # values a factor 2-3 apart per model and optimizer (AdamW: learning_rate 5e-4 .. 8e-3; Muon: muon_lr 1e-3 ..
    # 3e-2, its AdamW part at the recipe's 1e-3): --seeds 1 runs the sweep, then --seeds 3 --only <the best four>
    # the seeds. The reference (first) is AdamW dense at the sweep's best rate, 4e-3
    'cpu_muon': dict(recipe=['config/moe_8e_cpu.py', '--max_iters=1000', '--lr_decay_iters=1000'],
                     runs=[(f'{n}{"_lr" + lr if lr != "1e-3" else ""}', f'config/{FAIR_FILES[n]}.py',
                            [f'--learning_rate={lr}'])
                           for n in ('dense', 'moe_8e_top2') for lr in ('4e-3', '5e-4', '1e-3', '2e-3', '8e-3')]
                     + [(f'{n}_muon_lr{lr}', f'config/{FAIR_FILES[n]}.py', ['--optimizer=muon', f'--muon_lr={lr}'])
                        for n in ('dense', 'moe_8e_top2') for lr in ('1e-3', '3e-3', '1e-2', '3e-2')],
                     ladder=[('dense_lr4e-3_x2', 'config/fair_dense.py', 2), ('dense_lr4e-3_x4', 'config/fair_dense.py', 4)]),
}
# the routing zoo (--run): one config per routing design, nanoGPT's CPU recipe sizes
ZOO = ['dense', 'mixtral_top2', 'switch_top1', 'noisy_topk', 'shared_experts', 'fine_grained',
       'sigmoid_aux_free', 'balance_sequence', 'expert_choice', 'soft_moe']
CPU_RECIPE = ['--device=cpu', '--compile=False', '--n_layer=4', '--n_head=4', '--n_embd=128',
              '--block_size=64', '--batch_size=12', '--dropout=0.0', '--eval_iters=20', '--log_interval=10']


# ----------------------------------------------------------------------------- running (resumable)

def train_args(out_dir):
    """The arguments compare.py ran train.py with (compare_cmd.json), or None."""
    try:
        with open(os.path.join(out_dir, 'compare_cmd.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_log(out_dir):
    """log.jsonl's records, in order; [] if there is none."""
    recs = []
    try:
        with open(os.path.join(out_dir, 'log.jsonl')) as f:
            for line in f:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass  # a torn last line from a crash
    except FileNotFoundError:
        pass
    return recs


def last_eval_iter(out_dir):
    evals = [r['iter'] for r in read_log(out_dir) if r.get('type') == 'eval']
    return evals[-1] if evals else None


def run_state(out_dir, max_iters):
    """'done': the final eval is logged and its checkpoint saved (ckpt-<max_iters>.pt is linked only after
    the atomic save of ckpt.pt completed); 'resume': a checkpoint to continue from; 'fresh': nothing usable."""
    if last_eval_iter(out_dir) == max_iters and os.path.isfile(os.path.join(out_dir, f'ckpt-{max_iters}.pt')):
        return 'done'
    return 'resume' if os.path.isfile(os.path.join(out_dir, 'ckpt.pt')) else 'fresh'


def other_args_msg(out_dir, old):
    return (f'{out_dir} was trained with other arguments ({shlex.join(old)}); remove it, or pass another --root, '
            f'to run it again')


def ensure_run(args, out_dir, max_iters, label=''):
    """Train out_dir with train.py args unless it is done. Returns 'done' (skipped), 'fresh' or 'resume'."""
    old = train_args(out_dir)
    if old is not None and old != args:
        import cli
        cli.fail('compare.py', other_args_msg(out_dir, old))
    state = run_state(out_dir, max_iters)
    if state == 'done':
        print(f'{label}{out_dir}: done, not redone', flush=True)
        return state
    os.makedirs(out_dir, exist_ok=True)
    if state == 'fresh':  # a run killed before its first save: its log would be appended to, start clean
        for f in os.listdir(out_dir):
            if f in ('log.jsonl', 'val_whole.json') or re.fullmatch(r'ckpt-\d+\.pt', f):
                os.remove(os.path.join(out_dir, f))
    with open(os.path.join(out_dir, 'compare_cmd.json'), 'w') as f:
        json.dump(args, f)
    launch = shlex.split(os.environ.get('COMPARE_LAUNCH', '')) or [sys.executable]
    cmd = [*launch, 'train.py', *args] + (['--init_from=resume'] if state == 'resume' else [])
    print(f'{label}{out_dir}: {"resuming" if state == "resume" else "training"}: {shlex.join(cmd[len(launch):])}',
          flush=True)
    t0 = time.time()
    with open(os.path.join(out_dir, 'train.log'), 'a') as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0 or run_state(out_dir, max_iters) != 'done':
        sys.exit(f'compare.py: {out_dir} stopped (exit {r.returncode}) before iter {max_iters}; see '
                 f'{out_dir}/train.log. Run compare.py again to resume it')
    print(f'{label}{out_dir}: finished in {time.time() - t0:.0f} s', flush=True)
    return state


def suite_runs(suite, seeds, root, only=None, extra=(), ladder=False):
    """[(run name, seed, out_dir, train.py args, max_iters)] of a suite, seed-major (all runs of the first seed
    first, so an early stop leaves whole seeds). seeds: how many of SEEDS, or a list of seeds."""
    s = SUITES[suite]
    runs = s['runs'] + ([(n, cfg, k) for n, cfg, k in s.get('ladder', [])] if ladder else [])
    out = []
    for seed in (SEEDS[:seeds] if isinstance(seeds, int) else seeds):
        for name, cfg, over in runs:
            if only and name not in only:
                continue
            out_dir = os.path.join(root, f'{name}-s{seed}')
            k = over if isinstance(over, int) else None  # a ladder step: k x the suite's iterations
            args = [*s['recipe'], cfg, *(s['runs'][0][2] if k else over), *extra, f'--seed={seed}', f'--out_dir={out_dir}',
                    '--always_save_checkpoint=True']
            if k:  # as many evals (and checkpoints) as the suite's runs
                base = resolve(args)
                args += [f"--max_iters={k * base['max_iters']}", f"--lr_decay_iters={k * base['max_iters']}",
                         f"--eval_interval={k * base['eval_interval']}"]
            cfg = resolve(args)
            args.append(f"--keep_last={cfg['max_iters'] // cfg['eval_interval'] + 2}")  # a checkpoint per eval
            out.append((name, seed, out_dir, args, cfg['max_iters']))
    return out


def resolve(args, keys=('max_iters', 'eval_interval')):
    """The values of keys that these train.py args set (config files and --key=value, in order), without
    running train.py. A suite's recipe must set them."""
    import ast
    import configurator
    cfg = {}
    for a in args:
        if a.startswith('--'):
            k, _, v = a[2:].partition('=')
            try:
                cfg[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                cfg[k] = v
        else:
            cfg.update(configurator._read_file(a))
    missing = [k for k in keys if k not in cfg]
    if missing:
        sys.exit(f'compare.py: the suite must set {missing} (in its recipe): {shlex.join(args)}')
    return cfg


# ----------------------------------------------------------------------------- measuring

def model_of(cfg):
    """The MoEGPT a run's config.json describes, on the meta device (no memory, no init cost)."""
    import warnings
    import torch
    from model import MoEGPT, MoEGPTConfig
    conf = MoEGPTConfig(**{k: cfg[k] for k in MoEGPTConfig.field_names() if k in cfg})
    with warnings.catch_warnings(), torch.device('meta'):
        warnings.simplefilter('ignore')  # expert choice's warning: the report says it plainly
        return MoEGPT(conf)


def val_ce_whole(model, data, block_size, batch_size):
    """Mean CE over every non-overlapping block_size window of data (val.bin), each target once: the
    whole split, not a sample of it. Batches of batch_size windows; the sum is taken in float64."""
    import numpy as np
    import torch
    n, T = (len(data) - 1) // block_size, block_size
    total = 0.0
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            x = torch.from_numpy(data[i * T:j * T].astype(np.int64)).view(-1, T)
            y = torch.from_numpy(data[i * T + 1:j * T + 1].astype(np.int64)).view(-1, T)
            _, _, stats = model(x, y)
            total += stats['ce'].item() * y.numel()
    return total / (n * T)


def sampled_val_ce(model, data, block_size, batch_size, eval_iters, gen):
    """One eval as train.py's estimate_loss does it: eval_iters batches of batch_size random windows."""
    import numpy as np
    import torch
    ces = []
    with torch.inference_mode():
        for _ in range(eval_iters):
            starts = torch.randint(len(data) - block_size, (batch_size,), generator=gen).tolist()
            x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts]).astype(np.int64))
            y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
            ces.append(model(x, y)[2]['ce'].item())
    return sum(ces) / len(ces)


def eval_noise(out_dir, draws, device='cpu'):
    """How noisy one logged eval is: the final checkpoint's val CE over `draws` independent evals of the run's
    eval_iters x batch_size windows, against the whole split. Returns (whole, [draws])."""
    import numpy as np
    import torch
    import checkpoint
    from model import MoEGPT, MoEGPTConfig
    from prepare import load_meta
    with open(os.path.join(out_dir, 'config.json')) as f:
        cfg = json.load(f)
    meta = load_meta(cfg['data_dir'], cfg['dataset'])
    data = np.memmap(os.path.join(cfg['data_dir'], cfg['dataset'], 'val.bin'), dtype=meta['dtype'], mode='r')
    ckpt = checkpoint.load(checkpoint.latest(out_dir), tensors='model')  # ckpt.pt or ckpt.dcp
    model = MoEGPT(MoEGPTConfig(**ckpt['model_args']))
    model.load_state_dict(checkpoint.strip_compile_prefix(ckpt['model']))
    model.to(device).eval()
    T = ckpt['model_args']['block_size']
    gen = torch.Generator().manual_seed(0)
    vals = [sampled_val_ce(model, data, T, cfg['batch_size'], cfg['eval_iters'], gen) for _ in range(draws)]
    return whole_val_curve(out_dir, cfg, device)[ckpt['iter_num']], vals


def whole_val_curve(out_dir, cfg, device='cpu'):
    """{iter: whole-split val CE} of every checkpoint the run kept (ckpt-<iter>.pt, else ckpt.pt), in eval
    mode; cached in out_dir/val_whole.json by file size and mtime, so a report costs nothing the second time."""
    import numpy as np
    import checkpoint
    from model import MoEGPT, MoEGPTConfig
    from prepare import load_meta
    files = sorted(f for f in os.listdir(out_dir) if re.fullmatch(r'ckpt-\d+\.pt', f)) or \
        [f for f in ('ckpt.pt',) if os.path.isfile(os.path.join(out_dir, f))]
    cache_path = os.path.join(out_dir, 'val_whole.json')
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    data = None
    out = {c['iter']: c['val_ce'] for f, c in cache.items() if not os.path.exists(os.path.join(out_dir, f))}  # pruned
    for fname in files:
        st = os.stat(os.path.join(out_dir, fname))
        key = [st.st_size, st.st_mtime_ns]
        if cache.get(fname, {}).get('key') != key:
            if data is None:
                meta = load_meta(cfg['data_dir'], cfg['dataset'])
                data = np.memmap(os.path.join(cfg['data_dir'], cfg['dataset'], 'val.bin'), dtype=meta['dtype'],
                                 mode='r')
            ckpt = checkpoint.load(os.path.join(out_dir, fname))
            model = MoEGPT(MoEGPTConfig(**ckpt['model_args']))
            model.load_state_dict(checkpoint.strip_compile_prefix(ckpt['model']))
            model.to(device).eval()
            t0 = time.time()
            # the run's own batch size where the batch changes the outputs (capacity, expert choice); else 64 rows
            bs = cfg['batch_size'] if model.config.batch_dependent else max(64, cfg['batch_size'])
            ce = val_ce_whole(model, data, ckpt['model_args']['block_size'], bs)
            print(f'{out_dir}/{fname}: whole val split CE {ce:.4f} ({time.time() - t0:.0f} s)', flush=True)
            cache[fname] = {'key': key, 'iter': ckpt['iter_num'], 'val_ce': ce}
            with open(cache_path + '.tmp', 'w') as f:
                json.dump(cache, f, indent=1)
            os.replace(cache_path + '.tmp', cache_path)
        out[cache[fname]['iter']] = cache[fname]['val_ce']
    return out


def run_info(out_dir, device='cpu', whole=True):
    """One run: its config, sizes, speed and curves (iters, tokens, FLOPs, seconds, logged and whole-split CE)."""
    with open(os.path.join(out_dir, 'config.json')) as f:
        cfg = json.load(f)
    recs = read_log(out_dir)
    evals = [r for r in recs if r.get('type') == 'eval']
    if not evals:
        raise ValueError(f'{out_dir}/log.jsonl has no eval records yet')
    # training seconds after n iterations (eval and checkpoint time excluded by train.py), piecewise linear;
    # the steps after the last log line (train.py logs none past it) at the last logged rate
    done, secs, rate = [0], [0.0], 0.0
    for r in recs:
        if r.get('type') == 'train':
            done.append(r['iter'] + 1)
            secs.append(secs[-1] + r['ms_per_iter'] * r['iters'] / 1000)
            rate = r['ms_per_iter'] / 1000
    model = model_of(cfg)
    params = model.get_num_params()
    tpi = cfg['gradient_accumulation_steps'] * cfg['batch_size'] * cfg['block_size']
    info = dict(dir=out_dir, cfg=cfg, conf=model.config, total=params.total, active=params.active,
                fpt=model.flops_per_token(), tokens_per_iter=tpi, iters=evals[-1]['iter'],
                logged={r['iter']: r['val_ce'] for r in evals}, whole={})
    info['seconds'] = lambda it: interp(it, done, secs) if it <= done[-1] else secs[-1] + (it - done[-1]) * rate
    info['train_s'] = info['seconds'](info['iters'])
    if whole:
        info['whole'] = whole_val_curve(out_dir, cfg, device)
        if 0 in info['logged'] and info['whole']:  # at init the logits are near-uniform: 20 batches know CE
            info['whole'].setdefault(0, info['logged'][0])
    return info


def interp(x, xs, ys):
    """Linear interpolation of y at x through (xs, ys), xs increasing; clamped at the ends."""
    if x <= xs[0]:
        return ys[0]
    for j in range(1, len(xs)):
        if x <= xs[j]:
            return ys[j - 1] + (x - xs[j - 1]) / (xs[j] - xs[j - 1]) * (ys[j] - ys[j - 1])
    return ys[-1]


def reach(xs, ces, target):
    """Where a curve (xs increasing) first reaches CE <= target, linear between its points: (x, '=').
    Never reached: (last x, '>'), the x is a lower bound. Reached at the first point: (first x, '<')."""
    for j, c in enumerate(ces):
        if c <= target:
            if j == 0:
                return xs[0], '<'
            return xs[j - 1] + (ces[j - 1] - target) / (ces[j - 1] - c) * (xs[j] - xs[j - 1]), '='
    return xs[-1], '>'


def multiplier(ref_xs, ref_ces, targets, xs):
    """Per seed: (reference x needed to reach that seed's final CE) / (the seed's own x). Returns
    (mean, std, kind): kind '=' all measured; '>' some reference never got there (mean is a lower bound,
    those seeds counted at the reference's last point); '<' some got there at the reference's first point."""
    vals, kinds = [], set()
    for t, x in zip(targets, xs):
        rx, kind = reach(ref_xs, ref_ces, t)
        vals.append(rx / x)
        kinds.add(kind)
    kind = '?' if {'<', '>'} <= kinds else '>' if '>' in kinds else '<' if '<' in kinds else '='
    return mean(vals), std(vals), kind


def mean(v):
    return sum(v) / len(v)


def ratio(a, b):
    """a / b, nan when b is 0 (a run with nothing to time: 0 iters, or no train record in its log)."""
    return a / b if b else float('nan')


def std(v):
    """Sample std over seeds; nan with one seed (no spread measured)."""
    if len(v) < 2:
        return float('nan')
    m = mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


# ----------------------------------------------------------------------------- reporting

def group_runs(dirs):
    """{run name: [out_dir, ...]}: <run>-s<seed> out_dirs are seeds of one run; others stand alone."""
    groups = {}
    for d in dirs:
        groups.setdefault(re.sub(r'-s\d+$', '', os.path.basename(os.path.normpath(d))), []).append(d)
    return groups


def curve(runs, source):
    """Seed-mean curve of a group over the eval iters every seed has: (iters, tokens, FLOPs, seconds, CE,
    CE min, CE max)."""
    iters = sorted(set.intersection(*(set(r[source]) for r in runs)))
    r0 = runs[0]
    ces = [[r[source][i] for r in runs] for i in iters]
    return dict(iters=iters, tokens=[i * r0['tokens_per_iter'] for i in iters],
                flops=[i * r0['tokens_per_iter'] * r0['fpt'] for i in iters],
                seconds=[mean([r['seconds'](i) for r in runs]) for i in iters],
                ce=[mean(c) for c in ces], lo=[min(c) for c in ces], hi=[max(c) for c in ces])


def report(groups, ref=None, device='cpu', whole=True, ladder=()):
    """Aggregate each group over its seeds; multipliers against group ref, whose curve the final points of the
    ladder groups (ref at more iterations) extend. Returns (rows, curves, source)."""
    infos = {name: [run_info(d, device, whole) for d in dirs] for name, dirs in groups.items()}
    # one estimator for every number compared: the whole split if every run has it at its final iter
    source = 'whole' if whole and all(r['iters'] in r['whole'] for rs in infos.values() for r in rs) else 'logged'
    curves = {name: curve(rs, source) for name, rs in infos.items()}
    ref = ref if ref in infos else None
    ladder = [n for n in ladder if n in infos]
    if ref:  # the reference's curve, then each ladder run's final point
        pts = [(f, s, c) for f, s, c in zip(curves[ref]['flops'], curves[ref]['seconds'], curves[ref]['ce'])]
        pts += [(curves[n]['flops'][-1], curves[n]['seconds'][-1], curves[n]['ce'][-1]) for n in ladder]
        by_flops, by_secs = sorted(pts), sorted(pts, key=lambda p: p[1])
    rows = []
    for name, rs in infos.items():
        final = [r[source][r['iters']] for r in rs]
        conf = rs[0]['conf']
        row = dict(run=name, seeds=len(rs), total=rs[0]['total'], active=rs[0]['active'], fpt=rs[0]['fpt'],
                   iters=rs[0]['iters'], causal=conf.causal, batch_dependent=conf.batch_dependent,
                   eval_iters=rs[0]['cfg']['eval_iters'],
                   # nan: nothing timed (0 iters, or no train record in the log: 0 s is no measurement)
                   ms=[ratio(1000 * r['train_s'], r['iters'] if r['train_s'] else 0) for r in rs],
                   tok_s=[ratio(r['tokens_per_iter'] * r['iters'], r['train_s']) for r in rs],
                   ce=final, ce_logged=[r['logged'][r['iters']] for r in rs])
        row['ladder'] = name in ladder
        if ref and name != ref and not row['ladder'] and conf.causal and infos[ref][0]['conf'].causal:
            ce_ref = [r[source][r['iters']] for r in infos[ref]]
            row['delta'] = mean(final) - mean(ce_ref)
            row['noise'] = 2 * math.sqrt(std(final) ** 2 + std(ce_ref) ** 2)  # nan with one seed: unknown
            flops = [r['iters'] * r['tokens_per_iter'] * r['fpt'] for r in rs]
            if all(f > 0 for f in flops) and all(r['iters'] > 0 for r in infos[ref]):  # 0 iters: no multiplier
                row['compute_x'] = multiplier([p[0] for p in by_flops], [p[2] for p in by_flops], final, flops)
            if all(r['train_s'] > 0 for r in rs + infos[ref]):  # nothing timed (no train record in a log): '-'
                row['wall_x'] = multiplier([p[1] for p in by_secs], [p[2] for p in by_secs], final,
                                           [r['train_s'] for r in rs])
        rows.append(row)
    return rows, curves, source


def pm(v, fmt):
    """mean ± std over seeds (just the mean with one seed)."""
    m, s = mean(v), std(v)
    if math.isnan(m):
        return '-'  # nothing measured
    return format(m, fmt) if math.isnan(s) else f'{format(m, fmt)} ± {format(s, fmt)}'


def fmt_mult(m):
    val, sd, kind = m
    if kind == '?':
        return 'n/a (seeds disagree)'
    if kind != '=':
        return f'{kind} {val:.2f}'
    return f'{val:.2f}' if math.isnan(sd) else f'{val:.2f} ± {sd:.2f}'


def fmt_delta(r):
    if 'delta' not in r:
        return '-'
    if math.isnan(r['noise']):
        return f"{r['delta']:+.4f} (1 seed: noise unknown)"
    within = abs(r['delta']) < r['noise']
    return f"{r['delta']:+.4f} ({'within noise' if within else 'beyond noise'})"


def table(rows, ref, source):
    """The markdown table: causal runs ranked by final val CE, then the runs that are not comparable."""
    causal = sorted((r for r in rows if r['causal'] and not r.get('ladder')), key=lambda r: mean(r['ce']))
    other = [r for r in rows if r.get('ladder')] + [r for r in rows if not r['causal']]  # other budget; not causal
    ev = rows[0]['eval_iters']
    ce_name = 'val CE, whole split' if source == 'whole' else f'val CE, {ev} batches'
    lines = [f'| # | run | seeds | params total / active | FLOPs/token | ms/iter | tokens/s | {ce_name} | '
             f'Δ vs {ref or "ref"} | val CE, {ev} batches (logged) | compute × | wall-clock × | notes |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for i, r in enumerate(causal + other):
        notes = [] if r['causal'] else ['**not causal: not comparable**']
        if r['batch_dependent']:
            notes.append('batch-dependent')
        if r['run'] == ref:
            notes.append('reference')
        if r.get('ladder'):
            notes.append(f"reference ladder: {r['iters']} iters")
        lines.append(
            f"| {i + 1 if r in causal else '-'} | {r['run']} | {r['seeds']} | {r['total'] / 1e6:.2f}M / "
            f"{r['active'] / 1e6:.2f}M | {r['fpt'] / 1e6:.2f}M | {pm(r['ms'], '.1f')} | {pm(r['tok_s'], ',.0f')} | "
            f"{pm(r['ce'], '.4f')} | {fmt_delta(r)} | {pm(r['ce_logged'], '.4f')} | "
            f"{fmt_mult(r['compute_x']) if 'compute_x' in r else '-'} | "
            f"{fmt_mult(r['wall_x']) if 'wall_x' in r else '-'} | {', '.join(notes)} |")
    return '\n'.join(lines)


LEGEND = """\
mean ± std over seeds. params: non-embedding (nanoGPT's count), active = what one token passes through.
FLOPs/token: training (forward + backward) FLOPs per token, active parameters and attention
(model.flops_per_token()). ms/iter, tokens/s: training time from the runs' own log.jsonl, eval and
checkpoints excluded, warm-up included. Δ: mean final val CE minus the reference's; within noise when
|Δ| < 2 x sqrt(std² + std_ref²) over seeds. compute ×: the reference's FLOPs to reach this run's final val
CE (linear between the reference's seed-mean eval points) / this run's FLOPs; wall-clock ×: the same in
training seconds. > x: the reference never reached it (x is a lower bound); < x: it did at its first
point. > 1 means better than the reference. Not causal: the run's routing sees later tokens (expert
choice, capacity with capacity_priority='choice'); its loss is optimistic and it is not ranked."""


def plot(curves, rows, ref, path, source):
    """Val CE against tokens, FLOPs and seconds; seed-mean lines, min..max over seeds as bands."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    causal = {r['run']: r['causal'] for r in rows}
    ladder = {r['run'] for r in rows if r.get('ladder')}
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    lo = min(min(c['lo']) for c in curves.values())
    max_iter = max(c['iters'][-1] for c in curves.values())
    later = [c['hi'][j] for c in curves.values() for j, i in enumerate(c['iters']) if i >= max_iter / 4]
    for ax, key, label in zip(axes, ('tokens', 'flops', 'seconds'),
                              ('training tokens', 'training FLOPs', 'training seconds (eval excluded)')):
        for name, c in curves.items():
            style = dict(lw=2.5, color='black') if name == ref else dict(lw=1.4, color='black', ls=':') \
                if name in ladder else dict(lw=1.4)
            if not causal[name]:
                style.update(ls='--')
            ln, = ax.plot(c[key], c['ce'], label=name + ('' if causal[name] else ' (not causal)'), **style)
            ax.fill_between(c[key], c['lo'], c['hi'], color=ln.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel(label)
        ax.set_ylabel('val CE (whole split)' if source == 'whole' else 'val CE (logged eval)')
        ax.grid(alpha=0.3)
        if later and max(later) > lo:
            ax.set_ylim(lo - 0.02, max(later) + 0.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f'val CE: mean over seeds, band = min..max over seeds (from iter {max_iter // 4} on)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the routing zoo's log table

def read_run(out_dir):
    """Eval points (iter, wall-clock seconds of training so far, val CE, layers) and the train records."""
    evals, train, wall = [], [], 0.0
    for r in read_log(out_dir):
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
    ms = ratio(sum(r['ms_per_iter'] * r['iters'] for r in steady), sum(r['iters'] for r in steady))  # nan: nothing
    return {
        'run': name, 'iters': evals[-1][0], 'best_val_ce': min(e[2] for e in evals), 'final_val_ce': evals[-1][2],
        'ms_per_iter': None if math.isnan(ms) else ms,
        'max_over_mean': max((l['max_over_mean'] for l in layers), default=None),
        'dropped_pct': 100 * sum(l['drop_frac'] for l in layers) / len(layers) if layers else None,
    }


def log_table(dirs):
    """One row per out_dir from log.jsonl alone: logged val CE, steady ms/iter, expert load, drops."""
    rows = []
    for d in dirs:
        try:
            rows.append(summarize(os.path.basename(os.path.normpath(d)), d))
        except (OSError, ValueError, KeyError) as e:
            import cli
            cli.fail('compare.py', f'cannot read {d}: {e}')
    base = next((r['ms_per_iter'] for r in rows if r['run'] == 'dense'), None)
    fmt = lambda v, f: '-' if v is None else format(v, f)  # noqa: E731
    out = ['| run | iters | best val CE | final val CE | ms/iter | vs dense | load max/mean | dropped % |',
           '|---|---|---|---|---|---|---|---|']
    for r in rows:
        out.append(f"| {r['run']} | {r['iters']} | {r['best_val_ce']:.4f} | {r['final_val_ce']:.4f} | "
                   f"{fmt(r['ms_per_iter'], '.1f')} | {fmt(base and r['ms_per_iter'] and r['ms_per_iter'] / base, '.2f')}x | "
                   f"{fmt(r['max_over_mean'], '.2f')} | {fmt(r['dropped_pct'], '.1f')} |")
    return '\n'.join(out)


def plot_logs(dirs, path):
    """The zoo's plot from logs alone: val CE against iteration and against training wall-clock."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    for d in dirs:
        name = os.path.basename(os.path.normpath(d))
        evals, _ = read_run(d)
        it, wall, ce = zip(*[(e[0], e[1], e[2]) for e in evals])
        style = dict(lw=2.5, color='black') if name == 'dense' else dict(lw=1.3)
        a1.plot(it, ce, label=name, **style)
        a2.plot(wall, ce, label=name, **style)
    for a, xl in ((a1, 'iteration'), (a2, 'training wall-clock (s, eval excluded)')):
        a.set_xlabel(xl)
        a.set_ylabel('val cross-entropy')
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle('val CE from log.jsonl (expert_choice sees the future: not comparable)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(dirs, ref, plot_path, md_path, device, title, whole=True, ladder=()):
    groups = group_runs(dirs)
    rows, curves, source = report(groups, ref, device, whole, ladder)
    tab = table(rows, ref, source)
    print(tab)
    plot(curves, rows, ref, plot_path, source)
    with open(md_path, 'w') as f:
        f.write(f'# {title}\n\n{tab}\n\n{LEGEND}\n\n![val CE]({os.path.basename(plot_path)})\n')
    with open(os.path.splitext(md_path)[0] + '.json', 'w') as f:  # the numbers, for scripts and tests
        json.dump({'source': source, 'ref': ref, 'rows': rows}, f, indent=1, default=str)
    print(f'report: {md_path}, plot: {plot_path}')
    return rows


PLOT_FORMATS = ('', '.png', '.pdf', '.svg', '.svgz', '.jpg', '.jpeg', '.eps', '.ps', '.tif', '.tiff', '.webp')
MAX_SEED = 2**32 - 1  # numpy's seed range: train.py seeds numpy with it


def make_parser():
    """The arguments, checked one by one (types, ranges, names: cli.Parser, one line, exit 2)."""
    import cli
    p = cli.Parser(prog='compare.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out_dirs', nargs='*', help='runs to report on')
    p.add_argument('--suite', choices=list(SUITES), help='run what is missing of this suite, then report')
    p.add_argument('--seeds', type=cli.positive_int, default=3, help=f'seeds per run: the first N of {SEEDS}')
    p.add_argument('--seed_list', default='', help='comma-separated seeds instead (e.g. one seed per machine)')
    p.add_argument('--ladder', action='store_true', help="also run the suite's reference ladder (see SUITES)")
    p.add_argument('--ref_ladder', default='', help='out_dirs: run names that are the reference at more iterations')
    p.add_argument('--only', default='', help='comma-separated run names of the suite (default: all)')
    p.add_argument('--root', default=None, help='where runs go (default: out-<suite>, out-zoo with --run)')
    p.add_argument('--run', action='store_true', help='first train every zoo config at the CPU recipe')
    p.add_argument('--max_iters', type=cli.positive_int, default=None,
                   help='override the suite\'s (smoke tests); --run: 300')
    p.add_argument('--eval_interval', type=cli.positive_int, default=None, help='override the suite\'s; --run: 50')
    p.add_argument('--data_dir', default=None, help='train.py data_dir for every run')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='train.py override for every run')
    p.add_argument('--eval_noise', type=cli.non_negative_int, default=0, metavar='DRAWS',
                   help='out_dirs: DRAWS evals of eval_iters batches each on the final checkpoint, vs the whole split')
    p.add_argument('--prune', action='store_true', help='after each run, evaluate its checkpoints on the whole val '
                   'split, then delete all but the final one and ckpt.pt (big models: a checkpoint per eval is a lot)')
    p.add_argument('--no_report', action='store_true', help='only run')
    p.add_argument('--plot', default=None, help='PNG path (default: <root>/results.png)')
    p.add_argument('--report', default=None, help='markdown path (default: <root>/results.md)')
    p.add_argument('--device', default='cpu', help='where the whole-split evals run (cpu, cuda)')
    p.add_argument('--logged_only', action='store_true', help='no whole-split evals: the logged val CE (quick look)')
    return p


def parse_args(argv=None):
    """The arguments, each checked (make_parser) and then together (check_args)."""
    args = make_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """What each argument means for this run, checked before any run starts or any file is written: a bad one
    found after an hour of training (a plot path, a device) would waste the hour. One line, exit 2."""
    import cli
    bad = lambda msg: cli.fail('compare.py', msg)  # noqa: E731
    if args.seeds > len(SEEDS):
        bad(f'--seeds {args.seeds}: there are {len(SEEDS)} preset seeds ({SEEDS}); name others with --seed_list')
    if args.seed_list:
        try:
            seeds = [int(x) for x in args.seed_list.split(',')]
        except ValueError:
            bad(f'--seed_list {args.seed_list!r}: a comma list of integer seeds, e.g. 1337,1,2')
        if any(not 0 <= x <= MAX_SEED for x in seeds) or len(set(seeds)) != len(seeds):
            bad(f'--seed_list {args.seed_list!r}: seeds must be distinct integers in 0 .. {MAX_SEED}')
    if args.only:
        if not args.suite:
            bad('--only names runs of a suite: add --suite')
        known = [n for n, _, _ in SUITES[args.suite]['runs']] + [n for n, _, _ in SUITES[args.suite].get('ladder', [])]
        unknown = [n for n in args.only.split(',') if n and n not in known]
        if unknown or not any(args.only.split(',')):
            bad(f'--only {args.only!r}: suite {args.suite} has runs {", ".join(known)}')
    for kv in args.set:
        if not re.fullmatch(r'[A-Za-z_]\w*=.*', kv):
            bad(f'--set {kv!r}: write train.py overrides as KEY=VALUE, e.g. --set dropout=0.1')
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        bad(f'--data_dir {args.data_dir!r} is not a folder (prepare.py writes one)')
    if args.root is not None and (not args.root or os.path.exists(args.root) and not os.path.isdir(args.root)):
        bad(f'--root {args.root!r}: not a folder; name a folder for the runs')
    for d in args.out_dirs:
        if not os.path.isdir(d):
            bad(f'{d!r} is not a run folder (an out_dir of train.py)')
    for flag, path in (('--plot', args.plot), ('--report', args.report)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path)) if path else ''
        if not path or os.path.isdir(path) or not os.path.isdir(folder):
            bad(f'{flag} {path!r}: its folder {folder!r} does not exist; create it first, or name a file in an '
                f'existing folder')
        if not os.access(folder, os.W_OK):
            bad(f'{flag} {path!r}: the folder {folder!r} is not writable')
        if flag == '--plot' and os.path.splitext(path)[1].lower() not in PLOT_FORMATS:
            bad(f'--plot {path!r}: not an image file name; use .png (or .pdf, .svg, .jpg)')
    if args.device != 'cpu':
        if not re.fullmatch(r'cuda(:\d+)?|mps', args.device):
            bad(f'--device {args.device!r}: cpu, cuda, cuda:N or mps')
        import hardware
        try:
            hardware.resolve_device(args.device, 'float32')
        except hardware.DeviceError as e:
            bad(f'--device: {e}')


def main(argv=None):
    args = parse_args(argv)

    common = ([f'--data_dir={args.data_dir}'] if args.data_dir is not None else []) + [f'--{kv}' for kv in args.set]
    extra = []
    if args.max_iters is not None:
        extra += [f'--max_iters={args.max_iters}', f'--lr_decay_iters={args.max_iters}',
                  f'--warmup_iters={min(100, args.max_iters // 10)}']
    if args.eval_interval is not None:
        extra.append(f'--eval_interval={args.eval_interval}')
    extra += common
    if args.suite:
        root = args.root or f'out-{args.suite}'
        seeds = [int(x) for x in args.seed_list.split(',')] if args.seed_list else args.seeds
        runs = suite_runs(args.suite, seeds, root, [n for n in args.only.split(',') if n], extra, args.ladder)
        ladder = [n for n, _, _ in SUITES[args.suite].get('ladder', [])]
        for name in ladder:  # ladder runs done before (--ladder) count, even when not asked to run now
            runs += [r for r in suite_runs(args.suite, seeds, root, [name], extra, True)
                     if r not in runs and run_state(r[2], r[4]) == 'done']
        for _, _, out_dir, targs, _ in runs:  # every run's folder, before the first one starts
            old = train_args(out_dir)
            if old is not None and old != targs:
                import cli
                cli.fail('compare.py', other_args_msg(out_dir, old))
        for i, (name, seed, out_dir, targs, max_iters) in enumerate(runs):
            ensure_run(targs, out_dir, max_iters, f'[{i + 1}/{len(runs)}] ')
            if args.prune:  # evaluate the kept checkpoints now (cached), then keep only the final one and ckpt.pt
                with open(os.path.join(out_dir, 'config.json')) as f:
                    whole_val_curve(out_dir, json.load(f), args.device)
                for f in os.listdir(out_dir):
                    if re.fullmatch(r'ckpt-\d+\.pt', f) and f != f'ckpt-{max_iters}.pt':
                        os.remove(os.path.join(out_dir, f))
        if args.no_report:
            return
        write_report([r[2] for r in runs], SUITES[args.suite]['runs'][0][0],
                     args.plot or os.path.join(root, 'results.png'), args.report or os.path.join(root, 'results.md'),
                     args.device, f'suite {args.suite}, seeds {seeds}', not args.logged_only, ladder)
        return
    root = args.root or 'out-zoo'
    if args.run:
        max_iters, ev = args.max_iters or 300, args.eval_interval or 50
        for i, name in enumerate(ZOO):
            targs = [f'config/{name}.py', *CPU_RECIPE, f'--max_iters={max_iters}', f'--lr_decay_iters={max_iters}',
                     f'--eval_interval={ev}', f'--warmup_iters={min(100, max_iters // 10)}', *common,
                     f'--out_dir={root}/{name}', '--always_save_checkpoint=True', '--keep_last=2']
            ensure_run(targs, os.path.join(root, name), max_iters, f'[{i + 1}/{len(ZOO)}] ')
    dirs = args.out_dirs or [os.path.join(root, n) for n in ZOO if os.path.isdir(os.path.join(root, n))]
    if not dirs:
        import cli
        cli.fail('compare.py', 'no runs found; pass out_dirs, --suite or --run')
    if args.eval_noise:
        print(f'| run | whole val split | {args.eval_noise} evals as logged: mean ± std | min .. max | logged |')
        print('|---|---|---|---|---|')
        for d in dirs:
            whole, vals = eval_noise(d, args.eval_noise, args.device)
            print(f'| {d} | {whole:.4f} | {mean(vals):.4f} ± {std(vals):.4f} | {min(vals):.4f} .. {max(vals):.4f} | '
                  f'{[r for r in read_log(d) if r.get("type") == "eval"][-1]["val_ce"]:.4f} |')
        return
    print(log_table(dirs))
    path = args.plot or os.path.join(root if not args.out_dirs else '.', 'compare.png')
    if all(os.path.isfile(os.path.join(d, 'config.json')) for d in dirs) and not args.run:
        names = group_runs(dirs)
        write_report(dirs, 'dense' if 'dense' in names else None, path,
                     args.report or os.path.splitext(path)[0] + '.md', args.device, 'runs: ' + ', '.join(names),
                     not args.logged_only, [n for n in args.ref_ladder.split(',') if n])
    else:  # logs only (no config.json: sizes and FLOPs unknown), or the zoo: the log table and its plot
        plot_logs(dirs, path)
        print(f'plot: {path}')


if __name__ == '__main__':
    main()

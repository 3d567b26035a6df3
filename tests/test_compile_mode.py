"""compile_mode (issue 21): torch.compile's mode, checked like every key, passed to torch.compile, and with
CUDA graphs ('reduce-overhead', 'max-autotune') torch.compiler.cudagraph_mark_step_begin before every forward
(each micro-step's, and each eval batch's). Nothing compiles for real here: the probe runs train.py with
torch.compile replaced by a recorder that returns the model as it is."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ['--device=cpu', '--n_layer=1', '--n_head=2', '--n_embd=32', '--block_size=16', '--batch_size=2',
        '--n_experts=4', '--top_k=2', '--eval_iters=3', '--eval_interval=10', '--log_interval=1', '--max_iters=2']

PROBE = """
import json, runpy, sys, torch
calls = {'compile': [], 'marks': 0}
def fake_compile(model, **kw):
    calls['compile'].append(kw)
    return model
def mark():
    calls['marks'] += 1
torch.compile, torch.compiler.cudagraph_mark_step_begin = fake_compile, mark
out, sys.argv = sys.argv[1], ['train.py', *sys.argv[2:]]
runpy.run_path('train.py', run_name='__main__')
open(out, 'w').write(json.dumps(calls))
"""


def run(args, probe=None):
    cmd = [sys.executable, *(['-c', PROBE, str(probe)] if probe else ['train.py']), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.mark.parametrize('mode, marks', [('default', 0), ('max-autotune-no-cudagraphs', 0),
                                         ('reduce-overhead', 2 * 3 + 2 * 2 * 3), ('max-autotune', 2 * 3 + 2 * 2 * 3)])
def test_compile_mode_reaches_torch_compile(mode, marks, shakespeare_char_dir, tmp_path):
    """2 steps x 3 micro-steps, and 2 evals (iters 0 and 2) x 2 splits x eval_iters=3 batches: a mark before
    each forward with CUDA graphs, none without."""
    probe = tmp_path / 'calls.json'
    r = run([*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={tmp_path / "out"}', '--compile=True',
             f'--compile_mode={mode}', '--gradient_accumulation_steps=3'], probe)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = json.loads(probe.read_text())
    assert calls == {'compile': [{'mode': mode}], 'marks': marks}


@pytest.mark.parametrize('args, msg', [
    (['--compile=True', '--compile_mode=fast'], "compile_mode must be one of 'default', 'reduce-overhead', "
                                                 "'max-autotune', 'max-autotune-no-cudagraphs', got 'fast'"),
    (['--compile=False', '--compile_mode=reduce-overhead'],
     "compile_mode='reduce-overhead' is torch.compile's: it needs compile=True (compile is off here)"),
    (['--sync_debug=yes'], 'sync_debug'),
])
def test_bad_compile_mode_and_sync_debug_fail_clearly(args, msg, shakespeare_char_dir, tmp_path):
    out = tmp_path / 'out'
    r = run([*TINY, f'--data_dir={shakespeare_char_dir}', f'--out_dir={out}', *args])
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()

"""bench.py smoke test: the --quick run works end to end and every variant computes what ours does.
Correctness only: no timing thresholds (timings on a shared CI machine mean nothing)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench  # noqa: E402


@pytest.fixture(scope='module')
def quick_run():
    out = subprocess.run([sys.executable, str(REPO / 'bench.py'), '--quick', '--json', '--threads', '1'],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_quick_run_every_variant_matches_ours(quick_run):
    checks = quick_run['checks']
    variants = {c['variant'] for c in checks}
    for needed in ('ours-loop vs ours-grouped', 'tutorial vs ours', 'onehot(cf=E/K, no drop) vs ours',
                   'onehot(cf=1.25) vs ours-grouped(cf=1.25)', 'dense vs sum of experts 0..K-1',
                   'tutorial dx vs ours', 'onehot(no drop) dW1 vs ours'):
        assert needed in variants
    bad = [c for c in checks if not c['ok']]
    assert not bad, bad


def test_quick_run_reports_every_section(quick_run):
    shapes = {r['moe'] for r in quick_run['layer']}
    assert shapes == set(bench.MOE_SHAPES)
    for r in quick_run['layer']:
        assert {'grouped', 'loop', 'tutorial', 'dense', 'ours'} <= set(r['ms'])
        assert ('onehot' in r['ms']) != bool(r['onehot_note'])  # timed, or reported as OOM
        assert r['ours_vs_dense'] > 0
    assert [r['model'] for r in quick_run['model']] == list(bench.model_configs(bench.PRESETS['quick']['model']))
    assert all(r['tokens_per_s'] > 0 and 0 < r['mfu'] for r in quick_run['model'])
    assert all(r['peak_mib'] > 0 for r in quick_run['memory'])
    assert 'note' in quick_run['sampling'] or quick_run['sampling']['kv cache']['tokens_per_s'] > 0
    grouped_bf16 = [c for c in quick_run['compile_check'] if c['impl'] == 'grouped' and c['dtype'] == 'bfloat16']
    assert len(grouped_bf16) == 2  # dropless and capacity, reported either way


def test_balanced_routing_is_uniform_and_keeps_math():
    """--balanced: every expert gets exactly T*K/E rows, and all variants still agree with ours."""
    layer = bench.make_layer(32, 8, 2, 64, torch.device('cpu'), torch.float32, balanced=True)
    ids_TK, gates_TK = layer.router(torch.randn(64, 32)).topk()
    assert torch.bincount(ids_TK.flatten(), minlength=8).tolist() == [16] * 8
    assert torch.allclose(gates_TK.sum(-1), torch.ones(64))
    checks = bench.check_layer_variants(32, 8, 2, 64, 64, torch.device('cpu'), torch.float32, balanced=True)
    assert all(c['ok'] for c in checks), [c for c in checks if not c['ok']]


def test_onehot_oom_guard_estimate():
    """The one-hot baseline's memory estimate is what the guard compares with the budget."""
    E, K, T = 64, 8, 8192
    C = bench.onehot_capacity(T, E, K, 1.25)
    assert C == 1280
    assert bench.onehot_bytes(T, E, K, 1.25, 4) == T * E * C * 18


@pytest.mark.parametrize('changed', [False, True])
def test_baseline_model_is_checked_and_timed_beside_ours(tmp_path, changed):
    """--baseline FILE: another model.py's MoELayer with the same weights. This very model.py matches
    ours (to fp32 rounding: the check's reference is the grouped path, the baseline runs 'auto') and
    gets a column and a ratio; one whose GELU became a ReLU fails the check."""
    src = (REPO / 'model.py').read_text()
    if changed:
        src = src.replace("{'gelu': F.gelu,", "{'gelu': F.relu,", 1)
        assert src != (REPO / 'model.py').read_text()
    path = tmp_path / 'model_base.py'
    path.write_text(src)
    res = bench.main(['--quick', '--json', '--threads', '1', '--moe', '8e-top2', '--baseline', str(path),
                      '--skip', 'model,memory,sampling,compile'])
    check, = [c for c in res['checks'] if c['variant'] == 'baseline vs ours']
    if changed:
        assert not check['ok'] and check['max_rel_err'] > 1e-4
    else:
        assert check['ok'] and check['max_rel_err'] < 1e-6
        row, = res['layer']
        assert row['ms']['baseline'] > 0 and row['vs_baseline'] == row['ms']['baseline'] / row['ms']['ours']


@pytest.mark.parametrize('text,says', [(None, 'cannot import it: FileNotFoundError'),
                                       ('x = (', 'cannot import it: SyntaxError'),
                                       ('x = 1', 'not a model.py (no MoEGPTConfig or MoELayer)')])
def test_bad_baseline_is_one_clear_line(tmp_path, text, says):
    path = tmp_path / 'old_model.py'
    if text is not None:
        path.write_text(text)
    r = subprocess.run([sys.executable, str(REPO / 'bench.py'), '--quick', '--baseline', str(path)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1 and says in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert r.stdout == ''  # stopped before any work


def test_ci_gpu_script_passes_bench_valid_arguments():
    """.ci/gpu (the prepared run for a lent GPU, which CI never has) must not rot: its bench.py
    command lines parse with today's bench.py, and each runs something."""
    import re
    import shlex
    text = (REPO / '.ci/gpu').read_text().replace('\\\n', ' ')
    lines = [ln.split('python bench.py', 1)[1] for ln in text.splitlines() if 'python bench.py' in ln]
    assert len(lines) == 2
    for rest in lines:
        argv = shlex.split(re.sub(r'\$\{BASELINE:\+[^}]*\}', '--baseline old_model.py', rest))
        args = bench.parse_args(argv)
        assert args.device == 'cuda' and args.compile
        assert set(args.skip.split(',')) != {'layer', 'model', 'memory', 'sampling', 'compile'}


def test_skip_routing_is_the_fixed_balanced_assignment():
    """Section 2b's floor: the layer runs its experts on the fixed assignment skip_routing describes
    (row n = k*T + t of the K stacked copies goes to expert n // (T*K/E)) and averages the K outputs;
    against a per-token float64 reference, with no router call and zero losses."""
    torch.manual_seed(0)
    E, K, D, H, B, S = 4, 2, 8, 12, 2, 6
    layer = bench.MoELayer(bench.MoEGPTConfig(n_layer=1, n_head=2, n_embd=D, block_size=S, vocab_size=11,
                                              n_experts=E, top_k=K, expert_hidden=H, dropout=0.0)).double()
    bench.skip_routing(layer)
    layer.router.forward = None  # routing is free: the router is never called
    x = torch.randn(B, S, D, dtype=torch.float64)
    out, aux = layer(x)
    ex, T = layer.experts, B * S

    def expert(e, v):
        return bench.activation_fn(ex.activation, v @ ex.w1_EDF[e] + ex.b1_EF[e]) @ ex.w2_EHD[e] + ex.b2_ED[e]
    x_TD = x.reshape(T, D)
    ref = torch.stack([sum(expert((k * T + t) // (T * K // E), x_TD[t]) for k in range(K)) / K for t in range(T)])
    assert torch.allclose(out.reshape(T, D), ref, rtol=0, atol=1e-12)
    assert aux['losses'] == {}  # no loss terms: none reach the model's loss
    assert aux['expert_counts'].tolist() == [T * K / E] * E


def test_recipe_step_reports_moe_floor_and_dense():
    """bench_model at a narrow (CPU recipe) config: MoE, the routing-free floor and dense, each with its
    speed against dense."""
    mcfg = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, vocab_size=17, narrow=True)
    assert list(bench.model_configs(mcfg))[1] == bench.FLOOR
    rows = bench.bench_model(mcfg, torch.device('cpu'), torch.float32, 2, False, False, 1e12)
    assert [r['model'] for r in rows] == list(bench.model_configs(mcfg))
    assert all(r['vs_dense'] > 0 for r in rows[:2]) and 'vs_dense' not in rows[2]
    assert rows[0]['params_active'] == rows[1]['params_active']


def test_count_ops_counts_each_aten_call_forward_and_backward():
    """bench.count_ops: a*b + c is 2 ops forward (mul, add); its backward, for x's gradient only, a
    mul by b; one more add is one more op; and the layer row reports counts for ours and dense, dense far fewer."""
    b, c = torch.randn(3), torch.randn(3)
    fwd, bwd = bench.count_ops(lambda v: v * b + c, torch.randn(3), torch.ones(3))
    assert fwd == 2 and bwd >= 1
    fwd3, _ = bench.count_ops(lambda v: v * b + c + c, torch.randn(3), torch.ones(3))
    assert fwd3 == fwd + 1
    row = bench.bench_layer(16, '8e-top2', 64, torch.device('cpu'), torch.float32, 1, False, False)
    assert set(row['ops']) == {'ours', 'dense'}
    assert row['ops']['dense'][0] < row['ops']['ours'][0] and row['ops']['dense'][1] < row['ops']['ours'][1]

"""Expert parallelism, DDP with EP, FSDP2 (parallel.py) on 2 and on 4 CPU processes with gloo.

One torchrun launch per world size (tests/parallel_worker.py) runs every check beside the single-process
model on the same weights and global batch and records the measured differences; the tests below assert
on them. 4 ranks add the layouts 2 cannot have: EP=4, EP=2 x DP=2 (expert replicas), FSDP2 x EP=2, and
DDP x 4 with gradient accumulation.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / 'tests' / 'parallel_worker.py'
FP32_TOL = 1e-5  # relative, for one forward/backward in fp32


def launch(tmp_path_factory, nproc):
    out = tmp_path_factory.mktemp(f'parallel{nproc}') / 'results.json'
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', str(WORKER),
           str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and out.is_file(), f'torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    res = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in res.items() if k != 'train'}, indent=1))
    return res


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    return launch(tmp_path_factory, 2)


@pytest.fixture(scope='module')
def results4(tmp_path_factory):
    return launch(tmp_path_factory, 4)


def ok(res, name):
    r = res[name]
    assert 'error' not in r, f'{name} failed on a rank:\n{r["error"]}'
    return r


@pytest.mark.parametrize('name', ['ep_dropless', 'ep_capacity', 'ep_skewed', 'ep1_replicas'])
def test_ep_forward_backward_equal_single_process(results, name):
    check_ep_forward_backward(ok(results, name), name, experts_per_rank=4)


def check_ep_forward_backward(r, name, experts_per_rank):
    assert r['logits_rel'] <= FP32_TOL, r
    assert r['loss_abs'] <= FP32_TOL * r['loss'], r
    assert r['grad_rel'] <= FP32_TOL, r  # every parameter; expert shards against their slice
    assert r['n_params'] >= 20
    assert r['counts_diff'] == 0  # same routing, same stats
    assert r['num_params_diff'] == 0  # get_num_params counts every expert, local or not
    if name.endswith('capacity'):
        assert r['drop_frac'] > 0.05, 'capacity mode must actually drop rows here'
        assert r['experts_per_rank'] == experts_per_rank
    else:
        assert r['drop_frac'] == 0
    if name == 'ep_skewed':  # experts 2, 3 (all of rank 1's) get nothing: zero-row all-to-all
        assert r['counts'] == [[64.0, 64.0, 0.0, 0.0], [64.0, 64.0, 0.0, 0.0]]
        assert r['idle_expert_grad_max'] == 0.0
    if name == 'ep1_replicas':  # EP size 1 on 2 ranks: experts replicated, reduced over the replica group
        assert r['experts_per_rank'] == 4


def test_ep_training_run_matches_single_process(results):
    check_ep_training(ok(results, 'train'), steps=5)


def check_ep_training(r, steps):
    assert len(r['ep_losses']) == steps
    for a, b in zip(r['ep_losses'], r['ref_losses']):
        assert math.isfinite(a) and abs(a - b) <= 1e-5, (r['ep_losses'], r['ref_losses'])
    for a, b in zip(r['ep_norms'], r['ref_norms']):  # the global grad norm, shards included
        assert abs(a - b) <= 1e-5 * b, (r['ep_norms'], r['ref_norms'])
    assert max(r['ref_norms']) > 0.5, 'clipping (grad_clip=0.5) should engage in this run'
    assert r['ref_losses'][0] != r['ref_losses'][-1]  # it trained
    # AdamW normalises each element's step, so fp32 noise on tiny grads moves weights by up to ~lr*eps-ish
    assert r['param_abs_after_train'] <= 1e-3, r['param_abs_after_train']


def test_checkpoint_ep2_to_ep1_and_back(results):
    check_checkpoint_ep2_to_ep1_and_back(ok(results, 'train'))


def check_checkpoint_ep2_to_ep1_and_back(r):
    assert r['keys_match'], 'full_state_dict must have the single-process keys and shapes'
    assert r['ep2_to_1_logits_abs'] <= 1e-6 and r['ep1_to_2_logits_abs'] <= 1e-6, r
    # model + AdamW moments resumed with the other EP size: the next steps are the same
    assert r['ep2_to_1_resume_loss_abs'] <= 1e-5, r['resume_losses']
    assert r['ep1_to_2_resume_loss_abs'] <= 1e-5, r['resume_losses']


@pytest.mark.parametrize('mode', ['fsdp', 'fsdp_ep'])
def test_fsdp2_trains_like_single_process(results, mode):
    check_fsdp2_training(ok(results, 'fsdp')[mode], mode)


def check_fsdp2_training(r, mode):
    assert all(math.isfinite(x) for x in r['losses'])
    assert r['loss_abs'] <= 1e-5, (r['losses'], r['ref_losses'])
    assert r['param_abs'] <= 1e-3
    assert r['keys_match']
    assert r['n_moments'] == 2 * 30  # exp_avg, exp_avg_sq of every parameter
    assert r['optim_abs'] <= 1e-3  # gathered AdamW moments vs the single process's (same steps)
    assert r['optim_roundtrip_abs'] == 0.0  # load_full_optim_state_dict(full) -> full_optim_state_dict
    assert r['dtensor_params'] > 0  # really sharded by fully_shard
    # foreach AdamW (fused's grouping) never sees plain tensors and DTensors in one group
    assert r['mixed_groups'] == 0
    if mode == 'fsdp_ep':  # expert shards stay with EP (ignored by FSDP): 2 layers x 4 tensors
        assert r['plain_params'] == 8
        assert r['param_groups'] == 4  # (decay, no decay) x (DTensor, plain)
    else:
        assert r['plain_params'] == 0
        assert r['param_groups'] == 2


# ----------------------------------------------------------------------------- 4 ranks
@pytest.mark.parametrize('name', ['ep4_dropless', 'ep4_capacity', 'ep2_dp2'])
def test_4_ranks_ep_forward_backward_equal_single_process(results4, name):
    """EP=4 (1 expert per rank; with capacity, 8 experts: 2 per rank and drops), and EP=2 x DP=2: two EP
    groups [0, 1], [2, 3], each expert on 2 replicas whose gradients are reduced over the replica group."""
    check_ep_forward_backward(ok(results4, name), name, experts_per_rank=2)
    if name == 'ep2_dp2':
        assert ok(results4, name)['experts_per_rank'] == 2  # 4 experts over an EP group of 2


def test_4_ranks_ep2_dp2_training_and_checkpoints_match_single_process(results4):
    """EP=2 x DP=2 with DDP on the dense parameters, gradient accumulation (2 micro-steps per rank) and
    clipping: the single-process losses and norms; its checkpoint resumes in one process and back."""
    r = ok(results4, 'train')
    check_ep_training(r, steps=3)
    check_checkpoint_ep2_to_ep1_and_back(r)


@pytest.mark.parametrize('mode', ['fsdp', 'fsdp_ep'])
def test_4_ranks_fsdp2_and_fsdp2_x_ep2_train_like_single_process(results4, mode):
    """FSDP2 sharded over 4 ranks, and FSDP2 x EP=2 (FSDP over all 4 for the dense parameters, experts in
    EP groups of 2 with replicas)."""
    check_fsdp2_training(ok(results4, 'fsdp')[mode], mode)


def test_4_ranks_ddp_with_gradient_accumulation_matches_single_process(results4):
    """Plain DDP x 4, 2 micro-steps per rank (all-reduce on the last only): the single process's losses,
    global grad norms and weights after 3 AdamW steps."""
    r = ok(results4, 'ddp_ga')
    assert len(r['losses']) == 3 and r['ref_losses'][0] != r['ref_losses'][-1]
    for a, b in zip(r['losses'], r['ref_losses']):
        assert math.isfinite(a) and abs(a - b) <= 1e-5, (r['losses'], r['ref_losses'])
    for a, b in zip(r['norms'], r['ref_norms']):
        assert abs(a - b) <= 1e-5 * b, (r['norms'], r['ref_norms'])
    assert max(r['ref_norms']) > 0.2, 'clipping (grad_clip=0.2) should engage in this run'
    assert r['param_abs'] <= 1e-3, r['param_abs']


def test_clear_errors(results):
    r = ok(results, 'errors')
    assert 'n_experts=3 must be divisible by expert_parallel=2' in r['experts']
    assert 'expert_parallel=3 must divide the world size (2)' in r['world']


def test_all_to_all_volume_formula():
    sys.path.insert(0, str(REPO))
    from parallel import all_to_all_bytes_per_layer
    v = all_to_all_bytes_per_layer(tokens_local=8 * 1024, top_k=2, n_embd=768, bytes_per_elem=2, ep_size=8)
    assert v['dispatch'] == pytest.approx(8192 * 2 * 768 * 2 * 7 / 8)
    assert v['step'] == 4 * v['dispatch']
    assert all_to_all_bytes_per_layer(1000, 2, 64, 4, 1)['step'] == 0  # EP=1: nothing leaves the rank

# GPT-2 small (124M dense) with 8 experts, top-2, in every block, on OpenWebText. For a GPU node:
#   python prepare.py openwebtext
#   torchrun --standalone --nproc_per_node=8 train.py config/moe_owt.py
# ~0.5M tokens per iteration: 12 batch * 1024 block * 40 gradient accumulation steps, global: 5 micro-steps
# of 12 rows per GPU on 8 GPUs, 3 of 10 rows per GPU on 16 (2 nodes).
# With one GPU it runs the same global batch with 40 micro-steps (just 8x slower).

out_dir = 'out-moe-owt'
eval_interval = 1000
eval_iters = 200
log_interval = 10
always_save_checkpoint = True

wandb_log = False  # set True (after `wandb login`) to follow the run there
wandb_project = 'moe-gpt'
wandb_run_name = 'moe-owt-8e-top2'

dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8
batch_size = 12
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

n_experts = 8
top_k = 2

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 2000

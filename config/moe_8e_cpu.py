# config/moe_8e.py at nanoGPT's CPU recipe sizes: 4 layers, 4 heads, 128 wide, block 64, batch 12,
# 2000 iterations, no dropout. A few minutes on a laptop or 2 CPU cores:
#   python prepare.py shakespeare_char && python train.py config/moe_8e_cpu.py

out_dir = 'out-moe-8e-cpu'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

wandb_log = False
wandb_project = 'moe-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

n_experts = 8
top_k = 2

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = 'cpu'
compile = False

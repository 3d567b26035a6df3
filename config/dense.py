# The dense baseline of config/moe_8e.py: the same baby GPT with n_experts = 1, i.e. exactly nanoGPT's
# shakespeare_char model (a plain 4*n_embd MLP per block). Compare its val CE with the MoE's:
#   python train.py config/dense.py
# On a CPU: add nanoGPT's recipe, as in config/moe_8e.py (--device=cpu --compile=False --n_layer=4 ...).

out_dir = 'out-dense'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

wandb_log = False
wandb_project = 'moe-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

n_experts = 1  # dense: no router, no aux/z losses

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

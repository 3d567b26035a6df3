# Qwen3-MoE's architecture at the CPU recipe's size (config/moe_8e_cpu.py's training settings):
# RMSNorm, rotary positions, QK-norm per head, grouped-query attention (8 query heads, 2 key/value
# heads) with heads wider than n_embd / n_head (head_dim 32: q is 2x n_embd wide, as in
# Qwen3-30B-A3B), SwiGLU experts, no biases, untied embeddings; 16 experts, top-4, gates renormalised.
# export.py writes it as a Qwen3MoeForCausalLM directory.
#   python prepare.py shakespeare_char && python train.py config/qwen3_moe_tiny.py
#   python export.py --out_dir=out-qwen3-moe-tiny --to=hf-qwen3-moe-tiny
out_dir = 'out-qwen3-moe-tiny'
eval_interval = 250
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
dataset = 'shakespeare_char'
batch_size = 12
block_size = 64
learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
device = 'cpu'
compile = False

n_layer = 4
n_head = 8
n_kv_head = 2
head_dim = 32
n_embd = 128
dropout = 0.0
norm = 'rmsnorm'
position = 'rope'
activation = 'swiglu'
bias = False
qk_norm = 'head'
tie_embeddings = False
n_experts = 16
top_k = 4
expert_hidden = 168
norm_topk_prob = True

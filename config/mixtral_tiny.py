# Mixtral's architecture at the CPU recipe's size (config/moe_8e_cpu.py: 4 layers, 128 wide, block 64,
# batch 12, 2000 iterations): RMSNorm, rotary positions, grouped-query attention (4 query heads share
# 2 key/value heads), SwiGLU experts, no biases, untied embeddings; 8 experts, top-2, gates renormalised.
# export.py writes it as a MixtralForCausalLM directory.
#   python prepare.py shakespeare_char && python train.py config/mixtral_tiny.py
#   python export.py --out_dir=out-mixtral-tiny --to=hf-mixtral-tiny
out_dir = 'out-mixtral-tiny'
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
n_head = 4
n_kv_head = 2
n_embd = 128
dropout = 0.0
norm = 'rmsnorm'
position = 'rope'
activation = 'swiglu'
bias = False
tie_embeddings = False
n_experts = 8
top_k = 2
expert_hidden = 336  # SwiGLU at 2/3 of 4*n_embd (Llama's rule): about a GELU expert's parameters
norm_topk_prob = True

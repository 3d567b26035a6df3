# OLMoE's architecture at the CPU recipe's size (config/moe_8e_cpu.py's training settings): RMSNorm,
# rotary positions, QK-norm over the whole q and k projections, SwiGLU experts, no biases, untied
# embeddings; fine-grained experts (16 half-width experts, top-4: OLMoE-1B-7B has 64, top-8) with
# the top-k gates left as softmax probabilities (norm_topk_prob=False, as OLMoE).
# export.py writes it as an OlmoeForCausalLM directory.
#   python prepare.py shakespeare_char && python train.py config/olmoe_tiny.py
#   python export.py --out_dir=out-olmoe-tiny --to=hf-olmoe-tiny
out_dir = 'out-olmoe-tiny'
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
n_embd = 128
dropout = 0.0
norm = 'rmsnorm'
position = 'rope'
activation = 'swiglu'
bias = False
tie_embeddings = False
qk_norm = 'proj'
n_experts = 16
top_k = 4
expert_hidden = 168  # half of mixtral_tiny's 336: the same active parameters with 2x the experts
norm_topk_prob = False

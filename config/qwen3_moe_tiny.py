# Qwen3-MoE's architecture at the CPU recipe's size (config/moe_8e_cpu.py's training settings):
# RMSNorm, rotary positions, QK-norm per head, grouped-query attention (8 query heads, 2 key/value
# heads) with heads wider than n_embd / n_head (head_dim 32: q is 2x n_embd wide, as in
# Qwen3-30B-A3B), SwiGLU experts, no biases, untied embeddings; 16 experts, top-4, gates renormalised.
# export.py writes it as a Qwen3MoeForCausalLM directory.
# Only the architecture is set here; the sizes and the recipe come first:
#   python prepare.py shakespeare_char && python train.py config/moe_8e_cpu.py config/qwen3_moe_tiny.py
#   python export.py --out_dir=out-qwen3-moe-tiny --to=hf-qwen3-moe-tiny
out_dir = 'out-qwen3-moe-tiny'
n_head = 8
n_kv_head = 2
head_dim = 32
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

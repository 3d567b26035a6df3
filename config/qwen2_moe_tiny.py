# Qwen2-MoE's (Qwen1.5-MoE's) architecture at the CPU recipe's size (config/moe_8e_cpu.py's training
# settings): RMSNorm, rotary positions, a bias on the q/k/v projection only, SwiGLU experts, untied
# embeddings; 16 narrow experts, top-4, gates not renormalised, plus one always-on shared expert 4x
# as wide (n_shared_experts=4) whose output a per-token sigmoid gate scales (shared_expert_gate).
# export.py writes it as a Qwen2MoeForCausalLM directory.
# Only the architecture is set here; the sizes and the recipe come first:
#   python prepare.py shakespeare_char && python train.py config/moe_8e_cpu.py config/qwen2_moe_tiny.py
#   python export.py --out_dir=out-qwen2-moe-tiny --to=hf-qwen2-moe-tiny
out_dir = 'out-qwen2-moe-tiny'
norm = 'rmsnorm'
position = 'rope'
activation = 'swiglu'
bias = False
qkv_bias = True
tie_embeddings = False
n_experts = 16
top_k = 4
expert_hidden = 56
n_shared_experts = 4  # one shared expert, 4 x 56 = 224 wide (Qwen1.5-MoE: 4 x 1408)
shared_expert_gate = True
norm_topk_prob = False

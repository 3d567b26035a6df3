# Mixtral's architecture at the CPU recipe's size (config/moe_8e_cpu.py: 4 layers, 128 wide, block 64,
# batch 12, 2000 iterations): RMSNorm, rotary positions, grouped-query attention (4 query heads share
# 2 key/value heads), SwiGLU experts, no biases, untied embeddings; 8 experts, top-2, gates renormalised.
# export.py writes it as a MixtralForCausalLM directory.
# Only the architecture is set here; the sizes and the recipe come first:
#   python prepare.py shakespeare_char && python train.py config/moe_8e_cpu.py config/mixtral_tiny.py
#   python export.py --out_dir=out-mixtral-tiny --to=hf-mixtral-tiny
out_dir = 'out-mixtral-tiny'
n_kv_head = 2
norm = 'rmsnorm'
position = 'rope'
activation = 'swiglu'
bias = False
tie_embeddings = False
n_experts = 8
top_k = 2
expert_hidden = 336  # SwiGLU at 2/3 of 4*n_embd (Llama's rule): about a GELU expert's parameters
norm_topk_prob = True

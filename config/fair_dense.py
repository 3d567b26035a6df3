# Fair MoE-vs-dense family (compare.py's cpu_baby and gpu_owt suites; docs/results.md), 1 of 6:
# the dense reference. nanoGPT's model: one 4*n_embd GELU MLP per block (= config/dense.py).
# Holds nothing equal to anything: every other file of the family is measured against this one.
# Only the FFN shape is set here; the sizes and recipe come first (config/moe_8e_cpu.py, on a CPU):
#   python train.py config/moe_8e_cpu.py config/fair_dense.py
out_dir = 'out-fair-dense'
n_experts = 1

# Fair MoE-vs-dense family, 6 of 6: a dense model with the TOTAL parameter count of
# config/fair_moe_8e_top2.py (routers aside): one MLP 16*n_embd wide = 8 experts x 2*n_embd. It
# spends 4x dense's FFN FLOPs on every token: the other honest bound (what the MoE's parameters would
# buy if every one of them were active). expert_hidden is a number, not a ratio: it is for n_embd=128
# (the CPU recipe); at another width pass --expert_hidden=16*n_embd (compare.py's gpu_owt suite does).
#   python train.py config/moe_8e_cpu.py config/fair_dense_total.py
out_dir = 'out-fair-dense-total'
n_experts = 1
expert_hidden = 2048  # 16 * 128

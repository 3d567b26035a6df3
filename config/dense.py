# The dense baseline of config/moe_8e.py: the same baby GPT with n_experts = 1, i.e. exactly nanoGPT's
# shakespeare_char model (a plain 4*n_embd MLP per block). Everything not set here is train.py's
# default, which is config/moe_8e.py. Compare its val CE with the MoE's:
#   python train.py config/dense.py
# On a CPU: add nanoGPT's recipe, as in config/moe_8e.py (--device=cpu --compile=False --n_layer=4 ...).
# For the dense model of *equal active FLOPs* to top-2 add --expert_hidden=3072 (2 x 4 x n_embd).

out_dir = 'out-dense'
n_experts = 1  # dense: no router, no aux/z losses

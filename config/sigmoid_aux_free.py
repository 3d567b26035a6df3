# DeepSeek-V3 routing: sigmoid scores; experts picked by top-k of score + a per-expert bias that is
# nudged toward balanced load after every optimizer step (bias += rate * sign(mean load - load));
# the bias never enters the gate weights. Only a tiny sequence-level aux loss remains.
#   python train.py config/sigmoid_aux_free.py
out_dir = 'out-sigmoid-aux-free'
router = 'sigmoid'
n_experts = 8
top_k = 2
bias_update_rate = 0.001
balance_scope = 'sequence'
aux_loss_coef = 0.0001

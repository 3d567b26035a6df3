"""
The optimizer set-up: which parameters get which optimizer and which decay. One function, so a new
optimizer (or a new parameter group) is an edit here, not in model.py or train.py.
"""
import inspect

import torch


def fused_adamw_supported(device_type):
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: CUDA only
        return device_type == 'cuda' and 'fused' in inspect.signature(torch.optim.AdamW).parameters


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, foreach=None):
    """AdamW; matmul weights, stacked experts and embeddings decay, biases and norms don't (nanoGPT's
    rule). Fused wherever torch has the kernel (the CPU too: docs/performance.md). A fused or foreach
    call can't mix plain tensors with FSDP2's DTensors (FSDP2 + expert parallelism, whose expert
    shards stay plain), so each kind gets param groups of its own. foreach: force it (tests)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:  # the experts' stacked biases are 2-D, and still biases
            decay = p.dim() >= 2 and not name.endswith(('.b1_EF', '.b2_ED'))
            groups.setdefault((decay, type(p).__name__ == 'DTensor'), []).append(p)
    optim_groups = [{'params': ps, 'weight_decay': weight_decay if decay else 0.0}
                    for (decay, _), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    extra = dict(fused=True) if fused_adamw_supported(device_type) and not foreach else dict(foreach=foreach)
    return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra)

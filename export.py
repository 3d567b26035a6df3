"""
Export a moe-gpt checkpoint as an HF transformers directory (config.json + model.safetensors).

$ python export.py --out_dir=out-mixtral-tiny --to=hf-mixtral-tiny
$ python -c "from transformers import AutoModelForCausalLM as A; print(A.from_pretrained('hf-mixtral-tiny'))"

The HF class is the one whose architecture is the checkpoint's (hf.py, hf_family): GPT2LMHeadModel for
a dense GPT-2-style model; LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM for dense Llama-style
ones; MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM for Llama-style
MoEs (config/<family>_tiny.py train one of each). --family names one (it must fit). When none fits,
export.py says why for each family and writes nothing. A GPT-2-style MoE (the default model with
n_experts > 1) has no HF class at all; --format=native writes it in moe-gpt's own format instead
(model.safetensors + config.json: no pickle, read back by hf.load / --init_from=hf:DIR, not by
transformers). With --check (the default) the written directory is read back with transformers (hf.load
for native) and its logits compared with the checkpoint's. No tokenizer is written: a shakespeare_char
model's characters are in its dataset's meta.json, not in an HF tokenizer.
"""
import json
import os
import sys

import torch

import checkpoint
import configurator

# -----------------------------------------------------------------------------
out_dir = 'out-moe-8e'  # the training run: out_dir/ckpt.pt
to = ''  # the directory to write
family = 'auto'  # auto (the one that fits) | gpt2 | llama | qwen2 | qwen3 | mixtral | olmoe | qwen2_moe | qwen3_moe
format = 'hf'  # hf (transformers' format) | native (moe-gpt's own, for models no HF class computes)
check = True  # read the written directory back and compare its logits with the checkpoint's
overwrite = False  # write into a non-empty --to directory
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def fail(msg, code=2):
    print(f'export.py: error: {msg}', file=sys.stderr)
    sys.exit(code)


if '--help' in sys.argv[1:] or '-h' in sys.argv[1:]:
    print(configurator.usage(DEFAULTS, prog='export.py'))
    sys.exit(0)
try:
    _config, _ = configurator.load(DEFAULTS, sys.argv[1:])
except configurator.ConfigError as e:
    fail(e)
globals().update(_config)
if not to:
    fail('say where to write: --to=DIR')
if format not in ('hf', 'native'):
    fail(f"format={format!r} must be 'hf' or 'native'")
if os.path.isdir(to) and os.listdir(to) and not overwrite:
    fail(f'{to} exists and is not empty (--overwrite=True to write into it)')

import hf  # noqa: E402  (after the arguments: --help works without transformers)
from model import MoEGPT, MoEGPTConfig  # noqa: E402

if family != 'auto' and family not in hf.FAMILIES:
    fail(f"family={family!r} must be 'auto' or one of {', '.join(hf.FAMILIES)}")
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
try:
    ckpt = checkpoint.load(ckpt_path)
    model = MoEGPT(MoEGPTConfig(**ckpt['model_args']))
    model.load_state_dict(checkpoint.strip_compile_prefix(ckpt['model']))
except checkpoint.CheckpointError as e:
    fail(e)
except (ValueError, TypeError, RuntimeError) as e:
    fail(f'{ckpt_path} does not fit this model.py: {str(e).splitlines()[0]}')
model.eval()

try:
    if format == 'native':
        hf.export_native(model, to)
        print(f'wrote {to}: moe-gpt native format (model.safetensors + config.json). transformers cannot load '
              f'it; hf.load("{to}") and train.py --init_from=hf:{to} can')
    else:
        chosen = hf.export(model, to, None if family == 'auto' else family)
        with open(os.path.join(to, 'config.json')) as f:
            arch = (json.load(f).get('architectures') or ['?'])[0]
        print(f'wrote {to}: {arch} ({chosen}); load it with AutoModelForCausalLM.from_pretrained("{to}")')
except hf.UnsupportedCheckpoint as e:
    fail(e)
except ImportError as e:
    fail(f'{e} (or write --format=native, which needs only safetensors)')

if check:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, min(32, model.config.block_size)), generator=g)
    with torch.no_grad():
        ours = model(idx, idx)[0]
        if format == 'native':
            theirs = hf.load(to).eval()(idx, idx)[0]
        else:
            import transformers
            theirs = transformers.AutoModelForCausalLM.from_pretrained(to).eval()(idx).logits
    err = (theirs - ours).abs().max().item() / max(ours.abs().max().item(), 1.0)
    if not err < 1e-4:
        fail(f'the written model gives other logits (max relative difference {err:.2e})', code=1)
    print(f'check: logits match (max relative difference {err:.1e} on {idx.numel()} tokens)')

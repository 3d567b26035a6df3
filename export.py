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
import cli
import configurator

# -----------------------------------------------------------------------------
out_dir = 'out-moe-8e'  # the training run: out_dir/ckpt.pt or ckpt.dcp
to = ''  # the directory to write
family = 'auto'  # auto (the one that fits) | gpt2 | llama | qwen2 | qwen3 | mixtral | olmoe | qwen2_moe | qwen3_moe
format = 'hf'  # hf (transformers' format) | native (moe-gpt's own, for models no HF class computes)
check = True  # read the written directory back and compare its logits with the checkpoint's
overwrite = False  # write into a non-empty --to directory
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def fail(msg, code=cli.BAD_INPUT):
    msg = ' '.join(str(msg).split('\n'))  # one line
    print(f'export.py: error: {msg}', file=sys.stderr)
    sys.exit(code)


def parse(argv):
    """The config of these arguments, every check that needs no checkpoint passed; bad input: one line, exit 2
    (before anything is read or written)."""
    if '--help' in argv or '-h' in argv:
        print(configurator.usage(DEFAULTS, prog='export.py'))
        sys.exit(0)
    try:
        c, _ = configurator.load(DEFAULTS, argv)
    except configurator.ConfigError as e:
        fail(e)
    if not c['to']:
        fail('say where to write: --to=DIR')
    if c['format'] not in ('hf', 'native'):
        fail(f"format={c['format']!r} must be 'hf' or 'native'")
    to = c['to']
    if os.path.exists(to) and not os.path.isdir(to):
        fail(f'--to={to} is a file: name a folder to write (config.json + model.safetensors go in it)')
    if os.path.isdir(to) and os.listdir(to) and not c['overwrite']:
        fail(f'{to} exists and is not empty (--overwrite=True to write into it)')
    parent = os.path.dirname(os.path.abspath(to))
    while not os.path.exists(parent):  # the nearest folder that exists: the one --to is created in
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        fail(f'--to={to}: {parent} is not a writable folder')
    if not os.path.exists(checkpoint.latest(c['out_dir'])):
        fail(f"no checkpoint at {checkpoint.latest(c['out_dir'])}: --out_dir names a training run's folder")
    import hf  # after the arguments: --help works without transformers
    if c['family'] != 'auto' and c['family'] not in hf.FAMILIES:
        fail(f"family={c['family']!r} must be 'auto' or one of {', '.join(hf.FAMILIES)}")
    return c


def main(argv=None):
    c = parse(sys.argv[1:] if argv is None else argv)
    out_dir, to, family, format, check = c['out_dir'], c['to'], c['family'], c['format'], c['check']
    import hf
    from model import MoEGPT, MoEGPTConfig
    ckpt_path = checkpoint.latest(out_dir)  # ckpt.pt or ckpt.dcp, the newer
    try:
        ckpt = checkpoint.load(ckpt_path, tensors='model')
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


if __name__ == '__main__':
    main()

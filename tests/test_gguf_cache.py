"""The GGUF conversion cache is keyed on the file's content: every copy of a file, in any
virtualenv, finds one conversion; attnscope 0.1's path-keyed folders are adopted or ignored."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import attnscope
from attnscope.models import gguf_cache
from attnscope.models.gguf_cache import MARKER, convert_gguf, file_digest, gguf_cache_dir, legacy_cache_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _gguf_bytes(n: int) -> bytes:
    """n bytes that start as every GGUF file does (attnscope checks the magic before anything)."""
    return b"GGUF" + os.urandom(n - 4)


def _no_conversion(monkeypatch):
    def refuse(path, out):
        raise AssertionError(f"converted {path} again")

    monkeypatch.setattr(gguf_cache, "_convert", refuse)


def test_key_is_the_content_not_the_path(tmp_path, cache):
    a, b, c = (tmp_path / d / "model.gguf" for d in ("venv1", "venv2", "venv3"))
    for f in (a, b, c):
        f.parent.mkdir()
    a.write_bytes(os.urandom(3000))
    shutil.copy(a, b)
    c.write_bytes(a.read_bytes()[:-1] + b"x")
    assert gguf_cache_dir(a) == gguf_cache_dir(b) != gguf_cache_dir(c)
    assert gguf_cache_dir(a).name.startswith("sha256-")
    # the digest is remembered per path, and recomputed when the file changes
    memo = list((cache / "gguf" / "digests").glob("*.json"))
    assert len(memo) == 3
    before = file_digest(a)
    a.write_bytes(b"changed")
    assert file_digest(a) != before


def test_a_conversion_is_found_from_another_path(tmp_path, cache, monkeypatch):
    """A converted folder serves every copy of the file; nothing is converted twice."""
    src = tmp_path / "one" / "m.gguf"
    src.parent.mkdir()
    src.write_bytes(_gguf_bytes(2048))
    calls = []

    def fake_convert(path, out):  # stands in for the 25 s dequantisation only
        calls.append(path)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_cache, "_convert", fake_convert)
    first = convert_gguf(src)
    other = tmp_path / "two" / "renamed.gguf"
    other.parent.mkdir()
    shutil.copy(src, other)
    assert convert_gguf(other) == first and len(calls) == 1
    marker = json.loads((first / MARKER).read_text())
    assert marker["sha256"] == file_digest(src) and marker["size"] == 2048


def test_path_keyed_folders_of_attnscope_0_1_are_adopted_or_ignored(tmp_path, cache, monkeypatch):
    src = tmp_path / "venv" / "m.gguf"
    src.parent.mkdir()
    src.write_bytes(_gguf_bytes(4096))
    old = legacy_cache_dir(src)  # what attnscope 0.1 wrote for this path
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"weights")
    (old / "config.json").write_text("{}")
    (old / MARKER).write_text(json.dumps({"gguf": str(src)}))
    # a stale folder whose source changed since: never adopted
    stale_src = tmp_path / "stale.gguf"
    stale_src.write_bytes(src.read_bytes())
    stale = legacy_cache_dir(stale_src)
    shutil.copytree(old, stale)
    (stale / MARKER).write_text(json.dumps({"gguf": str(stale_src)}))
    stale_src.write_bytes(b"not the same any more")
    os.utime(stale_src, (1, 1))
    _no_conversion(monkeypatch)

    copy = tmp_path / "other-venv" / "m.gguf"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    target = convert_gguf(copy)  # another path, same content: the old folder is found by content
    assert target == gguf_cache_dir(src) and target != old
    assert (target / "model.safetensors").stat().st_ino == (old / "model.safetensors").stat().st_ino  # linked
    assert json.loads((target / MARKER).read_text())["adopted_from"] == str(old)
    assert (old / MARKER).is_file()  # the old install keeps its folder

    other = tmp_path / "x.gguf"
    other.write_bytes(b"GGUF different content")
    converted = []
    monkeypatch.setattr(gguf_cache, "_convert", lambda p, out: converted.append(p))
    convert_gguf(other)
    assert converted == [other]  # no old folder matches its content: converted, stale one ignored


def test_smollm2_copy_loads_from_the_same_conversion(smollm2, tmp_path, monkeypatch):
    from attnscope.models.names import smollm2_gguf

    copy = tmp_path / "SmolLM2-copy.gguf"
    shutil.copy(smollm2_gguf(), copy)
    _no_conversion(monkeypatch)
    lm = attnscope.load(str(copy))
    assert lm.path == smollm2.path == str(gguf_cache_dir(smollm2_gguf()))


def test_cache_follows_the_umask(tmp_path, cache, monkeypatch):
    """Digest memos and converted folders get the umask's modes, so a shared cache can be shared
    (mkstemp and mkdtemp alone give 0600 and 0700)."""
    src = tmp_path / "m.gguf"
    src.write_bytes(_gguf_bytes(1024))
    monkeypatch.setattr(gguf_cache, "_convert", lambda path, out: (out / "config.json").write_text("{}"))
    old = os.umask(0o022)
    try:
        folder = convert_gguf(src)
    finally:
        os.umask(old)
    memo, = (cache / "gguf" / "digests").glob("*.json")
    assert memo.stat().st_mode & 0o777 == 0o644
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / MARKER).stat().st_mode & 0o777 == 0o644


def test_a_real_conversion_follows_the_umask(smollm2, cache):
    """transformers' save_pretrained writes model.safetensors 0600 (through a private temporary
    file): the converted folder of a shared cache must be readable by the group, as the umask says."""
    from attnscope.models.names import smollm2_gguf

    old = os.umask(0o027)
    try:
        folder = convert_gguf(smollm2_gguf())  # a fresh cache: a real conversion (~20 s)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()}
    assert modes["model.safetensors"] == 0o640 and set(modes.values()) == {0o640}, modes
    assert folder.stat().st_mode & 0o777 == 0o750


def test_what_is_not_a_gguf_file_or_a_cache_is_named(tmp_path, cache, monkeypatch):
    """Before: both said "<model> has no usable tokenizer"."""
    from attnscope.errors import AttnscopeError, ModelNotFoundError

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(os.urandom(5000))
    with pytest.raises(ModelNotFoundError, match="is not a GGUF file"):
        convert_gguf(fake)
    garbage = tmp_path / "garbage.gguf"  # the magic, then nothing transformers can parse
    garbage.write_bytes(_gguf_bytes(5000))
    with pytest.raises(ModelNotFoundError, match="could not be converted"):
        convert_gguf(garbage)
    assert not [p for p in (cache / "gguf").iterdir() if p.is_dir() and p.name.startswith("sha256-")]  # none half-made
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ATTNSCOPE_CACHE", str(blocker))
    with pytest.raises(AttnscopeError, match="cannot use attnscope's cache .*ATTNSCOPE_CACHE"):
        convert_gguf(garbage)

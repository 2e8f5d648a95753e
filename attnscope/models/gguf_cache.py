"""GGUF files converted once into a safetensors folder, cached by the file's content.

Parsing a GGUF file's metadata takes ~25 s (SmolLM2); the converted folder loads in <1 s. The
cache folder is named after the sha256 of the whole file, so every virtualenv, checkout or copy
of the same GGUF file finds the same conversion (517 MB for SmolLM2), and a changed file gets
a new one. Hashing 94 MB takes ~0.5 s; the digest of each path is remembered (keyed on size,
mtime and inode) so that a large file is hashed once per place it lives.

Caches written by attnscope 0.1 were keyed on the file's absolute path
(`<stem>-<16 hex>`). Such a folder is adopted when its source file still exists unchanged and
has the same content: its files are hard-linked into the content-keyed folder (no copy, the old
folder keeps working for old installs). Any other old folder is ignored and can be deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from attnscope.errors import AttnscopeError, ModelNotFoundError
from attnscope.files import follow_umask, make_private_dir_public, write_json_atomic

MARKER = "attnscope-gguf.json"  # written last: a folder without it is incomplete
_LEGACY_NAME = re.compile(r"^(?P<stem>.+)-(?P<key>[0-9a-f]{16})$")


def cache_root() -> Path:
    """Where attnscope keeps converted models and manifests (`$ATTNSCOPE_CACHE` overrides)."""
    return Path(os.environ.get("ATTNSCOPE_CACHE", Path.home() / ".cache" / "attnscope"))


def _gguf_root() -> Path:
    return cache_root() / "gguf"


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def check_gguf_file(path: Path) -> None:
    """A .gguf path must be a GGUF file (its magic bytes), checked before anything reads it: a
    file of another kind would otherwise fail deep inside transformers' parser."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read {path} ({exc.strerror or exc})") from None
    if head != GGUF_MAGIC:
        raise ModelNotFoundError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                                 "pass a .gguf model file, a model folder or a Hub id")


def _cache_error(exc: OSError) -> AttnscopeError:
    return AttnscopeError(f"cannot use attnscope's cache {cache_root()} ({exc.strerror or exc}: {exc.filename}); "
                          "set ATTNSCOPE_CACHE to a writable folder")


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime, inode)."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    memo = _gguf_root() / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        if all(saved.get(k) == v for k, v in stamp.items()) and len(saved.get("sha256", "")) == 64:
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        write_json_atomic(memo, {**stamp, "sha256": digest})
    except OSError:  # a read-only cache still works, it only hashes again
        pass
    return digest


def gguf_cache_dir(gguf_path: Path) -> Path:
    """The cache folder for a GGUF file: named by its content, the same wherever the file lives."""
    return _gguf_root() / f"sha256-{file_digest(gguf_path)[:32]}"


def legacy_cache_dir(gguf_path: Path) -> Path:
    """Where attnscope 0.1 cached a GGUF file (keyed on its absolute path, size and mtime)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return _gguf_root() / f"{gguf_path.stem}-{key}"


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _new_folder(target: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    make_private_dir_public(tmp)  # mkdtemp makes it 0700; a cache follows the user's umask
    return tmp


def _publish(tmp: Path, target: Path, marker: dict) -> None:
    (tmp / MARKER).write_text(json.dumps(marker), encoding="utf-8")
    if target.exists():  # an incomplete folder from a crash
        shutil.rmtree(target)
    os.replace(tmp, target)  # atomic: a half-written cache is never seen


def _adopt_legacy(gguf_path: Path, digest: str, target: Path) -> Path | None:
    """Hard-link an attnscope 0.1 (path-keyed) conversion of the same content into `target`."""
    size = gguf_path.stat().st_size
    root = _gguf_root()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or not _LEGACY_NAME.match(folder.name) or not _complete(folder):
            continue
        try:
            marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
            source = Path(marker["gguf"])
            # the folder is trustworthy only while its source is the file it was made from
            if (not source.is_file() or source.stat().st_size != size
                    or legacy_cache_dir(source).name != folder.name or file_digest(source) != digest):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        tmp = _new_folder(target)
        try:
            for f in folder.iterdir():
                if f.name == MARKER or not f.is_file():
                    continue
                try:
                    os.link(f, tmp / f.name)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(f, tmp / f.name)
            _publish(tmp, target, {"gguf": str(gguf_path), "sha256": digest, "size": size,
                                   "adopted_from": str(folder)})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    return None


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF file with transformers and save model + tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a gguf-quantised model; the weights are already dequantised
    # to fp32, so dropping the quantiser keeps the logits bit-identical.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    follow_umask(out)  # save_pretrained writes model.safetensors 0600: a shared cache must be readable


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a safetensors folder in the cache; return that folder."""
    from filelock import FileLock

    gguf_path = Path(gguf_path)
    check_gguf_file(gguf_path)
    target = gguf_cache_dir(gguf_path)
    if _complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target) + ".lock")
        lock.acquire()
    except OSError as exc:  # ATTNSCOPE_CACHE (or ~/.cache) is a file, read-only, ...
        raise _cache_error(exc) from None
    try:
        if _complete(target):
            return target
        digest = file_digest(gguf_path)
        if _adopt_legacy(gguf_path, digest, target) is not None:
            return target
        tmp = _new_folder(target)
        try:
            try:
                _convert(gguf_path, tmp)
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise _cache_error(exc) from None  # the disk, not the file
                raise ModelNotFoundError(f"{gguf_path} could not be converted: transformers cannot read it as a "
                                         f"model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                                         ) from exc
            _publish(tmp, target, {"gguf": str(gguf_path), "sha256": digest,
                                   "size": gguf_path.stat().st_size})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return target

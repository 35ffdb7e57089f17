"""Atomic writes and self-describing run folders.

Every file the toolkit writes goes through `atomic_write`: a temporary file in the same folder,
flushed and fsynced, then `os.replace`d over the target. A killed process or a full disk leaves
the previous file intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from smix.errors import UserError

METRICS_FORMAT = "smix.metrics/1"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and move it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        # mkstemp made it 0600 (and a writer may have made it anew): the mode open() would give
        os.chmod(tmp_path, _file_mode(path, tmp_path))
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask(folder: Path) -> int:
    """The process umask, read without changing it (`os.umask` can only set it, and setting
    it for a moment races with other threads creating files): Linux >= 4.7 reports it in
    /proc; elsewhere a probe file created with mode 0666 in `folder` shows its read/write
    bits, all that a new file can lose."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    fd, probe = tempfile.mkstemp(prefix=".umask.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return 0o777 & ~stat.S_IMODE(os.fstat(fd).st_mode) & 0o666
    finally:
        os.close(fd)
        os.unlink(probe)


def _file_mode(path: Path, tmp: Path) -> int:
    """An existing file keeps its permissions; a new one gets 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask(tmp.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write bytes or text to `path` atomically; a folder that cannot be written (missing,
    read-only, a file on the way, a full disk) is a `UserError`, as in `atomic_save`."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_save(path, lambda tmp: tmp.write_bytes(payload))


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Let `writer(tmp_path)` produce the file, then move it into place atomically."""
    try:
        with atomic_path(path) as tmp:
            writer(tmp)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from e


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples and non-finite floats made JSON-safe (NaN becomes null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return to_jsonable(obj.item())
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """A text file a user wrote (a list, a CSV): UTF-8, with or without the byte-order mark
    Notepad and Excel's "CSV UTF-8" write; anything else is one line."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 text (byte {e.start}); save it as "
                        "UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def code_version() -> str:
    """The toolkit version plus the git commit when run from a checkout."""
    from smix import __version__

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def _program(argv0: str) -> str:
    """How the command was started, as a user would retype it: `smix` for the console script,
    `python -m pretrain` for a package's __main__.py (whose own name says nothing)."""
    path = Path(argv0)
    return f"python -m {path.parent.name}" if path.name == "__main__.py" else path.name


def provenance() -> dict[str, str]:
    """Who made a file: code version, torch version, command line, UTC time."""
    import torch

    return {
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "command": " ".join([_program(sys.argv[0]), *sys.argv[1:]]),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def distinct_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The shortest trailing parts of each path that tell them apart, for console lines:
    runs/base/backbone.safetensors and runs/smix/backbone.safetensors give base/backbone…
    and smix/backbone…; distinct file names stay bare."""
    parts = [Path(p).parts for p in paths]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        names = [str(Path(*p[-k:])) if p else "" for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


class RunDir:
    """A self-describing run folder: config.json, metrics.json, log.jsonl and the artefacts.

    `metrics.json` has one schema for every stage so that `smix report` needs no knowledge of
    the stages: {"format", "stage", "kind", "run", "config", "results", "provenance", ...}.
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create run folder {self.path}: {e.strerror or e}") from e

    def file(self, name: str) -> Path:
        return self.path / name

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of writes a kill interrupted (`atomic_path` names them
        `.NAME.XXXX.tmp`; a ResNet-50's resume state is ~300 MB). Returns them."""
        stale = [p for p in self.path.glob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def claim(self, stage: str, kind: str) -> "RunDir":
        """Refuse a folder that holds another stage's (or kind's) run: a stage replaces or
        resumes its own runs there, so it would overwrite or delete another's record (an
        attack pointed at a pretraining run's folder deleted its metrics.json)."""
        try:
            old = json.loads(self.file("metrics.json").read_text())
        except (OSError, ValueError):  # none (or no record this toolkit wrote)
            return self
        if not isinstance(old, dict) or old.get("format") != METRICS_FORMAT:
            return self
        if (old.get("stage"), old.get("kind")) != (stage, kind):
            raise UserError(f"{self.path} holds another run (its metrics.json: stage "
                            f"{old.get('stage')}, kind {old.get('kind')}): choose another --out")
        return self

    def write_config(self, config: Any) -> None:
        write_json(self.file("config.json"), config)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to log.jsonl (appends are line-atomic for small records)."""
        line = json.dumps(to_jsonable(record)) + "\n"
        with open(self.file("log.jsonl"), "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def write_log(self, records: list[dict[str, Any]]) -> None:
        """Replace log.jsonl with exactly `records`, atomically (used to repair it on resume)."""
        atomic_write(self.file("log.jsonl"),
                     "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))

    def read_log(self) -> list[dict[str, Any]]:
        p = self.file("log.jsonl")
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                continue
        return out

    def write_metrics(self, *, stage: str, kind: str, results: Any, config: Any = None,
                      **extra: Any) -> Path:
        record = {
            "format": METRICS_FORMAT,
            "stage": stage,
            "kind": kind,
            "run": self.path.name,
            "config": config,
            "results": results,
            **extra,
            "provenance": provenance(),
        }
        write_json(self.file("metrics.json"), record)
        return self.file("metrics.json")

"""Atomic file writes: a killed run never leaves a half-written or complete-looking result.

A result is written to a hidden temporary file beside it, `.{name}.{pid}-{random}@{host}.tmp`,
then renamed onto it in one step. The temporary file is created with the process's umask (so a
result gets the same permissions as any file the user writes, not mkstemp's 0600), and a writer
killed before the rename (SIGKILL) leaves it behind: the next atomic write into that directory
removes the temporary files of processes of this host that no longer run (`remove_stale_temps`).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

HOST = socket.gethostname()
TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}@(?P<host>[^@/]+)\.tmp$")
LEGACY_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")   # tempfile.mkstemp's names, before the pid was in them


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, every: bool = False) -> list[Path]:
    """Remove the atomic-write temporary files in `directory` whose writer (a process of this
    host) no longer runs; with `every`, all of them, older names included (the caller owns the
    directory: it holds the run's lock). Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP.match(entry.name)
        stale = every and (match is not None or LEGACY_TEMP.match(entry.name) is not None) or (
            match is not None and match["host"] == HOST and not pid_alive(int(match["pid"])))
        if stale and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}@{HOST}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))   # the umask applies
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

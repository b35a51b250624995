"""Files that are whole or absent: staged writes renamed into place, and JSONL files that resume after a kill.

Everything the tools write for others to read (adapters, exports, caches, reports, state) goes through
`staged`: a kill or an error leaves the old file or folder, or none, never a half-written one that looks
finished. Append-only JSONL files (answers, verdicts, generated rows) are read back with `resume_jsonl`.
"""

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def staging_path(target: Path) -> Path:
    """A hidden name beside `target`, unique to this process, keeping its suffix (numpy and gguf look at it)."""
    return target.with_name(f".{target.stem}.{os.getpid()}.staging{target.suffix}")


@contextmanager
def staged(target: str | Path):
    """Yields a path beside `target` to write a file or a folder at; when the block ends without an error that
    path replaces `target` in one rename, and on an error it is removed."""
    target = Path(target)
    staging = staging_path(target)
    _remove(staging)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # os.replace cannot put a folder in place of a non-empty one
    os.replace(staging, target)


def write_text_atomically(path: str | Path, text: str) -> None:
    with staged(path) as staging:
        staging.write_text(text, encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def resume_jsonl(path: str | Path) -> list:
    """The records of a JSONL file that runs append to, for the next run to carry on from. A last line cut by a
    kill is removed from the file (appending after it would glue two records together); a line that is not
    JSON is skipped, so the row it held is done again."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        path.write_bytes(data)
    records = []
    for line in data.decode("utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: str | Path, records: list) -> None:
    """One write for all of `records`, then fsync: a kill loses at most this call's records, never half a line
    that a reader would take for whole."""
    if not records:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "ab") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())

"""Outputs that never lie: atomic files and folders, `--overwrite`, content checksums, the run lock.

Every writer of a file or folder that a later command loads goes through here:
- `atomic_file(path)`: the file is written as a temporary sibling and renamed into place, so a
  reader sees the old file or the whole new one, never a torn one.
- `atomic_folder(dest, kind, overwrite)`: the folder is built as a temporary sibling and renamed
  into place when complete (HF `save_pretrained` and orbax commit the same way). `dest` must be
  missing or empty; with `overwrite` it may hold earlier outputs of the same `kind` (the files that
  kind of writer produces), and is then replaced whole: a new sharded export never lies beside a
  stale `model.safetensors`, and a file the command would not have written is never deleted (its
  presence refuses the overwrite).
- `record_checksums` / `verify_checksums`: size and SHA-256 of every file of a checkpoint, in
  `hiwin_checksums.json`, checked before the checkpoint is read.
- `RunLock`: one writer per run folder (`hiwin train --out`), named in the refusal; a lock whose
  process is gone is taken over.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import threading
from typing import Iterator, Sequence

log = logging.getLogger("hiwin.outputs")

CHECKSUMS_NAME = "hiwin_checksums.json"
LOCK_NAME = "run.lock"
# What marks a folder as an earlier training run's (resumed) rather than someone else's (refused).
RUN_ENTRIES = ("train_config.json", "checkpoints", LOCK_NAME)


class OutputError(OSError):
  """An output folder or file cannot be written as asked (not empty, foreign files, in use, not
  writable). An OSError: the command's user fixes it on the file system."""


class IntegrityError(ValueError):
  """A checkpoint's files are not the ones that were written (missing, truncated, changed)."""


# --- what each kind of writer produces --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OutputKind:
  """The entries (glob patterns on top-level names) a kind of writer produces: with `overwrite`,
  a folder holding only these is replaced; anything else refuses."""
  what: str
  patterns: tuple[str, ...]

  def owns(self, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


# A hiwin parameter checkpoint (`hiwin convert import`, a run's `final/`).
HIWIN_CHECKPOINT = OutputKind("a hiwin parameter checkpoint",
                              ("params", "hiwin_config.json", CHECKSUMS_NAME))
# A PyTorch/HF model folder (`hiwin convert export`, a run's `official/`): the weights and model
# config files a new export supersedes. Tokenizer files and anything else are not ours to delete.
MODEL_FOLDER = OutputKind("a PyTorch model folder",
                          ("config.json", "generation_config.json", "*.safetensors",
                           "*.safetensors.index.json", "pytorch_model*.bin",
                           "pytorch_model.bin.index.json", "*.ckpt"))
# The projector file of stage 1 (`hiwin convert export --format llava-projector`).
PROJECTOR_FOLDER = OutputKind("a projector file folder",
                              ("mm_projector.bin", "mm_projector.safetensors"))


# --- folders and files ------------------------------------------------------------------------

def _entries(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir())


def _shorten(names: Sequence[str], limit: int = 5) -> str:
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_destination(dest: str | os.PathLike, kind: OutputKind, *, overwrite: bool = False,
                      flag: str = "output") -> pathlib.Path:
  """Refuses, before any work is done, an output folder the writer may not replace: a file, a
  non-empty folder without `overwrite`, or one holding anything `kind` does not write. Creates
  the parent folder and checks that it is writable. Returns `dest` as an absolute path."""
  dest = pathlib.Path(os.path.abspath(dest))
  if dest.exists() and not dest.is_dir():
    raise OutputError(f"{flag} {dest}: exists and is not a folder")
  if dest.is_dir():
    names = _entries(dest)
    if names and not overwrite:
      raise OutputError(f"{flag} {dest}: folder is not empty (holds {_shorten(names)}); pass "
                        f"--overwrite to replace it, or choose a new folder")
    foreign = [n for n in names if not kind.owns(n)]
    if foreign:
      raise OutputError(f"{flag} {dest}: --overwrite replaces only {kind.what}, and this folder "
                        f"also holds {_shorten(foreign)}, which this command does not write; "
                        f"move those away or choose a new folder")
  _writable_parent(dest, flag)
  return dest


def probe_writable(folder: pathlib.Path) -> None:
  """Raises the OSError a write into `folder` would raise (as root, permission bits say
  nothing; only a write does)."""
  probe = folder / f".hiwin-probe-{socket.gethostname()}-{os.getpid()}"
  probe.touch()
  probe.unlink()


def _writable_parent(dest: pathlib.Path, flag: str) -> None:
  """Creates `dest`'s parent and proves it writable."""
  try:
    dest.parent.mkdir(parents=True, exist_ok=True)
    probe_writable(dest.parent)
  except OSError as e:
    raise OutputError(f"{flag} {dest}: cannot write into {dest.parent}: "
                      f"{e.strerror or e}") from None


def _temp_sibling(dest: pathlib.Path, tag: str, shared: bool) -> pathlib.Path:
  # Processes of one multi-process run write into the same folder, so its name cannot contain a
  # process id; the run lock makes it unique to the run. Otherwise the host name, the pid
  # (containers on hosts sharing the folder reuse pids) and the thread: threads of one process
  # may write the same file (the metadata processes of a test are threads).
  suffix = ("" if shared else
            f"-{socket.gethostname()}-{os.getpid()}-t{threading.get_native_id()}")
  return dest.parent / f".{dest.name}.{tag}{suffix}"


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, kind: OutputKind, *, overwrite: bool = False,
                  flag: str = "output", primary: bool = True,
                  barrier=None) -> Iterator[pathlib.Path]:
  """Yields an empty temporary sibling of `dest` to write into; when the block completes, it
  replaces `dest` (see the module docstring); when it raises, it is removed and `dest` is as it
  was.

  Multi-process writers (orbax saves from every process) pass `primary` (process 0 prepares and
  commits) and `barrier` (called with a name; every process waits there), and all get the same
  temporary folder. What a killed writer of this host left beside `dest` is cleaned up first
  (`_clean_after_killed_writers`).
  """
  dest = pathlib.Path(os.path.abspath(dest))
  shared = barrier is not None
  tmp = _temp_sibling(dest, "partial", shared)
  if primary:
    _clean_after_killed_writers(dest)
    check_destination(dest, kind, overwrite=overwrite, flag=flag)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that was killed
    tmp.mkdir()
  if barrier is not None:
    barrier(f"atomic_folder:start:{dest}")
  try:
    yield tmp
    if barrier is not None:
      barrier(f"atomic_folder:written:{dest}")
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if primary:
    _replace(tmp, dest, kind, overwrite, flag)
  if barrier is not None:
    barrier(f"atomic_folder:done:{dest}")


def _clean_after_killed_writers(dest: pathlib.Path) -> None:
  """Removes the temporary siblings of `dest` that a writer of this host, now dead, left (its
  pid is in their names); if one was killed between its two renames (`dest` missing, its
  `.old-` sibling there), renames the old folder back first."""
  host = socket.gethostname()
  pattern = re.compile(
      rf"\.{re.escape(dest.name)}\.(partial|old)-{re.escape(host)}-(\d+)(?:-t\d+)?")
  try:
    names = sorted(os.listdir(dest.parent))
  except OSError:
    return  # a parent that is missing or unreadable is reported by check_destination
  for name in names:
    match = pattern.fullmatch(name)
    pid = int(match[2]) if match else 0
    if pid <= 0 or _alive(pid):
      continue
    left = dest.parent / name
    if match[1] == "old" and not os.path.lexists(dest):
      log.warning("restoring %s from %s (its writer, pid %d, died while replacing it)", dest,
                  left, pid)
      os.rename(left, dest)
      continue
    log.warning("removing %s (left by pid %d, which died while writing)", left, pid)
    if left.is_dir() and not left.is_symlink():
      shutil.rmtree(left, ignore_errors=True)
    else:
      left.unlink(missing_ok=True)


def _replace(tmp: pathlib.Path, dest: pathlib.Path, kind: OutputKind, overwrite: bool,
             flag: str) -> None:
  # Checked again: the folder may have changed while the output was being written.
  check_destination(dest, kind, overwrite=overwrite, flag=flag)
  if dest.is_dir() and any(dest.iterdir()):
    old = _temp_sibling(dest, "old", False)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old)
  else:
    os.rename(tmp, dest)  # replaces an empty folder in one step
  _fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
  """An open file (text or binary by `mode`) that becomes `path` when the block completes, or
  leaves `path` untouched when it raises."""
  path = pathlib.Path(path)
  tmp = _temp_sibling(path, "partial", False)
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
  """`path.write_text(text)`, atomically."""
  with atomic_file(path) as f:
    f.write(text)


def _fsync_dir(folder: pathlib.Path) -> None:
  """Makes a rename in `folder` durable (a crash right after it keeps the new entry)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


# --- checksums --------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike, algorithm: str = "sha256", **kw) -> str:
  """Hex digest of a file's content, read in chunks; `kw` go to the hash (`digest_size` for
  blake2b). The hash releases the GIL: files hash in parallel threads."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, lambda: hashlib.new(algorithm, **kw)).hexdigest()


def _files(folder: pathlib.Path, include: Sequence[str] | None) -> list[str]:
  roots = [folder] if include is None else [folder / name for name in include]
  return sorted(str(p.relative_to(folder)) for root in roots
                for p in ([root] if root.is_file() else root.rglob("*"))
                if p.is_file() and p.name != CHECKSUMS_NAME)


def _hash_all(folder: pathlib.Path, names: Sequence[str]) -> list[str]:
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(lambda n: file_digest(folder / n), names))


def record_checksums(folder: str | os.PathLike, include: Sequence[str] | None = None) -> None:
  """Writes `folder/hiwin_checksums.json`: the size and SHA-256 of every file under `folder`
  (or under its entries `include`)."""
  folder = pathlib.Path(folder)
  names = _files(folder, include)
  files = {n: {"size": (folder / n).stat().st_size, "sha256": h}
           for n, h in zip(names, _hash_all(folder, names))}
  write_text(folder / CHECKSUMS_NAME,
             json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))


def has_checksums(folder: str | os.PathLike) -> bool:
  return (pathlib.Path(folder) / CHECKSUMS_NAME).is_file()


def verify_checksums(folder: str | os.PathLike) -> None:
  """Checks every file `hiwin_checksums.json` records (sizes first, then hashes); raises
  IntegrityError naming the first file that is missing, truncated or changed."""
  folder = pathlib.Path(folder)
  path = folder / CHECKSUMS_NAME
  try:
    recorded = json.loads(path.read_text(encoding="utf-8"))["files"]
    sizes = {n: int(r["size"]) for n, r in recorded.items()}
    hashes = {n: str(r["sha256"]) for n, r in recorded.items()}
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
          ValueError) as e:
    raise IntegrityError(f"{path}: unreadable checksum file ({type(e).__name__})") from None
  for name in sorted(recorded):
    p = folder / name
    if pathlib.PurePath(name).is_absolute() or ".." in pathlib.PurePath(name).parts:
      raise IntegrityError(f"{path}: names {name!r}, which is outside {folder}")
    if not p.is_file():
      raise IntegrityError(f"{p}: missing (recorded in {CHECKSUMS_NAME})")
    size = p.stat().st_size
    if size != sizes[name]:
      raise IntegrityError(f"{p}: {size} bytes, {sizes[name]} were written (truncated or "
                           f"changed)")
  names = sorted(recorded)
  for name, digest in zip(names, _hash_all(folder, names)):
    if digest != hashes[name]:
      raise IntegrityError(f"{folder / name}: content differs from what was written "
                           f"(SHA-256 mismatch)")


# --- the run lock -----------------------------------------------------------------------------

_HELD: dict[pathlib.Path, "RunLock"] = {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class RunLock:
  """An exclusive lock on a run folder: `folder/run.lock`, held with `flock` and naming its holder
  (pid, host, start time, command).

  `flock` is released by the kernel when the holder dies, so a crashed run never blocks the next
  one. Where the file system has no `flock`, the recorded pid and host decide: a lock of this
  host whose pid is gone is stale and taken over; another host's lock is refused (its pid cannot
  be checked from here). Re-entrant within a process (the CLI claims the folder before it builds
  the run, the run loop claims it again).
  """

  def __init__(self, folder: str | os.PathLike):
    self.folder = pathlib.Path(os.path.abspath(folder))
    self.path = self.folder / LOCK_NAME
    self._fd: int | None = None
    self._depth = 0

  @classmethod
  def acquire(cls, folder: str | os.PathLike) -> "RunLock":
    folder = pathlib.Path(os.path.abspath(folder))
    lock = _HELD.get(folder) or cls(folder)
    if lock._depth == 0:
      lock._take()
      _HELD[folder] = lock
    lock._depth += 1
    return lock

  def release(self) -> None:
    self._depth -= 1
    if self._depth:
      return
    _HELD.pop(self.folder, None)
    if self._fd is not None:
      # The file stays (unlinking a flocked file races with a process opening it); emptied, so
      # that where there is no flock the record does not block the next run.
      try:
        os.ftruncate(self._fd, 0)
      except OSError as e:
        log.warning("could not clear %s: %s", self.path, e.strerror or e)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _holder(self) -> dict | None:
    """The recorded holder: {} for an empty file (no holder), None for one that is unreadable
    or garbled (no dict naming a positive integer pid)."""
    try:
      text = self.path.read_text(encoding="utf-8")
      if not text.strip():
        return {}
      holder = json.loads(text)
    except (OSError, ValueError):
      return None
    pid = holder.get("pid") if isinstance(holder, dict) else None
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
      return None  # (os.kill(0, 0) would signal our own process group: "alive")
    return holder

  def _refuse(self, holder: dict | None, *, unchecked: bool = False) -> OutputError:
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
           f"{holder.get('started', '?')}" if holder else "another process")
    hint = (f"; if no run uses it, remove {self.path}" if unchecked else "")
    return OutputError(f"--out {self.folder}: in use by another run ({who}); wait for it to "
                       f"finish or choose another folder{hint}")

  def _lock(self, fd: int) -> dict | None:
    """Takes the flock on `fd` or raises the refusal. Where the file system has no flock, the
    record decides: no holder, or a holder of this host whose pid is gone (returned: stale),
    may be taken over; a garbled record or another host's (its pid cannot be checked from
    here) is refused."""
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return None
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
        raise self._refuse(self._holder()) from None
    holder = self._holder()
    if holder == {}:
      return None
    if holder is None:
      raise OutputError(f"--out {self.folder}: {self.path} is not a lock record this version "
                        f"wrote; if no run uses the folder, remove {self.path}")
    if holder.get("host") == socket.gethostname() and not _alive(holder["pid"]):
      return holder
    raise self._refuse(holder, unchecked=True)

  def _take(self) -> None:
    try:
      self.folder.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise OutputError(f"--out {self.folder}: cannot write there: {e.strerror or e}") from None
    try:
      stale = self._lock(fd)
    except OutputError:
      os.close(fd)
      raise
    if stale:
      log.warning("taking over the stale lock of pid %s in %s", stale["pid"], self.path)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)}
    try:
      os.ftruncate(fd, 0)
      os.write(fd, json.dumps(me).encode())
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      raise OutputError(f"--out {self.folder}: cannot write there: {e.strerror or e}") from None
    self._fd = fd


def check_run_folder(folder: str | os.PathLike) -> pathlib.Path:
  """Refuses, without creating or changing anything, a training run's folder that is not missing,
  empty or an earlier run's (`RUN_ENTRIES`; it is resumed), or that a live run holds. Returns it
  as an absolute path."""
  folder = pathlib.Path(os.path.abspath(folder))
  if folder.exists() and not folder.is_dir():
    raise OutputError(f"--out {folder}: exists and is not a folder")
  names = _entries(folder) if folder.is_dir() else []
  if names and not any(n in names for n in RUN_ENTRIES):
    raise OutputError(f"--out {folder}: folder is not empty and is not a hiwin run folder (holds "
                      f"{_shorten(names)}); choose a new or empty folder, or an earlier run's to "
                      f"resume it")
  if LOCK_NAME in names and folder not in _HELD:  # (a second open of our own lock conflicts)
    lock = RunLock(folder)
    try:
      fd = os.open(lock.path, os.O_RDONLY)
    except OSError:
      return folder
    try:
      lock._lock(fd)  # closing the file drops a flock it took
    finally:
      os.close(fd)
  return folder


def claim_run_folder(folder: str | os.PathLike) -> RunLock:
  """`check_run_folder`, then the folder's lock."""
  return RunLock.acquire(check_run_folder(folder))

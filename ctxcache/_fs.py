"""The one guarded door to every file and folder the cache owns.

Everything under the cache root is read, written, listed and removed through these functions, never
with a bare ``open`` / ``read_bytes`` / ``is_dir``: a planted symlink must not make ctxcache read or
write outside the root, a FIFO or device planted where a small file belongs must not hang a launch
(``open()`` of a FIFO blocks until a writer comes), and a folder someone else can write into must not
be trusted (whoever can write the cache can hand this process any context to load). The rule for a
folder is :func:`check_folder`; the rule for a file is :func:`open_regular`.

The OS calls that Windows refuses for open files (rename, replace, unlink, rmtree: a sharing violation,
winerror 32 / 5) go through :data:`ops`, the documented seam that tests use to inject such refusals on
Linux.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_BINARY = getattr(os, "O_BINARY", 0)
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _BINARY


class OsCalls:
    """The OS calls that can fail with a sharing violation on Windows (a file held open elsewhere).

    A seam: tests replace attributes of :data:`ops` to refuse them the way Windows does. ``unlink`` and
    ``rmdir`` take ``dir_fd`` where the platform supports it (removal relative to an open folder).
    """

    def __init__(self) -> None:
        self.rename: Callable[[str, str], None] = os.rename
        self.replace: Callable[[str, str], None] = os.replace
        self.unlink: Callable[..., None] = os.unlink
        self.rmdir: Callable[..., None] = os.rmdir


ops = OsCalls()


def path_limit() -> int | None:
    """The longest path the OS takes, where it is short enough to matter: Windows' MAX_PATH (260) unless
    long paths are enabled for this Python; ``None`` elsewhere. A seam: tests play Windows with it."""
    if sys.platform != "win32":
        return None
    try:  # pragma: no cover - Windows
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as k:
            if winreg.QueryValueEx(k, "LongPathsEnabled")[0] == 1:
                return None
    except OSError:  # pragma: no cover - Windows
        pass
    return 260  # pragma: no cover - Windows


def sharing_violation(e: OSError) -> bool:
    """Whether ``e`` is Windows refusing to rename or delete a file another process holds open."""
    return getattr(e, "winerror", None) in (5, 32, 33) or (sys.platform == "win32" and isinstance(e, PermissionError))


# -- folders ------------------------------------------------------------------------------------------
class UnsafeFolder(PermissionError):
    """A cache folder that is a link, not a folder, or owned / writable by another user."""


def _private_group(gid: int, uid: int) -> bool:
    """Whether ``gid`` is ``uid``'s own user-private group (Debian/Ubuntu: umask 002 makes folders
    group-writable, harmlessly, when nobody else is in the group; Debian's ssh accepts it too)."""
    try:
        import grp
        import pwd

        user = pwd.getpwuid(uid)
        members = grp.getgrgid(gid).gr_mem
    except (ImportError, KeyError, OSError):
        return False
    return gid == user.pw_gid and all(m == user.pw_name for m in members)


def owner_problem(st: os.stat_result, path: Path | str, advice: str = "") -> str | None:
    """Why what has this ``lstat`` result can be changed by another user, or ``None``: the one ownership
    rule, for the cache's folders and for every trust anchor and import folder (:func:`path_problem`).

    ssh's StrictModes for key files: owned by this user (or root, for system-wide installs) and not
    writable by anyone else (a user-private group excepted).
    """
    if not hasattr(os, "getuid"):
        return None  # Windows: ACLs, not mode bits; the per-user app-data folder is private already
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}, not by this user ({uid}){advice}"
    others = stat.S_IWOTH | stat.S_IWGRP
    if st.st_mode & others and not (st.st_mode & stat.S_IWOTH == 0 and _private_group(st.st_gid, uid)):
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); run: chmod go-w {path}"
    return None


def folder_problem(st: os.stat_result, path: Path) -> str | None:
    """Why a folder with this ``lstat`` result must not be trusted, or ``None`` (:func:`owner_problem`)."""
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link, not a folder"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    return owner_problem(st, path, "; use a cache folder of your own")


def _prefixes(path: str) -> list[str]:
    """``/a/b/c`` -> ``["/", "/a", "/a/b", "/a/b/c"]`` (an absolute, normalised path)."""
    out = []
    head = path
    while True:
        out.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    return out[::-1]


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why another user could change what lies at ``path`` (a file or a folder), or ``None``.

    For what the process trusts without checking each use (a ``trusted_dirs`` folder, a
    ``trusted_keys`` file, a folder a child process imports from): the thing itself and every folder
    above it must pass :func:`owner_problem`, both along the path as written and along the path its
    links resolve to (whoever can write a folder on the way can swap what lies below it). A folder
    above with the sticky bit (``/tmp``), owned by root or this user, is fine: others cannot rename or
    remove what is in it. A missing path is a problem too (it could be created by someone else).
    """
    given = os.path.abspath(os.fspath(path))
    real = os.path.realpath(given)
    seen: set[str] = set()
    for chain in (given, real):
        prefixes = _prefixes(chain)
        for i, comp in enumerate(prefixes):
            if comp in seen:
                continue
            seen.add(comp)
            try:
                st = os.lstat(comp)
            except FileNotFoundError:
                return f"{comp} does not exist"
            except OSError as e:
                return f"cannot check {comp}: {e.strerror or e}"
            if stat.S_ISLNK(st.st_mode):
                continue  # as safe as the folder holding it (checked) and what it resolves to (the real chain)
            last = i == len(prefixes) - 1
            if not last and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and (
                    not hasattr(os, "getuid") or st.st_uid in (0, os.getuid())):
                continue
            problem = owner_problem(st, comp)
            if problem is not None:
                return problem
    return None


def check_folder(path: Path) -> None:
    """Raise :class:`UnsafeFolder` unless ``path`` is a real folder this user alone can write into.

    ``FileNotFoundError`` when it does not exist.
    """
    st = os.lstat(path)
    problem = folder_problem(st, path)
    if problem is not None:
        raise UnsafeFolder(errno.EPERM, problem, str(path))


def make_folder(path: Path) -> None:
    """Create ``path`` owner-only if missing, then check it with :func:`check_folder`."""
    try:
        check_folder(path)
        return
    except FileNotFoundError:
        pass
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_folder(path)


# -- reading ------------------------------------------------------------------------------------------
def open_regular(path: Path) -> int:
    """A read descriptor on ``path`` if it is a regular file (not a link, FIFO or device); else ``OSError``."""
    fd = os.open(path, _READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: Path, limit: int) -> bytes:
    """The first ``limit + 1`` bytes of a small regular file (a result longer than ``limit`` tells the
    caller the file is too big). ``FileNotFoundError`` when missing, another ``OSError`` when it is a
    link, a FIFO, a device or a folder."""
    fd = open_regular(path)
    try:
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def lstat(path: Path) -> os.stat_result:
    return os.lstat(path)


def can_write(folder: Path) -> bool:
    """Whether a file can really be created in ``folder``: permission bits say nothing for root, a
    read-only mount or /proc. The file is anonymous (created with O_EXCL, gone when closed)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def is_folder(path: Path) -> bool:
    """A real folder (a link to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def exists(path: Path) -> bool:
    """Anything at ``path``, a dangling link included."""
    return os.path.lexists(path)


def names(folder: Path) -> list[str]:
    """The names in a folder; ``[]`` when it is missing, unreadable, or not a real folder."""
    if not is_folder(folder):
        return []
    try:
        return os.listdir(folder)
    except OSError:
        return []


def iter_children(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(name, lstat)`` of each child; links are reported, never followed."""
    for name in names(folder):
        try:
            yield name, os.lstat(folder / name)
        except OSError:
            continue


# -- writing ------------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable. No-op where folders cannot be opened (Windows)."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = open_regular(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_exclusive(path: Path, mode: int = 0o600) -> int:
    """A write descriptor on a NEW file (never an existing one, never through a link)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _BINARY, mode)


def write_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet (a note beside an entry, a staged manifest)."""
    fd = create_exclusive(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix.

    A unique temp name in the same folder (created exclusively: a planted link at that name is refused),
    fsync, then ``os.replace`` (huggingface_hub and pip do the same). ``durable=False`` skips the fsyncs
    for data that is cheap to recompute (the hash memo).
    """
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    try:
        fd = create_exclusive(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        replace_with_retry(tmp, path)
    except BaseException:
        try:
            ops.unlink(str(tmp))
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def replace_with_retry(src: Path, dst: Path, tries: int = 5) -> None:
    """``os.replace``; on Windows a reader holding ``dst`` for a moment makes it fail: retry briefly."""

    for attempt in range(tries):
        try:
            ops.replace(str(src), str(dst))
            return
        except OSError as e:
            if not sharing_violation(e) or attempt == tries - 1:
                raise
            time.sleep(0.01 * (attempt + 1))


def append_line(path: Path, line: bytes) -> int:
    """Append one line to a plain file of the cache (O_APPEND: atomic between processes); returns its size."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _BINARY, 0o600)
    try:
        st = os.fstat(fd)
        # A hard link shares its inode with a file elsewhere: appending would write there too.
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(errno.EINVAL, "not a plain file of the cache (a link?)", str(path))
        os.write(fd, line)
        return st.st_size + len(line)
    finally:
        os.close(fd)


def touch(path: Path) -> None:
    """Set a file's mtime to now without following a link."""
    try:
        os.utime(path, follow_symlinks=False)
    except (OSError, NotImplementedError):
        pass


def rename(src: Path, dst: Path) -> None:
    ops.rename(str(src), str(dst))


# -- removing -----------------------------------------------------------------------------------------
def remove_file(path: Path) -> bool:
    """Unlink a file or link (never what it points at). ``False`` when it could not be removed."""
    try:
        ops.unlink(str(path))
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


_DIR_FD = os.unlink in os.supports_dir_fd and os.rmdir in os.supports_dir_fd and os.scandir in os.supports_fd


def remove_tree(path: Path) -> bool:
    """Delete ``path`` whatever it is: a folder (its links are removed, never followed), a file or a link.

    Returns whether nothing is left. Where the OS allows it the walk holds each folder open
    (``O_NOFOLLOW | O_DIRECTORY``) and removes names relative to it, so a folder swapped for a link while
    the walk runs cannot lead it outside the cache. A sharing violation (Windows) leaves the rest for the
    next housekeeping.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return remove_file(path)
    if _DIR_FD:
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return False
        try:
            _empty_at(fd)
        finally:
            os.close(fd)
        try:
            ops.rmdir(str(path))
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True
    for name, child in list(iter_children(path)):  # pragma: no cover - Windows
        if stat.S_ISDIR(child.st_mode):
            remove_tree(path / name)
        else:
            remove_file(path / name)
    try:  # pragma: no cover - Windows
        ops.rmdir(str(path))
    except OSError:
        return not os.path.lexists(path)
    return True


def _empty_at(fd: int) -> None:
    """Remove everything inside the open folder ``fd`` (best effort), never following a link."""
    with os.scandir(fd) as it:
        children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for name, is_dir in children:
        if is_dir:
            try:
                sub = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_DIRECTORY", 0), dir_fd=fd)
            except OSError:
                continue  # swapped for a link or a file meanwhile: removed as a name below, or left
            try:
                _empty_at(sub)
            finally:
                os.close(sub)
            try:
                ops.rmdir(name, dir_fd=fd)
            except OSError:
                pass
        else:
            try:
                ops.unlink(name, dir_fd=fd)
            except OSError:
                pass


def tree_size(path: Path) -> int:
    """Bytes under ``path`` (links counted as themselves, never followed)."""
    total = 0
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    for _name, child in iter_children(path):
        if stat.S_ISDIR(child.st_mode):
            total += tree_size(path / _name)
        else:
            total += child.st_size
    return total


# -- processes ----------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a reused pid reads as alive: the safe answer)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    # A zombie (dead, not yet reaped: an orphan in a container whose pid 1 does not reap) answers kill(0).
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read(512).rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True

"""
How every script of this project meets its user: one line for every failure the user can fix,
a stated exit code, files that are whole or absent, and one process at a time per output.

    2    a mistake in the input (a flag, a path, a file), or a disk or permission problem
    1    the training diverged (textteacher.py)
    130  Ctrl-C: the line says how to continue

textteacher.py, caption_embed.py, caption_images.py and the tools in experiments/ and
benchmarks/ all end through run(); caption_embed.py imports this file and not textteacher.py.
"""
import contextlib
import functools
import os
import sys
import tempfile

try:
    import fcntl  # POSIX; on Windows no output is locked
except ImportError:
    fcntl = None


class UserError(Exception):
    """A mistake in the input (a flag, a path, a file): one line on stderr, exit code 2."""
    code = 2


def need(ok, message):
    """A check on the input: a one-line UserError with the message unless ok."""
    if not ok:
        raise UserError(message)


def os_error(e, path=None):
    """An OSError as a UserError that names the path and the cause, e.g. "cannot write x.pt:
    No space left on device"; FileExistsError from makedirs means a file where a folder goes."""
    why = f"{e.filename} is a file" if isinstance(e, FileExistsError) else e.strerror or e
    return UserError(f"cannot write {path or e.filename}: {why}")


def save_atomic(write, path):
    """write(file) into a temporary file beside path, then rename it into place: a crash
    mid-write leaves the previous file whole, never a torn one (a SIGKILL may leave the
    temporary file, which nothing reads and the next save of the same file replaces). A failed
    write (a full disk, no permission) is reported in one line with the path and its cause."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer wraps the OSError in a RuntimeError
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise  # not a failed write: a bug
        raise os_error(cause, path) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def writable(folder, path=None):
    """folder, once it is clear, in one line, that it can be written: before the work, not after
    an hour of it. With path (a file to be written there) the line names that file."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise (os_error(e, path) if path else UserError(
            f"cannot write to {folder}: {e.strerror or e}")) from None
    return folder


_held = {}  # lock file -> open file: the locks this process holds


def lock(path, what="output"):
    """Claim path (a file or a folder that this process is about to write) for this process:
    a second process that claims it is refused in one line naming the first. The claim is a
    lock file beside path (.NAME.lock) with a POSIX lock on it, which the operating system drops
    when the process ends, however it ends: a killed run leaves at most an unclaimed lock file.
    (Not flock: a flock is shared with forked children, so a killed trainer's data loader
    workers would hold it on.)
    Held until release(path), which deletes the file, or the end of the process; claiming a
    path again in the same process (a retry after an error) replaces the earlier claim."""
    path = os.path.abspath(path)
    lock_file = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    release(path)
    try:  # also the check that the folder can be written, before any work
        os.makedirs(os.path.dirname(lock_file), exist_ok=True)
        f = open(lock_file, "a+")
    except OSError as e:
        raise UserError(f"cannot write to {os.path.dirname(path)}: {e.strerror or e}") from None
    if fcntl is None:
        return f.close()
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # the holder may have deleted the file between our open and our lock: then the lock
        # is on a file nobody else sees, and the claim goes to whoever made the new one
        if os.path.exists(lock_file) and os.path.samestat(os.fstat(f.fileno()),
                                                           os.stat(lock_file)):
            f.truncate(0)
            f.write(f"process {os.getpid()} ({' '.join(sys.argv)[:200]})")
            f.flush()
            _held[path] = (f, lock_file)
            return
        raise BlockingIOError
    except OSError:  # EAGAIN or EACCES: another process holds it
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{path} is being written by {holder}: wait for it to end, or write "
                        f"another {what}") from None


def release(path):
    """Give up the claim of lock(path), if this process holds one."""
    f, lock_file = _held.pop(os.path.abspath(path), (None, None))
    if f is not None:
        with contextlib.suppress(OSError):
            os.remove(lock_file)  # still holding the lock: see the check in lock()
        f.close()


def releasing(function):
    """function, but the claims (lock) it makes are released when it returns or raises: a tool
    that calls it in its own process, and goes on after an error, holds nothing it no longer
    writes."""
    def wrapped(*args, **kwargs):
        before = set(_held)
        try:
            return function(*args, **kwargs)
        finally:
            for path in set(_held) - before:
                release(path)
    return functools.wraps(function)(wrapped)


def run(main, argv=None, interrupted="run the same command again to continue"):
    """Call main(argv) the way every script of the project ends: a UserError or an OSError in
    one line on stderr with its exit code, Ctrl-C in one line (exit 130) saying how to go on;
    anything else is a bug and keeps its traceback. `interrupted` may be a function of nothing
    that returns the line's advice when it depends on what main got to (a run's name)."""
    try:
        return main(argv)
    except UserError as e:
        # An error raised in a DataLoader worker arrives with the worker's traceback in its
        # text: the user needs only its last line, without the class name
        message = str(e).strip().splitlines()[-1].split("UserError: ")[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(e.code)
    except OSError as e:  # a file or a disk the user can fix
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        advice = interrupted() if callable(interrupted) else interrupted
        print(f"interrupted; {advice}", file=sys.stderr)
        sys.exit(130)

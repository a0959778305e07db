"""
How every script of this project meets its user: one line for every failure the user can fix,
a stated exit code, files that are whole or absent, and one process at a time per output.

    2        a mistake in the input (a flag, a path, a file), or a disk or permission problem
    1        the training diverged (textteacher.py)
    128 + N  signal N: Ctrl-C (SIGINT, 130), SIGTERM (143: what kill, systemd, SLURM and
             Kubernetes send before SIGKILL), SIGHUP (129: the terminal closed); all end alike,
             in one line that says how to continue

textteacher.py, caption_embed.py, caption_images.py and the tools in experiments/ and
benchmarks/ all end through run(); caption_embed.py imports this file and not textteacher.py.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import re
import signal
import sys
import tempfile

try:
    import fcntl  # POSIX; on Windows no output is locked
except ImportError:
    fcntl = None


# The signals that end a job, each as Ctrl-C does: SIGINT, SIGTERM, and SIGHUP where the
# system has it (not on Windows).
SIGNALS = (signal.SIGINT, signal.SIGTERM,
           *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


def _interrupted_while_starting(signum, frame):
    # os._exit, not sys.exit: an exception raised inside torch's C++ import code aborts the
    # process with a core dump; and while importing, nothing is open that needs closing
    print(f"{interrupted_by(signum)} while starting; nothing was done: run the command again",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)


# A signal while a script of the project imports torch and the rest (seconds) is one line, not
# a traceback through the import machinery: each script imports this file first, and run()
# turns the signals into a KeyboardInterrupt when its work begins. Only for a script of the
# project run as a command: a test runner importing these files keeps its own handlers.
if os.path.abspath(sys.argv[0] if sys.argv else "").startswith(
        os.path.dirname(os.path.abspath(__file__)) + os.sep):
    with contextlib.suppress(ValueError):  # not the main thread: Python keeps its handler
        for _s in SIGNALS:
            signal.signal(_s, _interrupted_while_starting)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP inside run(): a KeyboardInterrupt, so that whatever cleans up after
    Ctrl-C (the trainer's atomic saves, a study's workers) cleans up after them too."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def interrupted_by(signum):
    """"interrupted" for Ctrl-C, "interrupted by SIGTERM" for the others."""
    return "interrupted" + ("" if signum == signal.SIGINT else
                            f" by {signal.Signals(signum).name}")


class UserError(Exception):
    """A mistake in the input (a flag, a path, a file): one line on stderr, exit code 2."""
    code = 2


class Diverged(UserError):
    """textteacher.py: the loss or the gradient became NaN or infinite; exit code 1."""
    code = 1


def need(ok, message):
    """A check on the input: a one-line UserError with the message unless ok."""
    if not ok:
        raise UserError(message)


def within(value, allowed):
    """Whether the number value lies in allowed, an interval written "[1, 100]", "(0, inf)",
    "[0, 1)": a bracket includes its end, a parenthesis excludes it. NaN is in none, and an
    infinity only where its end is written inf and included (no flag's is)."""
    lo, hi = (float(x) for x in allowed[1:-1].split(","))
    if not math.isfinite(value):
        return False
    return ((lo <= value) if allowed[0] == "[" else (lo < value)) and (
        (value <= hi) if allowed[-1] == "]" else (value < hi))


def number(kind, allowed):
    """An argparse type: the text as kind (int or float) within allowed (see within). What is
    not a number, not finite, or out of range is argparse's one line, which names the flag:
    "argument --lr: must be a number in (0, inf), got nan"."""
    what = "an integer" if kind is int else "a number"

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} in {allowed}, got {text!r}") from None
        if not within(value, allowed):
            raise argparse.ArgumentTypeError(f"must be {what} in {allowed}, got {text}")
        return value
    convert.kind, convert.allowed = kind, allowed  # the declaration, which tests read back
    return convert


HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # a Hugging Face model id: NAME or ORG/NAME


def path(kind, names=(), hub=False):
    """An argparse type for a path, checked as the flags are read, so that a wrong one ends in
    argparse's one line naming the flag before any work ("argument --captions: no file c.txt").
    kind is what the command does with it:
        "file", "folder", "file or folder"   reads it: it must exist, as that
        "new file", "new folder"             writes it: it may be absent (no file where a
                                             folder on its way must go), else it is that kind
    names: the words the flag takes besides a path (named data sets; "" for none), or a
    function that tells them; hub: a Hugging Face model id (ORG/NAME) too, which only its
    loader can check. An existing path is taken as a path before a Hub id, as transformers
    does; a name before a path, as the trainer does with --data."""
    wanted = kind.replace("new ", "")

    def convert(text):
        if names(text) if callable(names) else text in names:
            return text
        if not text:
            raise argparse.ArgumentTypeError(f"is empty: name a {wanted}")
        if os.path.exists(text):
            found = "folder" if os.path.isdir(text) else "file"
            if found not in wanted.split(" or "):
                raise argparse.ArgumentTypeError(f"{text} is a {found}: name a {wanted}")
            return text
        if hub and HUB_NAME.fullmatch(text):
            return text
        if kind.startswith("new "):  # the nearest folder that exists holds what is made
            above = os.path.dirname(os.path.abspath(text))
            while not os.path.exists(above):
                above = os.path.dirname(above)
            if os.path.isdir(above):
                return text
            raise argparse.ArgumentTypeError(f"cannot make {text}: {above} is a file")
        words = [n for n in names if n] if isinstance(names, tuple) else []
        other = ([f"a name ({', '.join(words)})"] if words else []) + (
            ["a Hugging Face model name"] if hub else [])
        raise argparse.ArgumentTypeError(f"no {wanted} {text}" + (
            f", nor {' or '.join(other)}" if other else ""))
    convert.path_kind = kind  # the declaration, which tests read back
    return convert


def device(text):
    """An argparse type: a torch device this machine has, by its name ("auto": cuda where
    there is one, else cpu); a device that is not there is one line naming the flag."""
    import torch  # only here: most commands need no device from their flags
    name = text.replace("auto", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(name)
    except RuntimeError:  # torch's own message is a list of every device type it knows
        raise argparse.ArgumentTypeError(f"{text} is not a device: auto, cpu, cuda, cuda:1, "
                                         "mps") from None
    if kind.type == "cuda" and torch.cuda.device_count() <= (kind.index or 0):
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()}"
                                         " CUDA GPUs; use cpu or auto")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no mps device; use cpu")
    return name


device.kinds = ("auto", "cpu", "cuda", "cuda:N", "mps")  # the declaration, which tests read


def some_of(options):
    """An argparse type: a comma-separated list of some of options (a tuple), as a list; one
    that is not among them is argparse's one line naming the flag."""
    def convert(text):
        chosen = [x for x in text.split(",") if x]
        unknown = [x for x in chosen if x not in options]
        if unknown:
            raise argparse.ArgumentTypeError(f"{','.join(unknown)}: choose among "
                                             f"{','.join(options)}")
        return chosen
    convert.options = options  # the declaration, which tests read back
    return convert


def names(count, form):
    """An argparse type: count comma-separated names (form shows them, "KEY,CAPTION"), as a
    tuple; another count, or an empty name, is argparse's one line naming the flag."""
    def convert(text):
        chosen = tuple(x.strip() for x in text.split(","))
        if len(chosen) != count or not all(chosen):
            raise argparse.ArgumentTypeError(f"must be {count} names, {form}; got {text!r}")
        return chosen
    convert.form = form  # the declaration, which tests read back
    return convert


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other input error
        raise UserError(f"{message} (see --help)")


def memory(device="auto"):
    """Bytes of memory a step can use: the first GPU's (device "auto" where there is one),
    else the machine's RAM (math.inf where the system does not say)."""
    import torch  # only here: caption_embed.py imports this file before it needs torch
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    if hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return math.inf


# ----------------------------------------------------------------------------
# Text as editors write it: every text file the project reads goes through read_text

# UTF-16 with its byte-order mark (what Windows' Notepad calls "Unicode") besides UTF-8
BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def read_text(path):
    """(text, raw bytes) of a text file: UTF-8 with or without a byte-order mark, or UTF-16 with
    one; every line ending (Windows' CR LF, the old Mac's CR, Unix's LF) made LF. Any other
    encoding is one line naming the file and the first byte that is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    codec = next((c for bom, c in BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} in position "
                        f"{e.start}): save it as UTF-8") from None
    # NUL is valid UTF-8 but in no text: UTF-16 without its byte-order mark reads so
    need("\0" not in text, f"{path} holds NUL bytes (UTF-16 without a byte-order mark?): save "
         "it as UTF-8")
    return text.replace("\r\n", "\n").replace("\r", "\n"), raw


def read_table(path, columns, text=None):
    """[(line number, {column: value})] of a table with a header line, by its extension: .csv
    (commas), .tsv (tabs), .jsonl (one JSON object per line; columns are its fields). A row
    that lacks one of the columns, or has more fields than the header, is one line naming
    it; blank lines are no rows. text: the file's, if it was read already."""
    import csv
    import io
    ext = os.path.splitext(path)[1].lower()
    text = read_text(path)[0] if text is None else text
    if ext == ".jsonl":
        rows = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: a caption may hold \u2028
            try:
                rows += [(n, json.loads(line))] if line.strip() else []
            except ValueError:
                raise UserError(f"{path}, line {n}: not a JSON object") from None
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if ext == ".tsv"
                                else ",")
        try:
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise UserError(f"{path}, line {reader.line_num}: {e}") from None
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        need(not missing, f"{path} has no column {', '.join(missing)} (its header: "
             f"{', '.join(reader.fieldnames or [])}): name the columns with --columns")
    for n, row in rows:
        need(isinstance(row, dict) and None not in row and all(isinstance(row.get(c), str)
                                                               for c in columns),
             f"{path}, line {n}: expected the columns {', '.join(columns)}")
    return rows


def json_or(path, default):
    """The JSON value in the file path, or default if the file is absent, is not JSON, or holds
    a value of another type than default's."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return default
    return value if isinstance(value, type(default)) else default


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
        if isinstance(cause, KeyboardInterrupt):  # Ctrl-C in torch.save: the zip writer's
            raise KeyboardInterrupt from None     # complaint about its torn file is no news
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
    one line on stderr with its exit code, a signal (Ctrl-C, SIGTERM, SIGHUP) in one line
    (exit 128 + N) saying how to go on; anything else is a bug and keeps its traceback.
    `interrupted` may be a function of nothing that returns the line's advice when it depends
    on what main got to (a run's name)."""
    with contextlib.suppress(ValueError):  # from here on each is a KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s in SIGNALS[1:]:
            signal.signal(s, _stop)
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
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        advice = interrupted() if callable(interrupted) else interrupted
        print(f"{interrupted_by(signum)}; {advice}", file=sys.stderr)
        sys.exit(128 + signum)

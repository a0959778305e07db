"""Helpers shared by test_textteacher.py, tests/test_bad_input.py and tests/test_tools.py: a tiny
image folder, an embeddings file written without caption_embed.py, a stand-in text encoder, and
ways to run textteacher.py in this process or as a command.

The tiny data: 3 classes, 64 training and 11 validation PNGs each, 16x20 px. Each class has a
colour of its own under the noise, so a few steps learn it; 3 x 11 = 33 validation images, an
odd number that two ranks cannot split evenly. With --img-size 16 --patch-size 8 the micro ViT
sees 4 patches: a step takes milliseconds.
"""
import json
import os
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import textteacher as tt  # noqa: E402
import tqdm  # noqa: E402
tqdm.tqdm.monitor_interval = 0  # no monitor thread: Forked forks the test process

# One thread: the tiny models gain nothing from more, and on a busy machine a second thread
# makes every step wait for the slowest core (a step fell from 40 ms to seconds).
torch.set_num_threads(1)

TEXT_DIM = 16
TIMING = {"images_per_s", "epoch_time"}  # the only entries of metrics.jsonl equal runs differ in


# ----------------------------------------------------------------------------
# data

def write_folder(root, classes=("a", "b", "c"), train=64, val=11, size=(16, 20), ext="png"):
    """root/{train,val}/CLASS/CLASS_SPLIT_NNN.EXT; returns the training keys (file names) in
    ImageFolder's order (classes sorted, then files sorted)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    keys = []
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            colour = np.array([(60 + 90 * c) % 256, (200 - 70 * c) % 256, (40 + 150 * c) % 256])
            for i in range(n):
                pixels = colour + rng.normal(0, 40, (*size, 3))
                file = f"{name}_{split}_{i:03d}.{ext}"
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                    os.path.join(root, split, name, file))
                if split == "train":
                    keys.append(file)
    return keys


def image_features(root, keys, dim=TEXT_DIM, split="train"):
    """Stand-in caption embeddings that the images predict: a fixed random projection of each
    training image's mean colour in its four quadrants, plus an offset shared by all (which
    centring must remove)."""
    from PIL import Image
    proj = torch.randn(12, dim, generator=torch.Generator().manual_seed(1))
    rows = []
    for key in keys:
        cls = key.split("_")[0]
        img = torch.from_numpy(np.asarray(Image.open(os.path.join(root, split, cls, key)),
                                          dtype=np.float32)) / 255  # [H, W, 3]
        h, w = img.shape[0] // 2, img.shape[1] // 2
        quads = [img[:h, :w], img[:h, w:], img[h:, :w], img[h:, w:]]
        rows.append(torch.cat([q.mean((0, 1)) for q in quads]))
    x = torch.stack(rows)  # standardised with fixed statistics, the same for every split
    return 3 * (x - 0.5) / 0.15 @ proj / 12 ** 0.5 + 5


def write_embeddings(path, keys, vectors, level="image", **changes):
    """An embeddings file in the documented format, written without caption_embed.py; `changes`
    add or replace fields (e.g. split="val")."""
    vectors = torch.as_tensor(vectors, dtype=torch.float32).contiguous()
    torch.save({**dict(format="textteacher-embeddings-v1", embeddings=vectors, keys=list(keys),
                       level=level, split="train", mean=vectors.mean(0), std=vectors.std(0),
                       encoder="test", pooling="none", source_sha256="", dataset=""),
                **changes}, path)
    return str(path)


def bag_of_words(captions, dim=TEXT_DIM):
    """A stand-in text encoder: the sum of a fixed random vector per word."""
    def word(w):
        return torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
    return torch.stack([sum(word(w) for w in c.split()) for c in captions])


def make_data(base):
    """(data folder, embeddings file of its 192 training images, their keys) under base."""
    root = os.path.join(str(base), "pets")
    keys = write_folder(root)
    text = write_embeddings(os.path.join(str(base), "text.pt"), keys, image_features(root, keys))
    return root, text, keys


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(data folder, embeddings file, training keys), once per test module."""
    return make_data(tmp_path_factory.mktemp("data"))


def base_args(folder, out, *more):
    """A small run on the tiny folder with text: 6 steps of 32 per epoch, 2 epochs, the paper's
    recipe otherwise (LAMB, 3-Augment, CutMix, stochastic depth: --preset imagenet, which a
    folder of such small images would not get by itself)."""
    root, text, _ = folder
    return ["--data", root, "--preset", "imagenet", "--text", text, "--img-size", "16",
            "--patch-size", "8",
            "--model", "micro", "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1",
            "--workers", "0", "--log-every", "10", "--threads", "1", "--out-dir", str(out),
            *more]


# every source of randomness on: stochastic depth, CutMix, 3-Augment (6 steps of 32 per epoch)
RANDOM = ["--drop-path", "0.1", "--cutmix", "1.0", "--augment", "3aug"]
CHEAP = ["--augment", "crop", "--cutmix", "0"]  # where augmentation is not the point


def sensitive(args):
    """Make a step proportional to the gradient: AdamW with eps 1 moves each weight by about
    lr * g / (|g| + 1) ~ g, no clipping, no warm-up; so a gradient scaled by 2 (a missing
    1 / accum, a sum instead of a mean over ranks) shows in the weights."""
    return args + ["--optimizer", "adamw", "--opt-eps", "1", "--lr", "1", "--weight-decay", "0",
                   "--clip-grad", "0", "--warmup-epochs", "0", "--epochs", "1", "--batch-size",
                   "64", "--drop-path", "0"] + CHEAP


# ----------------------------------------------------------------------------
# running textteacher.py

def run(argv):
    """textteacher.main in this process; returns the exit code (0 when it returns)."""
    try:
        tt.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def command_here(script, argv):
    """The script as a command, in this process: its __main__ block (cli.run, with the script's
    own advice after a signal) with sys.argv as typed; returns the exit code."""
    import runpy
    saved = sys.argv
    sys.argv = [os.path.join(ROOT, script), *map(str, argv)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved
    return 0


def signal_at_step(monkeypatch, n, signum, where=(tt, "step_losses")):
    """The trainer sends itself signum in its n-th training step (counted from 1): what a
    command gets from kill, systemd or a terminal at a known moment. where: the (module, name)
    of the function called once a step (an objective of its own calls another)."""
    module, name = where
    real, calls = getattr(module, name), []

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(module, name, counted)


def ended(pids=(), group=None, timeout=60):
    """Whether every process of pids, and of the process group `group`, has ended within
    timeout seconds (a zombie has: it only waits for its parent). Reads /proc (Linux)."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:  # pid (name) state ppid pgrp ...
                    state, _, pgrp = f.read().rsplit(") ", 1)[1].split()[:3]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if state != "Z" and (int(pid) in pids or int(pgrp) == group):
                alive.append(pid)
        if not alive:
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.05)


def one_line(stderr):
    """The single line of stderr (asserting that there is exactly one)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def fails(capsys, argv, code=2):
    """Run in this process; assert the exit code and exactly one stderr line; return it."""
    capsys.readouterr()
    got = run(argv)
    err = capsys.readouterr().err
    assert got == code, (got, err)
    return one_line(err)


def metrics(run_dir):
    with open(os.path.join(str(run_dir), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def untimed(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run_dir)]


def checkpoint(run_dir):
    return torch.load(os.path.join(str(run_dir), "checkpoint.pt"), weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def snapshot(folder):
    """Every file under folder with its bytes: to show that a refused command wrote nothing."""
    out = {}
    for dirpath, _, files in os.walk(str(folder)):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(dirpath, name)] = f.read()
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crash_in_epoch(monkeypatch, n):
    """The machine dies at the evaluation of epoch n (after epoch n - 1 was checkpointed)."""
    evaluate, calls = tt.evaluate, []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("power cut")
        return evaluate(*a, **k)
    monkeypatch.setattr(tt, "evaluate", crash)


def poison_at_call(monkeypatch, n, value=float("inf")):
    """Make the loss of the n-th call of step_losses (counted from 1) non-finite."""
    real, calls = tt.step_losses, []

    def step_losses(*a, **k):
        calls.append(1)
        loss, *rest = real(*a, **k)
        return (loss * value if len(calls) == n else loss), *rest
    monkeypatch.setattr(tt, "step_losses", step_losses)
    return calls


class Forked:
    """A command as a process of its own, forked from the test process: everything the test
    process imported (torch, transformers, the project) is there already, so it starts in
    milliseconds where a new interpreter takes seconds. Otherwise it is the command as typed:
    its own pid (and session, with new_session), a new interpreter's signal handlers, the
    script run as __main__ with sys.argv, stdout a pipe
    (read it live, as from a Popen), stderr collected, the exit code as Popen gives it (-N
    for death by signal N). Fork is safe here: a test process has one Python thread, and the
    child runs torch on one thread, as a DataLoader worker does. A signal while the command
    imports needs a new interpreter: tests/test_interrupts.py starts those with subprocess."""

    def __init__(self, script, args, env=None, new_session=False):
        import tempfile
        import threading
        assert threading.active_count() == 1, f"fork beside threads: {threading.enumerate()}"
        read, write = os.pipe()
        self.err = tempfile.TemporaryFile("w+", encoding="utf-8")
        sys.stdout.flush(), sys.stderr.flush()
        self.pid, self.returncode = os.fork(), None
        if self.pid == 0:
            self._child(str(script), list(map(str, args)), env, new_session, write)
        os.close(write)
        self.stdout = open(read, encoding="utf-8")

    def _child(self, script, args, env, new_session, write):
        code = 1
        try:
            import io
            import runpy
            import signal
            if new_session:
                os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            for fd, target in ((0, null), (1, write), (2, self.err.fileno())):
                os.dup2(target, fd)
            sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a new interpreter's
            for s in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            torch.set_num_threads(1)
            sys.argv, sys.path[0] = [script, *args], os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:  # as the interpreter ends on it
            code = e.code or 0 if isinstance(e.code, (int, type(None))) else 1
            if code == 1 and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            with __import__("contextlib").suppress(Exception):
                sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        import time
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def communicate(self, timeout=None):
        out = self.stdout.read()  # to its end: the command has closed it, ending
        self.wait(timeout)
        self.err.seek(0)
        return out, self.err.read()

    @property
    def stderr(self):  # what the command wrote to stderr so far
        self.err.seek(0)
        return self.err

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self):
        import signal
        self.send_signal(signal.SIGKILL)


PAUSING = """
import os, sys, time
sys.path.insert(0, {root!r})
import textteacher as tt
real, calls = tt.step_losses, []


def step_losses(*a, **k):  # the command, paused in its {at}-th micro-batch
    calls.append(1)
    if len(calls) == {at}:
        print("PAUSED", flush=True)
        deadline = time.time() + {seconds}  # or until the test writes the file {go!r}
        while time.time() < deadline and not os.path.exists({go!r}):
            time.sleep(0.02)
    return real(*a, **k)


tt.step_losses = step_losses
tt.main(sys.argv[1:])
"""


def start_paused(tmp_path, args, at, seconds=2.0, **popen):
    """textteacher.py as a command (its main), which prints PAUSED and sleeps in the at-th call
    of step_losses, for `seconds` or until release(tmp_path): a signal sent then arrives at a
    known step. Returns the process (Forked: it starts without importing anything)."""
    script = os.path.join(str(tmp_path), "paused.py")
    with open(script, "w") as f:
        f.write(PAUSING.format(root=ROOT, at=at, seconds=seconds,
                               go=os.path.join(str(tmp_path), "paused.go")))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return Forked(script, args, env, new_session=popen.get("start_new_session", False))


def release(tmp_path):
    """Let the command of start_paused(tmp_path, ...) go on at once."""
    open(os.path.join(str(tmp_path), "paused.go"), "w").close()


def wait_for_pause(p, timeout=120):
    """Read p's stdout until PAUSED (p must be still running)."""
    import time
    deadline = time.time() + timeout
    for line in p.stdout:
        if line.strip() == "PAUSED":
            return
        assert time.time() < deadline, "the run never reached its pause"
    raise AssertionError(f"the run ended before its pause: {p.wait()} {p.stderr.read()}")

"""
Every signal that ends a job (Ctrl-C's SIGINT, SIGTERM from kill, systemd, SLURM or Kubernetes,
SIGHUP when the terminal closes) at any moment of textteacher.py: while it imports, in the
first epoch (no checkpoint yet), in a later epoch, and inside the writing of a checkpoint. Each
ends in one line and exit code 128 + N, leaves the previous checkpoint whole, and its advice,
followed, finishes the run as an uninterrupted run would have. (A study's workers under the
same signals: tests/test_runner.py.)
"""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from common import (CHEAP, ROOT, base_args, checkpoint, cli, untimed, one_line,
                    run, start_paused, wait_for_pause)
from common import folder  # noqa: F401  (a fixture)

SAVE_PAUSING = """
import os, sys, time
sys.path.insert(0, {root!r})
import cli, textteacher as tt


class Slow:  # a file whose {write}-th write of the {save}-th save pauses: inside torch.save
    def __init__(self, f, pause):
        self.f, self.pause, self.writes = f, pause, 0

    def write(self, data):
        self.writes += 1
        if self.pause and self.writes == {write}:
            print("PAUSED", flush=True)
            time.sleep({seconds})
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


saves = []


def save_atomic(write, path):
    if path.endswith("checkpoint.pt"):
        saves.append(1)
    pause = path.endswith("checkpoint.pt") and len(saves) == {save}
    return cli.save_atomic(lambda f: write(Slow(f, pause)), path)


tt.save_atomic = save_atomic
tt.main(sys.argv[1:])
"""


def args_of(folder, tmp_path, name):
    return base_args(folder, tmp_path, "--name", name, "--epochs", "3", "--ckpt-every", "0",
                     *CHEAP)


SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "interrupted by SIGTERM",
           signal.SIGHUP: "interrupted by SIGHUP"}


def interrupt(p, signum=signal.SIGINT):
    """Send the signal; the line, once p has ended as the signal says (128 + N), without a
    traceback; its words up to the first ';' are the signal's."""
    p.send_signal(signum)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signum, err
    assert "Traceback" not in err
    line = one_line(err)
    assert line.startswith(SIGNALS[signum] + "; "), line
    return line.replace(SIGNALS[signum], "interrupted", 1)


COMMANDS = sorted(os.path.relpath(p, ROOT) for pattern in ("*.py", "experiments/*.py",
                                                           "benchmarks/*.py")
                  for p in glob.glob(os.path.join(ROOT, pattern))
                  if "__main__" in open(p).read() and not p.endswith("cli.py"))


def interrupt_while_importing_torch(procs, timeout=60):
    """A signal to each process as soon as it has loaded torch's library: it is then inside
    `import torch`, which every command imports after cli.py (Linux: the memory map names the
    library). All are watched at once: none may finish its imports before its turn. procs:
    {name: (Popen, signal)}."""
    pending, deadline = dict(procs), time.time() + timeout
    while pending and time.time() < deadline:
        for name, (p, signum) in list(pending.items()):
            with open(f"/proc/{p.pid}/maps") as f:
                if "libtorch" in f.read():
                    p.send_signal(signum)
                    del pending[name]
        time.sleep(0.002)
    assert not pending, f"never imported torch: {', '.join(pending)}"


def first_imports(path):
    """The modules a script imports at its top level, in order."""
    import ast
    names = []
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append((node.module or "").split(".")[0])
    return names


def test_every_command_imports_cli_before_torch_and_the_rest():
    """What makes a signal while a command starts one line: cli.py installs its handlers as
    it is imported, so every command imports it before torch (seconds) and before any module
    of the project that imports torch. Read from each command's source; the handler itself is
    sent every signal by the test below."""
    heavy = {"torch", "torchvision", "transformers", "numpy", "scipy", "PIL", "textteacher",
             "imagesets", "caption_embed", "compare", "analysis", "transfer", "shapes",
             "study", "features", "photos", "captions", "distill", "lamb", "gpu_check"}
    for command in COMMANDS:
        names = first_imports(os.path.join(ROOT, command))
        assert "cli" in names, command
        assert not heavy & set(names[:names.index("cli")]), (command, names)


# Each signal to a command of each kind while it imports torch: the trainer, a study, a tool
STARTING = {"textteacher.py": signal.SIGINT, "experiments/captions.py": signal.SIGTERM,
            "caption_embed.py": signal.SIGHUP}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc (Linux)")
def test_a_signal_while_importing_is_one_line():
    """Stopped while it imports torch and the rest (all at once, so that the test takes the
    time of one): one line, exit 128 + N, no traceback through the imports."""
    assert set(STARTING) <= set(COMMANDS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {c: (subprocess.Popen([sys.executable, os.path.join(ROOT, c), "--help"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env), signum) for c, signum in STARTING.items()}
    interrupt_while_importing_torch(procs)
    for command, (p, signum) in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 128 + signum and "Traceback" not in err, (command, err)
        line = one_line(err)
        assert line == (f"{SIGNALS[signum]} while starting; nothing was done: run the command "
                        "again"), command


@pytest.fixture
def uninterrupted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert run(args_of(folder, out, "r")) == 0
    return untimed(out / "r")


def test_ctrl_c_in_the_first_epoch_advises_a_new_start_that_works(folder, tmp_path,
                                                                  uninterrupted):
    args = args_of(folder, tmp_path, "r")
    p = start_paused(tmp_path, args, at=2)
    wait_for_pause(p)
    line = interrupt(p)
    assert line == "interrupted; no checkpoint was written yet: run the same command again"
    assert not os.path.exists(tmp_path / "r" / "checkpoint.pt")
    assert run(args) == 0  # the advice, followed
    assert untimed(tmp_path / "r") == uninterrupted


# SIGHUP takes SIGTERM's handler (cli._stop), under its own number: sent while importing
# above; SIGINT in a later epoch, to the whole process group with data workers, is
# test_textteacher.py's test_ctrl_c_stops_in_one_line_and_resume_...
@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_a_signal_in_a_later_epoch_advises_the_resume_that_works(folder, tmp_path, uninterrupted,
                                                                 signum):
    args = args_of(folder, tmp_path, "r")
    p = start_paused(tmp_path, args, at=8)  # 6 steps per epoch: in epoch 2
    wait_for_pause(p)
    line = interrupt(p, signum)
    run_dir = os.path.join(str(tmp_path), "r")
    assert line == f"interrupted; continue from the last checkpoint: --resume {run_dir}"
    assert checkpoint(run_dir)["epoch"] == 1
    assert run(line.split(": ", 1)[1].split()) == 0  # the advice, followed
    assert untimed(run_dir) == uninterrupted


def test_ctrl_c_inside_a_checkpoint_write_keeps_the_last_one(folder, tmp_path, uninterrupted):
    """Interrupted in the middle of torch.save of the second checkpoint (inside its zip
    writer): one line, the first checkpoint whole and unchanged, no temporary file left, and
    the advised --resume finishes the run."""
    args = args_of(folder, tmp_path, "r")
    script = tmp_path / "pausing.py"
    script.write_text(SAVE_PAUSING.format(root=ROOT, write=3, save=2, seconds=30))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    wait_for_pause(p)
    run_dir = os.path.join(str(tmp_path), "r")
    before = open(os.path.join(run_dir, "checkpoint.pt"), "rb").read()
    line = interrupt(p)
    assert line == f"interrupted; continue from the last checkpoint: --resume {run_dir}"
    assert open(os.path.join(run_dir, "checkpoint.pt"), "rb").read() == before
    assert checkpoint(run_dir)["epoch"] == 1
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    assert cli("--resume", run_dir).returncode == 0
    assert untimed(run_dir) == uninterrupted

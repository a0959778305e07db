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

from common import CHEAP, ROOT, base_args, checkpoint, one_line, run, signal_at_step, untimed
from common import folder  # noqa: F401  (a fixture)
import cli  # noqa: E402
import textteacher as tt  # noqa: E402

def args_of(folder, tmp_path, name):
    return base_args(folder, tmp_path, "--name", name, "--epochs", "3", "--ckpt-every", "0",
                     *CHEAP)


SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "interrupted by SIGTERM",
           signal.SIGHUP: "interrupted by SIGHUP"}


def sent_here(monkeypatch, capsys, args, signum, at):
    """The command in this process, which sends itself signum at the at-th call of
    step_losses: the handler cli.run installs for every command meets the signal at a known
    step, as a process's would (the process boundary is tested where it is the point: while
    importing, below; a terminal's Ctrl-C to a trainer and its data workers in
    test_textteacher.py; a study and its workers in tests/test_runner.py; compare.py under
    SIGTERM in tests/test_tool_errors.py). Returns the one line, as interrupt() does."""
    with monkeypatch.context() as mp:
        signal_at_step(mp, at, signum)
        capsys.readouterr()
        code = run(args)
    return ended_by(signum, code, capsys.readouterr().err)


def ended_by(signum, code, err):
    """The line of a command that signum ended with exit code, asserted as interrupt() says."""
    assert code == 128 + signum, err
    assert "Traceback" not in err
    line = one_line(err)
    assert line.startswith(SIGNALS[signum] + "; "), line
    return line.replace(SIGNALS[signum], "interrupted", 1)


def interrupt(p, signum=signal.SIGINT):
    """Send the signal; the line, once p has ended as the signal says (128 + N), without a
    traceback; its words up to the first ';' are the signal's."""
    p.send_signal(signum)
    out, err = p.communicate(timeout=120)
    return ended_by(signum, p.returncode, err)


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
             "study", "features", "photos", "captions", "fixedtarget", "distill", "lamb",
             "gpu_check"}
    for command in COMMANDS:
        names = first_imports(os.path.join(ROOT, command))
        assert "cli" in names, command
        assert not heavy & set(names[:names.index("cli")]), (command, names)


# Each signal to a command of each kind while it imports torch: the trainer, a study, a tool
STARTING = {"textteacher.py": signal.SIGHUP, "experiments/captions.py": signal.SIGINT,
            "caption_embed.py": signal.SIGTERM}


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


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    """The run that never stopped, once: every interrupted one below must end equal to it."""
    out = tmp_path_factory.mktemp("whole")
    assert run(args_of(folder, out, "r")) == 0
    return untimed(out / "r")


def test_ctrl_c_in_the_first_epoch_advises_a_new_start_that_works(folder, tmp_path,
                                                                  uninterrupted, monkeypatch,
                                                                  capsys):
    args = args_of(folder, tmp_path, "r")
    line = sent_here(monkeypatch, capsys, args, signal.SIGINT, at=2)
    assert line == "interrupted; no checkpoint was written yet: run the same command again"
    assert not os.path.exists(tmp_path / "r" / "checkpoint.pt")
    assert run(args) == 0  # the advice, followed
    assert untimed(tmp_path / "r") == uninterrupted


# SIGHUP takes SIGTERM's handler (cli._stop), under its own number: sent while importing
# above; SIGINT in a later epoch, to the whole process group with data workers, is
# test_textteacher.py's test_ctrl_c_stops_in_one_line_and_resume_...
@pytest.mark.parametrize("signum", [signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_a_signal_in_a_later_epoch_advises_the_resume_that_works(folder, tmp_path, uninterrupted,
                                                                 signum, monkeypatch, capsys):
    args = args_of(folder, tmp_path, "r")
    line = sent_here(monkeypatch, capsys, args, signum, at=8)  # 6 steps per epoch: epoch 2
    run_dir = os.path.join(str(tmp_path), "r")
    assert line == f"interrupted; continue from the last checkpoint: --resume {run_dir}"
    assert checkpoint(run_dir)["epoch"] == 1
    assert run(line.split(": ", 1)[1].split()) == 0  # the advice, followed
    assert untimed(run_dir) == uninterrupted


class Interrupting:
    """A file whose 3rd write sends this process SIGINT: inside torch.save's zip writer."""

    def __init__(self, f, before):
        self.f, self.before, self.writes = f, before, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            self.before.append(open(self.f.name[:-len(".tmp")], "rb").read())
            os.kill(os.getpid(), signal.SIGINT)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_ctrl_c_inside_a_checkpoint_write_keeps_the_last_one(folder, tmp_path, uninterrupted,
                                                             monkeypatch, capsys):
    """Interrupted in the middle of torch.save of the second checkpoint (inside its zip
    writer): one line, the first checkpoint whole and unchanged, no temporary file left, and
    the advised --resume finishes the run."""
    args, saves, before = args_of(folder, tmp_path, "r"), [], []

    def save_atomic(write, path):
        saves.append(path.endswith("checkpoint.pt"))
        if path.endswith("checkpoint.pt") and sum(saves) == 2:
            return cli.save_atomic(lambda f: write(Interrupting(f, before)), path)
        return cli.save_atomic(write, path)
    with monkeypatch.context() as mp:
        mp.setattr(tt, "save_atomic", save_atomic)
        capsys.readouterr()
        code = run(args)
    line = ended_by(signal.SIGINT, code, capsys.readouterr().err)
    run_dir = os.path.join(str(tmp_path), "r")
    assert line == f"interrupted; continue from the last checkpoint: --resume {run_dir}"
    assert len(before) == 1  # the first checkpoint, as it was when the second began
    assert open(os.path.join(run_dir, "checkpoint.pt"), "rb").read() == before[0]
    assert checkpoint(run_dir)["epoch"] == 1
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    assert run(["--resume", run_dir]) == 0  # the advice, followed
    assert untimed(run_dir) == uninterrupted

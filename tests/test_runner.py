"""
The one study runner (experiments/runner.py): a study of two cells (one seed) on the tiny
folder, run by its workers, stopped every way a job is stopped (SIGINT to the study alone,
SIGTERM, SIGKILL; SIGHUP takes SIGTERM's path, and tests/test_interrupts.py sends it to a
command as it starts), each time with no worker left behind; its advice followed, it ends with
the very results of a study never stopped.
"""
import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from common import ROOT, ended, make_data, one_line, untimed

EXPERIMENTS = os.path.join(ROOT, "experiments")
sys.path.insert(0, EXPERIMENTS)
import runner  # noqa: E402

STUDY = """
import dataclasses, json, os, sys
sys.path.insert(0, {experiments!r})
import runner  # and textteacher in the workers alone: the study starts in a fraction of a second

ROOT = "runs"
PAUSE = os.environ.get("PAUSE_AT")  # a file each worker touches at every step: it is training


def prepare(args):
    pass


def runs(args):
    import textteacher as tt
    out = []
    for seed in (0,):
        for cell in ("baseline", "text"):
            cfg, _ = tt.parse_config(["--data", args.data, "--text", {text!r}, "--img-size", "16",
                                      "--patch-size", "8", "--model", "micro", "--batch-size",
                                      "32", "--epochs", "2", "--workers", "0", "--threads", "1",
                                      "--augment", "crop", "--seed", str(seed)])
            if cell == "baseline":
                cfg = dataclasses.replace(cfg, text_loss_lambda=0.0)
            out.append(runner.Run(os.path.join(args.root, cell, f"seed{{seed}}"), cfg))
    return out


def report(args):
    values = {{c: runner.finals({{0: os.path.join(args.root, c, "seed0")}}, 2)
              for c in ("baseline", "text")}}
    line, out = runner.paired_row("text", "clean", values["text"], values["baseline"])
    with open(os.path.join(args.docs, "result.json"), "w") as f:
        json.dump(dict(out, baseline=values["baseline"]), f)


if PAUSE and "--worker" in sys.argv:  # slow every step, so that a signal finds a run under way
    import textteacher as tt
    real = tt.step_losses

    def step_losses(*a, **k):
        open(PAUSE, "a").close()
        import time
        time.sleep(0.05)
        return real(*a, **k)
    tt.step_losses = step_losses

def main(argv=None):
    return runner.main(sys.modules[__name__], "a tiny study", argv, data="")


if __name__ == "__main__":
    runner.run(main)
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(the study script, its data folder)"""
    base = tmp_path_factory.mktemp("study")
    root, text, _ = make_data(base)
    script = base / "tiny_study.py"
    script.write_text(STUDY.format(experiments=EXPERIMENTS, text=text))
    return str(script), root


def start(script, data, out, pause, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PAUSE_AT=str(pause))
    return subprocess.Popen([sys.executable, script, "--data", data, "--root", str(out / "runs"),
                             "--docs", str(out), "--workers", str(WORKERS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


WORKERS = 1  # the rule is the same for any number; each worker costs an import of torch


def workers_of(p, timeout=120):
    """The pids of the study p's workers, once all are running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                              text=True).stdout.split()
        if len(kids) == WORKERS and all(os.path.exists(f"/proc/{k}") for k in kids):
            return [int(k) for k in kids]
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.1)
    raise AssertionError("the workers never started")


def wait_training(pause, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(pause):
        assert time.time() < deadline, "no worker ever trained"
        time.sleep(0.05)
    os.remove(pause)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_a_study_stopped_every_way_leaves_no_worker_and_continues_to_the_same_results(
        study, tmp_path):
    script, data = study
    whole = tmp_path / "whole"  # the study never stopped: its workers' work, in this process
    spec = importlib.util.spec_from_file_location("tiny_study", script)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    args = argparse.Namespace(data=data, root=str(whole / "runs"), docs=str(whole))
    runner.work(tiny.runs(args))
    tiny.report(args)
    expected = json.loads((whole / "result.json").read_text())
    assert len(expected["values"]) == 1 and expected["seeds"] == [0]

    out, pause = tmp_path / "stopped", tmp_path / "pause"
    out.mkdir()
    stops = [  # (how, the exit code of the study); Ctrl-C to the terminal's process group
        # reaches the workers themselves too: test_textteacher.py's group Ctrl-C
        (lambda p: p.send_signal(signal.SIGINT), 130),  # kill -INT PID: the study alone
        (lambda p: p.send_signal(signal.SIGTERM), 143),  # kill PID, systemd, SLURM
        (lambda p: p.kill(), -9),  # SIGKILL: the workers notice by themselves
    ]
    for stop, code in stops:
        p = start(script, data, out, pause, start_new_session=True)
        kids = workers_of(p)
        wait_training(pause)
        stop(p)
        err = p.communicate(timeout=120)[1]
        assert p.returncode == code, err
        if code > 0:
            assert "Traceback" not in err
            assert one_line(err).endswith("every run keeps its last checkpoint: run the same "
                                          "command again to continue"), err
        assert ended(kids), f"workers {kids} outlived their study ({code})"
    p = start(script, data, out, "")  # the advice, followed
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert json.loads((out / "result.json").read_text()) == expected
    for cell in ("baseline", "text"):
        assert untimed(out / "runs" / cell / "seed0") == untimed(whole / "runs" / cell / "seed0")


def test_paired_rows_pair_by_seed_and_count_the_positive_seeds():
    line, out = runner.paired_row("x", "clean", {0: 50.0, 1: 52.0, 2: 49.0},
                                  {0: 48.0, 2: 50.0, 3: 40.0})
    assert out["seeds"] == [0, 2] and out["diff"][0] == pytest.approx(0.5)
    assert out["diff"][1] == pytest.approx(2.1213203, rel=1e-6) and out["positive"] == 1
    assert line == "| x | clean | 3 | 50.33 ± 1.53 | **+0.50 ± 2.12** (1 of 2) |"
    line = runner.paired_row("x - y", "clean", {0: 50.0, 1: 52.0, 2: 49.0},
                             {0: 48.0, 2: 50.0, 3: 40.0}, mean=False)[0]
    assert line == "| x - y | clean | 2 |  | **+0.50 ± 2.12** (1 of 2) |"  # the pairs counted

"""
The one study runner of experiments/: a study is its plan (a docstring written before any run)
and its cells; the rest lives here, once.

    runs       every run of a study is a Run: its folder, its config, and what else defines it
               (a target source, per-epoch statistics, a run it starts from)
    workers    processes of one CPU thread each; each claims the next unclaimed run (a lock the
               operating system drops when the worker dies), so any number of workers share one
               list, and a stopped study continues where it stopped: finished runs are reused,
               interrupted ones continued from their last checkpoint (compare.run_arm)
    signals    SIGINT, SIGTERM and SIGHUP end the study as Ctrl-C does (cli.run: one line, exit
               128 + N); the workers stop with it, and a worker whose study is gone (killed with
               SIGKILL, even) stops by itself: its stdin is a pipe from the study, and EOF on it
               means the study has ended
    the report the paired-difference table (a cell minus the cell it is paired with, seed by
               seed) and its plot

A study script defines ROOT, `prepare(args)`, `runs(args)` and `report(args)`, and

    def main(argv=None):
        return runner.main(sys.modules[__name__], DESCRIPTION, argv, data=...)


    if __name__ == "__main__":
        runner.run(main)
"""
import argparse
import dataclasses
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

from cli import need  # noqa: E402

# compare (and with it torch) is imported where runs are trained or read, not here: the study
# itself only claims its folder and starts the workers, in a fraction of a second


@dataclasses.dataclass
class Run:
    """One run of a study. config is a textteacher Config, or a function of nothing that makes
    one once `after` is finished (a fine-tune: --init reads its source); targets a function
    config -> target source (a control), None for the trainer's own --text; on_epoch a
    function (config, folder) -> train()'s callback, or None (analysis.record_stats records the
    per-class statistics of every epoch); objective and settings are train()'s seam and what it
    adds to the arm's identity (compare.run_arm)."""
    folder: str
    config: object
    targets: object = None
    on_epoch: object = None
    after: str = ""
    objective: object = None
    settings: dict = None


def work(runs):
    """Claim and train every run not yet claimed by another worker, in order; a run that starts
    from another waits for that one's export."""
    import compare
    for run in runs:
        try:
            cli.lock(run.folder + ".job", "job")
        except cli.UserError:  # another worker trains it
            continue
        while run.after and not compare.finished(run.after, 1):
            time.sleep(2)
        cfg = run.config() if callable(run.config) else run.config
        targets = run.targets(cfg) if run.targets else None
        on_epoch = run.on_epoch(cfg, run.folder) if run.on_epoch else None
        compare.run_arm(cfg, run.folder, targets, on_epoch, run.objective, run.settings)
        cli.release(run.folder + ".job")


def text_targets(cfg):
    """(the embeddings of cfg.text matched to cfg.data's training samples, the samples' true
    labels): what a study's control makes its targets of."""
    import torch
    import textteacher as tt
    dataset, keys, classes = tt.image_split(cfg.data, cfg.data_dir, "train")
    return tt.TextTargets(cfg.text, keys, classes, cfg.data), torch.tensor(dataset.targets)


def stop_with_parent():
    """In a worker: stop as on SIGTERM once the study that started it has ended, however it
    ended (its end closes the pipe on our stdin). The study's own signals reach us first."""
    def watch():
        # os.read, not sys.stdin: a daemon thread inside Python's buffered reader at the
        # worker's own end would abort the interpreter (it holds the reader's lock)
        while os.read(0, 4096):  # b"" at EOF: the study is gone
            pass
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


def start_workers(script, argv, workers):
    """The workers as processes of their own, one CPU thread each, until all have ended. A
    worker that fails ends the study in one line (its own, for an input error; its whole output
    for a bug). Any way the study itself ends (a signal, an error) stops the workers first."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [tempfile.TemporaryFile("w+", encoding="utf-8") for _ in range(workers)]
    procs = []
    try:
        for log in logs:
            procs.append(subprocess.Popen([sys.executable, script, *argv, "--worker"], env=env,
                                          stdin=subprocess.PIPE, stderr=log))
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:  # still running only when the study was interrupted or failed
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
    for i, (code, log) in enumerate(zip(codes, logs)):
        log.seek(0)
        text = log.read().strip()
        last = text.splitlines()[-1] if text else ""
        if code and last.startswith("error: "):
            e = cli.UserError(f"{last[len('error: '):]} (worker {i}; the finished runs are "
                              "kept: run the same command again to continue)")
            e.code = code
            raise e
        if text:  # notes, warnings, or a bug's traceback: as the worker wrote them
            print(text, file=sys.stderr)
        need(not code, f"worker {i} ended with exit code {code} (its output is above); the "
             "finished runs are kept: run the same command again to continue")


def main(study, description, argv=None, data="data/cifar10-1k", add_arguments=None):
    """The command line of every study: --data, --root, --docs, --workers; the study claims
    --root (one study per root), prepares its inputs, starts the workers, writes the report."""
    p = cli.Parser(description=description)
    p.add_argument("--data", default=data, type=cli.path("new folder"),
                   help="the image folder the study trains on")
    p.add_argument("--root", default=study.ROOT, type=cli.path("new folder"),
                   help="where the runs go (a stopped study continues from them)")
    p.add_argument("--docs", default="docs", type=cli.path("new folder"),
                   help="where the table, the numbers and the plot go")
    # processes of one CPU thread each: one per core is the most that gains
    p.add_argument("--workers", type=cli.number(int, "[1, 64]"), default=2,
                   help="processes, one run each at a time")
    p.add_argument("--report", action="store_true", help="write the report of the runs "
                   "finished so far, and train nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    if args.worker:  # one of the study's workers: it trains, the study reports
        stop_with_parent()
        return work(study.runs(args))
    cli.writable(args.docs)  # where the results go, checked before the runs
    if not args.report:  # --report reads the runs alone: beside a study that runs, too
        cli.lock(cli.writable(args.root), "--root")
        study.prepare(args)
        start_workers(study.__file__, argv if argv is not None else sys.argv[1:], args.workers)
    study.report(args)


def run(main):
    """A study's `if __name__ == "__main__"`: its main through cli.run, whose line after a
    signal says how to continue; the claims main makes (--root) end with it."""
    cli.run(cli.releasing(main), interrupted="every run keeps its last checkpoint: run the same "
            "command again to continue")


# ----------------------------------------------------------------------------
# The report: final top-1 per cell, paired differences, the plot

def finals(folders, epochs, key="top1"):
    """{seed: the last epoch's value} of the runs {seed: folder} that have finished (exported):
    a study reports what it has, and says how many seeds each number rests on. A finished
    run's metrics.jsonl must hold every epoch: a damaged one is one line, not a seed left
    out."""
    import compare
    out = {}
    for seed, f in folders.items():
        if os.path.exists(os.path.join(f, "export", "config.json")):
            records = compare.read_metrics(f)
            need(len(records) >= epochs, f"{f}/metrics.jsonl holds {len(records)} of the run's "
                 f"{epochs} epochs: delete {f} and run the study again")
            out[seed] = records[-1][key]
    return out


def paired_row(name, labels, values, base=None, mean=True):
    """A markdown table row and its numbers, from {seed: value}: the mean ± std of values over
    the seeds (mean=False: left blank, for a row of differences alone), and, with base (the
    values of the cell it is paired with), the mean ± std of the paired difference over the
    seeds both have, and for how many of them it is positive. The seeds column counts the
    values, or for a row of differences alone the pairs. A std needs two seeds; a cell without
    a finished run says so."""
    import compare
    import numpy as np

    def shown(values, sign=""):
        if len(values) == 0:
            return "not run yet"
        m, s = compare.mean_std(values)
        return f"{m:{sign}.2f}" + (f" ± {s:.2f}" if len(values) > 1 else "")
    out = dict(values=values, mean=compare.mean_std(list(values.values())) if values else None)
    diff = ""
    if base is not None:
        seeds = sorted(values.keys() & base.keys())
        d = np.array([values[s] - base[s] for s in seeds])
        out.update(diff=compare.mean_std(d) if len(d) else None, seeds=seeds,
                   positive=int((d > 0).sum()))
        diff = f"**{shown(d, '+')}** ({out['positive']} of {len(d)})" if len(d) else ""
    top1 = shown(list(values.values())) if mean else ""
    n = len(values) if mean or base is None else len(out["seeds"])
    return f"| {name} | {labels} | {n} | {top1} | {diff} |", out


TABLE_HEAD = ["| cell | labels | seeds | top-1 | paired difference (seeds positive) |",
              "|---|---|---|---|---|"]


def write(docs, name, text, results=None):
    """A study's report: docs/NAME.md (the text, also printed) and, with results, docs/NAME.json
    (its numbers), each written whole or not at all."""
    import json
    cli.save_atomic(lambda f: f.write(text.encode()), os.path.join(docs, f"{name}.md"))
    if results is not None:
        cli.save_atomic(lambda f: f.write(json.dumps(results, indent=1).encode()),
                        os.path.join(docs, f"{name}.json"))
    print(text)


def need_matplotlib():
    """A study that draws its plot calls this in prepare(): before hours of runs, not after."""
    need(importlib.util.find_spec("matplotlib"), "the study draws its plot with matplotlib, "
         "which is optional: pip install matplotlib")


def plot(path, bars, title, ylabel="paired difference of final top-1 (p.p.)"):
    """A bar per (label, (mean, std)): the paired differences of a study, written to path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4))
    means = [m for _, (m, _) in bars]
    ax.bar(range(len(bars)), means, yerr=[s for _, (_, s) in bars], capsize=3,
           color=["C0" if m > 0 else "C3" for m in means])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    cli.save_atomic(lambda f: fig.savefig(f, format="png", dpi=110), path)

"""
Validation top-1 and the text loss per epoch of run folders (or of the arms inside a comparison
folder), side by side, in one PNG. Needs matplotlib (optional: pip install matplotlib).

    python experiments/plot.py runs/demo/seed0-baseline runs/demo/seed0-textteacher --out plot.png

It prints the file it wrote and how many runs it drew.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import read_metrics  # noqa: E402


def plot_runs(paths, out):
    """Validation top-1 and text loss per epoch of run folders (or of the arms inside
    a --compare folder), side by side, into one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plotting needs matplotlib, which is optional: pip install matplotlib")
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            runs.append(path)
        elif os.path.isdir(path):
            runs += sorted(
                e.path
                for e in os.scandir(path)
                if os.path.isfile(os.path.join(e.path, "metrics.jsonl"))
            )
    if not runs:
        sys.exit(
            f"error: no run with a metrics.jsonl in {' '.join(paths)}; pass run folders such as "
            "runs/NAME"
        )
    fig, (acc, txt) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(runs):
        m = read_metrics(run)
        epochs, name = (
            [r["epoch"] for r in m],
            os.path.relpath(run, os.path.commonpath(runs)) if len(runs) > 1 else run,
        )
        acc.plot(
            epochs, [r["top1"] for r in m], color=f"C{i}", label=name
        )  # one colour per run in both panels
        if m[0]["loss_txt"] is not None:
            txt.plot(epochs, [r["loss_txt"] for r in m], color=f"C{i}", label=name)
    acc.set(xlabel="epoch", ylabel="validation top-1 (%)", title="accuracy")
    txt.set(xlabel="epoch", ylabel="L_txt (training mean)", title="text loss")
    acc.legend(fontsize=8)
    acc.grid(alpha=0.3)
    txt.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({len(runs)} runs)")


def main(argv=None):
    p = argparse.ArgumentParser(description="Plot validation top-1 and text loss per epoch.")
    p.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    p.add_argument("--out", default="plot.png", help="the PNG to write")
    args = p.parse_args(argv)
    plot_runs(args.runs, args.out)


if __name__ == "__main__":
    main()

"""
Validation top-1 and the text loss per epoch of run folders (or of the arms inside a comparison
folder), side by side, in one image (PNG, or any format matplotlib writes, by --out's extension).
Needs matplotlib (optional: pip install matplotlib).

    python experiments/plot.py runs/demo/seed0-baseline runs/demo/seed0-textteacher --out plot.png

It prints the file it wrote and how many runs it drew.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402
import textteacher as tt  # noqa: E402
from cli import need  # noqa: E402
from compare import read_metrics  # noqa: E402


def plot_runs(paths, out):
    """Validation top-1 and text loss per epoch of run folders (or of the arms inside
    a --compare folder), side by side, into one image."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise tt.UserError("plotting needs matplotlib, which is optional: pip install "
                           "matplotlib") from None
    from matplotlib.backend_bases import FigureCanvasBase
    # the format is checked before anything is read: matplotlib would refuse it only at the end
    kind = os.path.splitext(out)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    need(kind in formats, f"--out {out}: matplotlib writes {', '.join(sorted(formats))}, not "
         f"{kind or 'a file without an extension'}; name the file plot.png, plot.pdf, ...")
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
    need(runs, f"no run with a metrics.jsonl in {' '.join(paths)}; pass run folders such as "
         "runs/NAME")
    metrics = {run: read_metrics(run) for run in runs}  # a torn line: one line naming it
    empty = [run for run, m in metrics.items() if not m]
    need(not empty, f"{empty[0] if empty else ''}/metrics.jsonl holds no epoch yet: plot it once "
         "its first epoch has ended")
    fig, (acc, txt) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(runs):
        m = metrics[run]
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
    # whole or not at all, and a full disk or a missing folder in one line naming the file
    cli.save_atomic(lambda f: fig.savefig(f, format=kind, dpi=110), out)
    plt.close(fig)
    print(f"wrote {out} ({len(runs)} runs)")


@cli.releasing  # the claim on --out ends with main
def main(argv=None):
    p = cli.Parser(description="Plot validation top-1 and text loss per epoch.")
    p.add_argument("runs", nargs="+", type=cli.path("folder"),
                   help="run folders, or folders holding run folders")
    p.add_argument("--out", default="plot.png", type=cli.path("new file"),
                   help="the image to write (.png, .pdf, .svg, ...)")
    args = p.parse_args(argv)
    cli.lock(args.out, "--out")  # two plots into one file: the second is refused
    plot_runs(args.runs, args.out)


if __name__ == "__main__":
    cli.run(main, interrupted="nothing was written: run the same command again")

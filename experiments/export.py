"""
Export the ViT of a finished run without its text head, and check the export: model.safetensors
and config.json (as a finished run writes them), plus a torch.export program model.pt2 that runs
without any model code, all in export/ beside the checkpoint.

    python experiments/export.py runs/NAME            # or runs/NAME/checkpoint.pt
    python experiments/export.py runs/NAME --unfinished   # a run still training: export-epochE/

It prints where it wrote the export, after checking that a ViT built from the written files and
the torch.export program both reproduce the checkpoint's logits (exactly, and to 1e-5). The
export/ of a run is its final model: the checkpoint of a run that has not finished its epochs
is refused, or with --unfinished exported to export-epochE/ (export-epochE-stepS/ mid-epoch),
which no tool reads as the run's result.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import torch

import textteacher as tt  # noqa: E402
from cli import need  # noqa: E402


def export_checked(ckpt, out_dir):
    """tt.export, then model.pt2, each checked against the checkpoint's logits."""
    args = ckpt["model_args"]
    model = tt.TextTeacher(tt.ViT(**args), ckpt["text_dim"]).eval()
    model.load_state_dict(ckpt["model"])
    # The program goes first: were the export stopped after the new weights, a model.pt2 of
    # other weights would otherwise sit beside them, giving other logits
    program_path = os.path.join(out_dir, "model.pt2")
    if os.path.exists(program_path):
        os.remove(program_path)
    tt.export(model.vit, args, ckpt["classes"], out_dir)
    x = torch.randn(
        4, 3, args["img_size"], args["img_size"], generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        fresh_args, weights, _ = tt.read_source(out_dir)  # the export as every tool reads it
        fresh = tt.ViT(**fresh_args).eval()
        fresh.load_state_dict(weights, strict=True)
        if not torch.equal(fresh(x), model(x)[0]):
            raise SystemExit("error: the exported weights give other logits")
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(fresh, (x,), dynamic_shapes=({0: batch},))
        tt.save_atomic(lambda f: torch.export.save(program, f), program_path)
        again = torch.export.load(program_path).module()(x)
        if not torch.allclose(again, model(x)[0], rtol=1e-5, atol=1e-5):
            raise SystemExit("error: model.pt2 gives other logits")
    return out_dir


@cli.releasing  # the claim on the run folder ends with main
def main(argv=None):
    p = cli.Parser(description="Export the ViT of a finished run, with a torch.export program.")
    p.add_argument("run", type=cli.path("file or folder"),
                   help="a run folder (runs/NAME) or its checkpoint.pt")
    p.add_argument("--unfinished", action="store_true", help="export the checkpoint of a run "
                   "that has not finished, to RUN/export-epochE/ (not export/: not the result)")
    args = p.parse_args(argv)
    ckpt, path = tt.load_checkpoint(args.run)
    run_dir = os.path.dirname(os.path.abspath(path))
    epoch, step, epochs = ckpt["epoch"], ckpt["step"], ckpt["config"]["epochs"]
    out = os.path.join(run_dir, "export")
    if epoch < epochs:
        where = f"epoch{epoch}" + (f"-step{step}" if step else "")
        need(args.unfinished, f"{args.run} has trained {epoch} of its {epochs} epochs: finish it "
             f"(python textteacher.py --resume {args.run}), or pass --unfinished to export this "
             f"checkpoint to {run_dir}/export-{where}")
        out += f"-{where}"
    # One process per run folder, as the trainer claims it: an export beside a run that is
    # still training would race its final export.
    cli.lock(run_dir, "run")
    export_checked(ckpt, cli.writable(out))
    print(f"exported the ViT of {path} to {out}: model.safetensors, config.json, model.pt2")
    return out


if __name__ == "__main__":
    cli.run(main, interrupted="files are renamed into place, so none is half-written: run the "
            "same command again to export")

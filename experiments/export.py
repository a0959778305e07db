"""
Export the ViT of any checkpoint without its text head, and check the export: model.safetensors
and config.json (as a finished run writes them), plus a torch.export program model.pt2 that runs
without any model code, all in export/ beside the checkpoint.

    python experiments/export.py runs/NAME            # or runs/NAME/checkpoint.pt

It prints where it wrote the export, after checking that a ViT built from the written files and
the torch.export program both reproduce the checkpoint's logits (exactly, and to 1e-5).
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import textteacher as tt  # noqa: E402


def export_checked(ckpt, out_dir):
    """tt.export, then model.pt2, each checked against the checkpoint's logits."""
    args = ckpt["model_args"]
    model = tt.TextTeacher(tt.ViT(**args), ckpt["text_dim"]).eval()
    model.load_state_dict(ckpt["model"])
    tt.export(model.vit, args, ckpt["classes"], out_dir)
    x = torch.randn(
        4, 3, args["img_size"], args["img_size"], generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        fresh = tt.ViT(**json.load(open(os.path.join(out_dir, "config.json")))["model_args"]).eval()
        fresh.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")), strict=True)
        if not torch.equal(fresh(x), model(x)[0]):
            raise SystemExit("error: the exported weights give other logits")
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(fresh, (x,), dynamic_shapes=({0: batch},))
        tt.save_atomic(lambda f: torch.export.save(program, f), os.path.join(out_dir, "model.pt2"))
        again = torch.export.load(os.path.join(out_dir, "model.pt2")).module()(x)
        if not torch.allclose(again, model(x)[0], rtol=1e-5, atol=1e-5):
            raise SystemExit("error: model.pt2 gives other logits")
    return out_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python experiments/export.py CHECKPOINT_OR_RUN_FOLDER")
    try:
        ckpt, path = tt.load_checkpoint(argv[0])
        out = export_checked(ckpt, os.path.join(os.path.dirname(path), "export"))
    except tt.UserError as e:
        sys.exit(f"error: {e}")
    print(f"exported the ViT of {path} to {out}: model.safetensors, config.json, model.pt2")


if __name__ == "__main__":
    main()

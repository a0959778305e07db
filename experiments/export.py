"""
Export the ViT of any checkpoint (a finished run exports its own at the end): the text head is
left behind, and model.safetensors, config.json and model.pt2 go to export/ beside it.

    python experiments/export.py runs/NAME/checkpoint.pt

It prints where it wrote the export; the files are checked to reproduce the model's logits.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import textteacher as tt  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python experiments/export.py CHECKPOINT_OR_RUN_FOLDER")
    try:
        ckpt, path = tt.load_checkpoint(argv[0])
    except tt.UserError as e:
        sys.exit(f"error: {e}")
    model = tt.TextTeacher(tt.ViT(**ckpt["model_args"]), ckpt["text_dim"])
    model.load_state_dict(ckpt["model"])
    out = tt.export(model.vit, ckpt["model_args"], ckpt["classes"], os.path.join(os.path.dirname(path), "export"))
    print(f"exported the ViT of {path} to {out}")


if __name__ == "__main__":
    main()

"""
Every kind of file the trainer and its tools read, truncated, emptied and garbled: one line on
stderr that names the file and says what to do, exit code 2, no traceback, and nothing of the
user's changed. The kinds are listed once (KINDS), each with the command that reads it; the
three damages are applied to every kind.
"""
import functools
import json
import os
import shutil
import sys

import pytest
import torch

from common import CHEAP, ROOT, base_args, run, snapshot
from common import folder  # noqa: F401  (a fixture)

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import analysis  # noqa: E402
import caption_embed  # noqa: E402
import cli  # noqa: E402
import features  # noqa: E402
import runner  # noqa: E402
import shapes  # noqa: E402
import transfer  # noqa: E402


def truncated(data):
    return data[:len(data) // 2]


def emptied(data):
    return b""


def garbled(data):
    """Random bytes over the middle third: the length stays, the content does not."""
    start, n = len(data) // 3, max(len(data) // 3, 16)
    noise = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0))
    return data[:start] + bytes(noise.tolist()) + data[start + n:]


DAMAGES = {"truncated": truncated, "emptied": emptied, "garbled": garbled}


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A finished run (checkpoint, config.json, metrics.jsonl, export/) and its embeddings
    file: the originals that each case copies and damages."""
    out = tmp_path_factory.mktemp("trained")
    assert run(base_args(folder, out, *CHEAP, "--epochs", "1", "--name", "r")) == 0
    return folder, out


def invoke(command, argv):
    """A command in this process as a user runs it: (exit code)."""
    try:
        cli.run(command, argv)
    except SystemExit as e:
        return e.code
    return 0


def train(*argv):
    import textteacher as tt
    return lambda _: tt.main(list(map(str, argv)))


# kind: (the file, relative to the case folder, and the command that reads it, as a function
# of (folder fixture, case folder)). A run's config.json is not among them: it repeats the
# checkpoint's settings, and the tools read the checkpoint where it is torn.
KINDS = {
    "checkpoint (--resume)": ("r/checkpoint.pt", lambda f, d: train("--resume", f"{d}/r")),
    "checkpoint (--init)": ("r/checkpoint.pt", lambda f, d: train(
        *base_args(f, d, "--init", f"{d}/r", "--name", "t"))),
    "export config.json (--init)": ("r/export/config.json", lambda f, d: train(
        *base_args(f, d, "--init", f"{d}/r/export", "--name", "t"))),
    "export weights (--init)": ("r/export/model.safetensors", lambda f, d: train(
        *base_args(f, d, "--init", f"{d}/r/export", "--name", "t"))),
    "embeddings file (--text)": ("text.pt", lambda f, d: train(
        *base_args(f, d, "--text", f"{d}/text.pt", "--name", "t"))),
    "metrics.jsonl (transfer.py)": ("arms/seed0-baseline/metrics.jsonl", lambda f, d: (
        lambda _: transfer.main([f"{d}/arms", "--probe", "--data", f[0]]))),
    "caption file (caption_embed.py)": ("captions.txt", lambda f, d: (
        lambda _: caption_embed.main(["--captions", f"{d}/captions.txt", "--out",
                                      f"{d}/new.pt"]))),
    "caption sidecar (caption_embed.py)": ("captions.txt.json", lambda f, d: (
        lambda _: caption_embed.main(["--captions", f"{d}/captions.txt", "--out",
                                      f"{d}/new.pt"]))),
    "shapes attributes (features.py)": ("shapes/attributes_train.jsonl", lambda f, d: (
        lambda _: features.attributes("train", f"{d}/shapes"))),
    "FFD statistics (analysis.py ffd)": ("r.ffd/epoch1.pt", lambda f, d: (
        lambda _: analysis.main(["ffd", f"{d}/r"]))),
    "a study's run (runner.finals)": ("arms/seed0-baseline/metrics.jsonl", lambda f, d: (
        lambda _: runner.finals({0: f"{d}/arms/seed0-baseline"}, 1))),
    "caption table (caption_embed.py --columns)": ("table.tsv", lambda f, d: (
        lambda _: caption_embed.main(["--captions", f"{d}/table.tsv", "--columns",
                                      "path,caption", "--data", f[0], "--out", f"{d}/new.pt"]))),
    "class names (caption_embed.py)": ("names.txt", lambda f, d: (
        lambda _: caption_embed.main(["--classes", "--data", f[0], "--class-names",
                                      f"{d}/names.txt", "--out", f"{d}/new.pt"]))),
}


@functools.lru_cache(maxsize=None)
def attribute_lines():
    """The lines of the shapes set's training attribute file (drawn once: 3000 images)."""
    n, seed = shapes.SPLITS["train"]
    return "".join(json.dumps(a) + "\n" for a in shapes.draw(n, seed)[2])


def prepare(trained, case):
    """The case folder: the trained run with its FFD statistics, its embeddings file, a
    compare.py-like folder of one arm, a caption file, a caption table and a class-name
    file."""
    folder, out = trained
    shutil.copytree(out / "r", case / "r")
    shutil.copy(folder[1], case / "text.pt")
    os.makedirs(case / "arms")
    shutil.copytree(out / "r", case / "arms" / "seed0-baseline")
    (case / "captions.txt").write_text("".join(f"a_train_{i:03d}.png:\ta small picture number "
                                               f"{i}\n" for i in range(40)))
    (case / "names.txt").write_text("a\tapple\nb\tbanana\nc\tcherry\n")
    (case / "table.tsv").write_text("path\tlabel\tcaption\n" + "".join(  # the whole folder's
        f"{s}/{c}/{c}_{s}_{i:03d}.png\t{c}\ta small picture number {i}\n"
        for s, n in (("train", 64), ("val", 11)) for c in "abc" for i in range(n)))
    g = torch.Generator().manual_seed(0)  # one epoch's class statistics, as record_stats saves
    feats, labels = torch.randn(30, 4, generator=g), torch.arange(30) % 3
    os.makedirs(case / "r.ffd")
    torch.save(analysis.class_gaussians(feats, labels, 3), case / "r.ffd" / "epoch1.pt")
    (case / "captions.txt.json").write_text(json.dumps(dict(model="a captioner", num_beams=3)))
    os.makedirs(case / "shapes")  # the shapes set's attribute file, as experiments/shapes.py
    (case / "shapes" / "attributes_train.jsonl").write_text(attribute_lines())  # writes it


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_damaged_file_is_one_line_naming_it(trained, tmp_path, capsys, kind, damage):
    case = tmp_path / "case"
    prepare(trained, case)
    name, command = KINDS[kind]
    path = case / name
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    before = snapshot(case)
    capsys.readouterr()
    code = invoke(command(trained[0], str(case)), None)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(path) in err or str(path.parent) in err, err  # names the file (or its folder)
    after = snapshot(case)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed


def test_ffd_of_a_run_with_an_epoch_missing_is_one_line(trained, tmp_path, capsys):
    """Statistics of every epoch but the last: refused in one line naming the missing file,
    never a curve measured against the wrong final model."""
    case = tmp_path / "case"
    prepare(trained, case)
    config = json.loads((case / "r" / "config.json").read_text())
    (case / "r" / "config.json").write_text(json.dumps(dict(config, epochs=2)))
    code = invoke(lambda _: analysis.main(["ffd", f"{case}/r"]), None)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {case}/r.ffd/epoch2.pt is missing: train the run "
                                 "again with experiments/analysis.record_stats (the studies do)"]


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c", "d"]])
def test_an_export_whose_class_names_do_not_match_its_head_is_refused(trained, tmp_path, capsys,
                                                                       names):
    """label_names of another length than the head's outputs: --init refuses it in one line
    naming the file (it used to treat the classes as other ones and silently drop the head)."""
    case = tmp_path / "case"
    prepare(trained, case)
    path = case / "r" / "export" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), label_names=names)))
    code = invoke(train(*base_args(trained[0], case, "--init", f"{case}/r/export", "--name",
                                   "t")), None)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{path}" in err[0] and "one class per" in err[0], err
    assert not os.path.exists(case / "t")

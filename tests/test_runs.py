"""One run per folder, and nothing reused that does not match: the trainer's side of the tools'
convention (cli.py). Two trainers with one --name, a first checkpoint cut short, a training
split that changed under a resume, an embeddings file of another named set, and inputs that
used to end in a traceback or a crash."""
import json
import os
import shutil
import signal

import pytest
import torch

from common import (CHEAP, base_args, checkpoint, crash_in_epoch, fails, metrics, run, snapshot,
                    release, start_paused, wait_for_pause, write_embeddings, write_folder)
from common import folder  # noqa: F401  (a fixture)
import cli as cli_module
import textteacher as tt


def test_a_second_trainer_with_the_same_name_is_refused_and_the_first_is_unharmed(
        folder, tmp_path, capsys):
    """Two trainers started with the same --name used to leave one's checkpoint beside the
    other's config and metrics. Now the second ends in one line naming the first process, and
    writes nothing; the first finishes as if alone (its two epochs, its own settings)."""
    args = base_args(folder, tmp_path, *CHEAP, "--name", "r")
    first = start_paused(tmp_path, args, at=8, seconds=60)  # epoch 2: epoch 1 is saved
    try:
        wait_for_pause(first)
        before = snapshot(tmp_path / "r")
        line = fails(capsys, args + ["--lr", "0.5"])
        assert line.startswith(f"error: {tmp_path / 'r'} is being written by process "
                               f"{first.pid} (")
        assert snapshot(tmp_path / "r") == before
    finally:
        release(tmp_path)
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [m["epoch"] for m in metrics(tmp_path / "r")] == [1, 2]
    assert checkpoint(tmp_path / "r")["config"]["lr"] == tt.Config.lr
    assert not os.path.exists(tmp_path / ".r.lock")  # released at the end


def test_a_first_checkpoint_cut_short_is_named_and_the_same_command_starts_again(
        folder, tmp_path, capsys):
    """A SIGKILL while the first checkpoint is written leaves the run folder with nothing but
    the temporary file of that save. It used to block both ways out: a new run ("holds a run")
    and --resume ("not a checkpoint"). Now --resume says to start again without it, and the
    same command does, ending as a run that was never interrupted."""
    args = base_args(folder, tmp_path, *CHEAP, "--epochs", "1", "--name", "r")
    assert run(base_args(folder, tmp_path, *CHEAP, "--epochs", "1", "--name", "whole")) == 0
    os.makedirs(tmp_path / "r")
    (tmp_path / "r" / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 torn")
    line = fails(capsys, ["--resume", tmp_path / "r"])
    assert line == (f"error: {tmp_path / 'r'} stopped while writing its first checkpoint: "
                    "start it again, without --resume")
    assert run(args) == 0
    assert sorted(os.listdir(tmp_path / "r")) == sorted(os.listdir(tmp_path / "whole"))
    a, b = checkpoint(tmp_path / "r"), checkpoint(tmp_path / "whole")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_folder_with_other_files_still_holds_a_run(folder, tmp_path, capsys):
    """Only a folder holding nothing but temporary files counts as free: one with any other
    file is refused as before, and left as it was."""
    os.makedirs(tmp_path / "r")
    (tmp_path / "r" / "notes.txt").write_text("mine")
    (tmp_path / "r" / "checkpoint.pt.tmp").write_bytes(b"torn")
    before = snapshot(tmp_path / "r")
    line = fails(capsys, base_args(folder, tmp_path, *CHEAP, "--name", "r"))
    assert line == (f"error: {tmp_path / 'r'} holds a run: continue it with --resume "
                    f"{tmp_path / 'r'}, or choose another --name")
    assert snapshot(tmp_path / "r") == before


@pytest.mark.parametrize("change", ["added", "moved", "removed"])
def test_resume_refuses_a_training_split_that_changed(tmp_path, capsys, monkeypatch, change):
    """The checkpoint holds a fingerprint of the training split (every key with its label):
    images added, moved between classes or removed since used to be trained on without a word;
    now --resume ends in one line, and once the folder is as it was, it continues."""
    root = str(tmp_path / "d")
    keys = write_folder(root, train=32, val=2)
    text = write_embeddings(tmp_path / "t.pt", keys, torch.randn(len(keys), 8))
    args = ["--data", root, "--text", text, "--img-size", "16", "--patch-size", "8", "--model",
            "micro", "--batch-size", "32", "--epochs", "2", "--workers", "0", "--threads", "1",
            "--out-dir", tmp_path, "--name", "r", *CHEAP]
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="power cut"):
        run(args)
    monkeypatch.undo()
    image = os.path.join(root, "train", "a", keys[0])
    moved = {"added": os.path.join(root, "train", "a", "new.png"),
             "moved": os.path.join(root, "train", "b", keys[0]),
             "removed": os.path.join(tmp_path, keys[0])}[change]
    (shutil.copy if change == "added" else shutil.move)(image, moved)
    if change == "added":  # an image with a target, so that only the split differs
        write_embeddings(text, keys + ["new.png"], torch.randn(len(keys) + 1, 8))
    line = fails(capsys, ["--resume", tmp_path / "r"])
    assert line.startswith(f"error: {tmp_path / 'r'} was trained on other images, classes or "
                           "text targets (text sha256 ")
    if change == "added":
        os.remove(moved)
        write_embeddings(text, keys, torch.randn(len(keys), 8))  # other targets: refused too
        assert fails(capsys, ["--resume", tmp_path / "r"]).startswith(line[:60])
        return
    shutil.move(moved, image)
    assert run(["--resume", tmp_path / "r"]) == 0
    assert [m["epoch"] for m in metrics(tmp_path / "r")] == [1, 2]


def test_an_embeddings_file_of_another_named_set_is_refused(folder, tmp_path, capsys):
    """caption_embed.py records --dataset; training on another named set refuses the file
    (CIFAR-100's keys are indices, so a CIFAR-10 or another index-keyed file would otherwise
    match every key). The same tag, or a PATH --data, is accepted."""
    root, _, keys = folder
    text = write_embeddings(tmp_path / "c.pt", keys, torch.randn(len(keys), 8), dataset="cifar100")
    args = base_args(folder, tmp_path, *CHEAP, "--epochs", "1")
    args[args.index("--text") + 1] = text
    args[args.index("--data") + 1:args.index("--data") + 2] = ["shapes", "--data-dir", root]
    line = fails(capsys, args + ["--name", "a"])
    assert line == (f"error: {text} holds the text of cifar100, not of shapes: embed shapes's "
                    "captions with caption_embed.py")
    assert not os.path.exists(tmp_path / "a")
    write_embeddings(text, keys, torch.randn(len(keys), 8), dataset="shapes")
    assert run(args + ["--name", "b"]) == 0


def test_a_folder_of_one_class_and_too_many_threads_end_in_one_line(tmp_path, capsys):
    """Two inputs that used to end in a traceback (one class folder: the loss had no second
    class) and in a segfault or a hang (--threads 1000000)."""
    root = str(tmp_path / "one")
    write_folder(root, classes=("only",), train=4, val=1)
    line = fails(capsys, ["--data", root, "--img-size", "16", "--patch-size", "8", "--model",
                          "micro", "--batch-size", "4", "--out-dir", tmp_path, "--name", "r"])
    assert line == (f"error: {os.path.join(root, 'train')} holds one class folder: a classifier "
                    "needs two or more")
    line = fails(capsys, ["--threads", "1000000", "--data", root])
    assert line == (f"error: argument --threads: must be an integer in [0, {os.cpu_count()}], "
                    "got 1000000 (see --help)")  # the cores of this machine


def test_a_claim_is_released_by_a_failed_train_and_refuses_another_process(tmp_path):
    """cli.lock: the claim of train() ends with it, also when it raises (a tool that goes on
    after a failed arm holds nothing); a claim held by a live process refuses this one."""
    @cli_module.releasing
    def claims_then_fails(path):
        cli_module.lock(path)
        assert os.path.exists(tmp_path / ".x.lock")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        claims_then_fails(str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / ".x.lock")
    assert str(tmp_path / "x") not in cli_module._held
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", (
        f"import sys, time; sys.path.insert(0, {os.path.dirname(tt.__file__)!r}); import cli; "
        f"cli.lock({str(tmp_path / 'x')!r}); print('held', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(cli_module.UserError, match=f"being written by process {holder.pid}"):
            cli_module.lock(str(tmp_path / "x"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    cli_module.lock(str(tmp_path / "x"))  # a killed holder leaves no claim behind
    cli_module.release(str(tmp_path / "x"))


# ----------------------------------------------------------------------------
# No silent wrong result: what used to be accepted and quietly did something else

def test_init_from_an_unfinished_run_is_refused(folder, tmp_path, capsys, monkeypatch):
    """--init used to start from the partial weights of a run that stopped early, without a
    word (experiments/export.py refuses the same run): now one line, and nothing is started."""
    crash_in_epoch(monkeypatch, 2)  # epoch 1 is saved, then the machine dies
    with pytest.raises(RuntimeError, match="power cut"):
        run(base_args(folder, tmp_path, *CHEAP, "--name", "r"))
    monkeypatch.undo()
    line = fails(capsys, base_args(folder, tmp_path, *CHEAP, "--init", tmp_path / "r",
                                   "--name", "t"))
    assert line == (f"error: {tmp_path / 'r'} is an unfinished run: finish it with --resume, or "
                    "export it as it is (experiments/export.py --unfinished)")
    assert not os.path.exists(tmp_path / "t")


def test_resume_refuses_a_hand_edited_config_json_and_keeps_it(folder, tmp_path, capsys,
                                                               monkeypatch):
    """--resume used to overwrite config.json from the checkpoint: an edit (here more epochs)
    was lost without a word. Now one line says so, and the edited file is left as it is."""
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="power cut"):
        run(base_args(folder, tmp_path, *CHEAP, "--name", "r"))
    monkeypatch.undo()
    config = tmp_path / "r" / "config.json"
    edited = config.read_text().replace('"epochs": 2', '"epochs": 5')
    config.write_text(edited)
    line = fails(capsys, ["--resume", tmp_path / "r"])
    assert line == (f"error: {tmp_path / 'r'}/config.json differs from the checkpoint (epochs): "
                    "a run continues with the checkpoint's settings; put it back (or delete it if "
                    "the run stopped while saving) and give a change resuming allows as a flag")
    assert config.read_text() == edited


def test_a_stop_between_the_checkpoint_and_config_json_is_named_and_deleting_it_resumes(
        folder, tmp_path, capsys, monkeypatch):
    """A run resumed with a new --lr that stops after writing its checkpoint and before its
    config.json leaves the old lr in config.json. --resume then names the difference and says
    what to do after such a stop; done (config.json deleted), the run finishes with the new lr,
    and config.json is written again from the checkpoint."""
    args = base_args(folder, tmp_path, *CHEAP, "--epochs", "3", "--name", "r")
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="power cut"):
        run(args)
    monkeypatch.undo()
    run_dir, real = tmp_path / "r", tt.save_atomic

    def cut(write, path):  # the power goes after the checkpoint, before config.json
        if path.endswith("config.json"):
            raise RuntimeError("power cut")
        return real(write, path)
    monkeypatch.setattr(tt, "save_atomic", cut)
    with pytest.raises(RuntimeError, match="power cut"):
        run(["--resume", run_dir, "--lr", "0.002"])
    monkeypatch.undo()
    assert checkpoint(run_dir)["config"]["lr"] == 0.002
    line = fails(capsys, ["--resume", run_dir])
    assert "config.json differs from the checkpoint (lr, resume)" in line
    assert "delete it if the run stopped while saving" in line
    os.remove(run_dir / "config.json")
    assert run(["--resume", run_dir]) == 0
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.002


def test_split_is_refused_for_an_image_folder(folder, tmp_path, capsys):
    """--split chooses a transfer set's training split; an image folder has one, and the flag
    used to be accepted and ignored."""
    line = fails(capsys, base_args(folder, tmp_path, "--split", "trainval", "--name", "r"))
    assert line.startswith("error: --split chooses the training split of a transfer set (")
    assert not os.path.exists(tmp_path / "r")

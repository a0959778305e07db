"""The tools beside the trainer meet their user as the trainer does (issue 17): every failure a
user can cause ends in one line on stderr with a stated exit code (2 for input, disks and
permissions, 130 for Ctrl-C, saying how to go on); a second process writing the same output is
refused at its start, naming the first, and the first is unaffected; a finished or stopped
result is reused only when it was made with the settings asked for; --force replaces only what
the tool itself wrote. The groups follow the issue's six points.

The scripts run as commands do, through their __main__ block, but in this process (runpy): a
subprocess would cost seconds of imports each. Two exceptions: one real Ctrl-C (SIGINT to a
paused caption_images.py and its image-reading worker), and the second process of a claim, a
few lines of Python that claim the output as the tools do (cli.lock) and wait. Without root
the full-disk and read-only cases use what they can (a skip, or the folder's mode).

Run: python -m pytest -q tests/test_tool_errors.py
"""
import contextlib
import dataclasses
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from common import (CHEAP, ROOT, Forked, base_args, checkpoint, command_here, ended, folder,
                    metrics, signal_at_step, snapshot, untimed, write_embeddings)
from test_caption_images import FAST, blip, write_pictures, write_png

import caption_embed
import caption_images
import textteacher as tt
from cli import UserError

for _tools in ("experiments", "benchmarks"):
    if os.path.join(ROOT, _tools) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, _tools))
import compare  # noqa: E402
import export as export_tool  # noqa: E402
import plot  # noqa: E402
import shapes  # noqa: E402
import runner  # noqa: E402
import study  # noqa: E402

assert folder and blip  # fixtures, used by name


# ----------------------------------------------------------------------------
# helpers

def as_command(script, argv, monkeypatch, capsys):
    """script run as `python script ARGV` runs it, through its __main__ block, but in this
    process: (exit code, stderr lines). A KeyboardInterrupt that gets out is what a user
    would see as a traceback: returned as the code "traceback", so that pytest goes on."""
    path = os.path.join(ROOT, script)
    monkeypatch.setattr(sys, "argv", [path, *map(str, argv)])
    capsys.readouterr()
    try:
        runpy.run_path(path, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        code = "traceback"
    return code, capsys.readouterr().err.strip().splitlines()


HOLD = ("import sys; sys.path.insert(0, {root!r}); import cli; cli.lock(sys.argv[1]); "
        "print('held', flush=True); sys.stdin.read()")


@contextlib.contextmanager
def held(path):
    """Another process that claims path as the tools do, until the block ends: its pid."""
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT), str(path)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p.pid
    finally:
        p.stdin.close()
        p.wait()


@contextlib.contextmanager
def read_only(path):
    """path read-only, also for root (a read-only bind mount; without root, its mode)."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    for options in (["--bind", path, path], ["-o", "remount,ro,bind", path]):
        if subprocess.run(["mount", *options], capture_output=True).returncode:
            subprocess.run(["umount", path], capture_output=True)
            pytest.skip("cannot bind-mount a folder read-only here")
    try:
        yield
    finally:
        subprocess.run(["umount", path], check=True)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """An image folder for caption_images.py: 12 training images in 3 classes, 3 validation."""
    return write_pictures(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def captions(pictures, blip, tmp_path_factory):
    """The caption file of one uninterrupted run (3 batches of 4), as bytes."""
    out = tmp_path_factory.mktemp("captions") / "c.txt"
    caption_images.main(["--data", pictures, "--model", blip, "--out", str(out), *FAST,
                         "--batch-size", "4"])
    return out.read_bytes()


@pytest.fixture(scope="module")
def compared(folder, tmp_path_factory):
    """A finished comparison runs/ref (baseline and TextTeacher, one epoch) with its own copy
    of the embeddings: (the command's flags, its folder)."""
    out = tmp_path_factory.mktemp("compared")
    shutil.copy(folder[1], out / "text.pt")
    argv = base_args(folder, out, *CHEAP, "--epochs", "1", "--text", out / "text.pt",
                     "--name", "ref")
    compare.main([str(a) for a in argv])
    return [str(a) for a in argv], os.path.join(str(out), "ref")


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A finished one-epoch run of the trainer."""
    out = tmp_path_factory.mktemp("finished")
    assert tt.main(base_args(folder, out, *CHEAP, "--epochs", "1", "--name", "f")) is None
    return str(out / "f")


# ----------------------------------------------------------------------------
# The convention, in every tool: a bad flag, and Ctrl-C, in one line with a stated exit code

SCRIPTS = ["caption_images.py", "caption_embed.py", "experiments/compare.py",
           "experiments/export.py", "experiments/plot.py", "experiments/study.py",
           "experiments/shapes.py", "benchmarks/step.py", "benchmarks/against_timm.py",
           "benchmarks/against_sentence_transformers.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_flag_is_one_line_and_exit_2(script, monkeypatch, capsys):
    code, err = as_command(script, ["--no-such-flag"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_is_one_line_and_exit_130(script, monkeypatch, capsys):
    """Ctrl-C, here as it arrives while the flags are read (the first thing every tool does):
    one line that says how to go on, exit code 130, no traceback."""
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    import argparse
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", interrupt)
    code, err = as_command(script, [], monkeypatch, capsys)
    assert code == 130 and len(err) == 1 and err[0].startswith("interrupted; "), (code, err)


@pytest.mark.parametrize("script, argv, message", [
    ("caption_images.py", ["--device", "foo"], "--device foo is not a device"),
    ("caption_images.py", ["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
    ("caption_images.py", ["--device", "cuda:3"], "--device cuda:3: this machine has no CUDA"),
    ("experiments/study.py", ["--workers", "0"], "argument --workers: must be an integer in "
                                                 "[1, 64], got 0"),
    ("experiments/study.py", ["--workers", "-2"], "argument --workers: must be an integer in "
                                                  "[1, 64], got -2"),
    ("experiments/compare.py", ["--seeds", "0", "--text", "t.pt"], "argument --seeds: must be "
                                                                    "an integer in [1, 1000]"),
    ("experiments/compare.py", ["--seeds", "two"], "argument --seeds: must be an integer in "
                                                   "[1, 1000], got 'two'"),
    ("experiments/compare.py", ["--data", "shapes", "--seed", "99999", "--seeds", "2"],
     "--seeds 2 from --seed 99999 ends at seed 100000, outside the trainer's [0, 100000)"),
    ("experiments/export.py", [], "the following arguments are required: run"),
    ("experiments/plot.py", [".", "--out", "x.txt"], "--out x.txt: matplotlib writes"),
    ("benchmarks/step.py", ["--data", "shapes", "--model", "micro", "--img-size", "16",
                            "--patch-size", "8", "--batch-size", "1"], "--batch-size 1 must"),
    ("benchmarks/against_timm.py", ["--steps", "0"], "argument --steps: must be an integer"),
    ("benchmarks/against_timm.py", ["--img-size", "30"], "--img-size 30 is no multiple of"),
    ("benchmarks/against_sentence_transformers.py", ["--rounds", "0"], "argument --rounds: "
                                                                       "must be an integer"),
], ids=["device-foo", "device-cuda", "device-cuda3", "study-workers-0", "study-workers-neg",
        "compare-seeds-0", "compare-seeds-word", "compare-seeds-past-the-last", "export-no-run",
        "plot-txt", "step-batch-1", "timm-steps-0", "timm-img-size", "st-rounds-0"])
def test_a_bad_value_is_one_line_before_any_work(script, argv, message, tmp_path, monkeypatch,
                                                 capsys):
    """Values that cannot work are refused where they enter, before any data or model is
    read (image_split and the trainer fail the test if called)."""
    if script == "experiments/plot.py":  # the formats it can write are matplotlib's
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tt, "image_split", lambda *a, **k: pytest.fail("data read"))
    monkeypatch.setattr(study, "prepare", lambda *a: pytest.fail("study prepared"))
    if script == "caption_images.py":
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the same with a GPU
        argv = ["--data", "shapes", "--out", "c.txt", *argv]
    code, err = as_command(script, argv, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], (code, err)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# (1) Interrupts and disks: how to continue, the path and the cause

PAUSED_AFTER_A_BATCH = """
import os, runpy, sys, time
import tqdm
update = tqdm.tqdm.update


def paused(self, n=1):  # the script, paused once its first batch of captions is on disk
    update(self, n)
    print("PAUSED", flush=True)
    time.sleep(60)


tqdm.tqdm.update = paused
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_caption_images_ctrl_c_mid_run_keeps_the_captions_and_the_rerun_continues(
        pictures, blip, captions, tmp_path, how):
    """After the first batch, a real Ctrl-C (SIGINT to the process group, its image-reading
    worker included) or `kill PID` (SIGTERM to the captioner alone): one line, exit 128 + N,
    saying to run the command again, and no process of the group left (the worker stops with
    the captioner); run again, it continues to the file of an uninterrupted run."""
    signum = signal.SIGINT if how == "ctrl-c" else signal.SIGTERM
    word = {signal.SIGINT: "interrupted", signal.SIGTERM: "interrupted by SIGTERM"}[signum]
    out = tmp_path / "c.txt"
    argv = ["--data", pictures, "--model", blip, "--out", str(out), *FAST, "--batch-size", "4",
            "--workers", "1"]
    (tmp_path / "paused.py").write_text(PAUSED_AFTER_A_BATCH)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = Forked(tmp_path / "paused.py", [os.path.join(ROOT, "caption_images.py"), *argv], env,
               new_session=True)
    try:
        for line in p.stdout:
            if line.strip() == "PAUSED":
                break
        else:
            raise AssertionError(f"ended before its pause: {p.stderr.read()}")
        (os.killpg if how == "ctrl-c" else os.kill)(p.pid, signum)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert (p.returncode, err) == (128 + signum, f"{word}; the captions written so far are "
                                   "kept: run the same command again to continue\n")
    assert ended(group=p.pid, timeout=30)  # the worker ends with its captioner: none left
    assert len((tmp_path / "c.txt.parts" / "rank0.txt").read_text().splitlines()) == 4
    caption_images.main(argv)
    assert out.read_bytes() == captions


def test_caption_images_full_disk_names_the_file_and_the_rerun_continues(
        pictures, blip, captions, tmp_path):
    """A disk with room for the claim and the settings but not for the captions (a 32 KB
    tmpfs, filled but for two pages; needs root, else skipped): one line naming the part file
    and the cause; with room again the same command writes the file of an uninterrupted run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with open(disk / "filler", "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(bytes(4096))
        os.truncate(disk / "filler", os.path.getsize(disk / "filler") - 2 * 4096)
        argv = ["--data", pictures, "--model", blip, "--out", str(disk / "c.txt"), *FAST,
                "--batch-size", "4"]
        with pytest.raises(UserError) as e:
            caption_images.main(argv)
        assert str(e.value) == f"cannot write {disk}/c.txt.parts/rank0.txt: No space left on device"
        os.remove(disk / "filler")
        caption_images.main(argv)
        assert (disk / "c.txt").read_bytes() == captions
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_export_into_a_read_only_run_folder_is_one_line(finished, tmp_path):
    """A run folder that cannot be written (its export/ gone): one line naming the folder."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "export")
    with read_only(str(run)):
        with pytest.raises(UserError) as e:
            export_tool.main([str(run)])
    assert str(e.value) in (f"cannot write to {run}/export: Read-only file system",
                            f"cannot write to {run}/export: Permission denied")


# ----------------------------------------------------------------------------
# (2) Two runs, one place: the second is refused at its start, naming the first

def claims(kind, base, pictures, folder, finished):
    """(argv of the tool, the path it claims) for a tool writing under base."""
    out = os.path.join(base, "out")
    os.makedirs(out)
    if kind == "caption_images":
        return caption_images.main, ["--data", pictures, "--model", "nowhere", "--out",
                                     f"{out}/c.txt"], f"{out}/c.txt"
    if kind == "caption_embed":
        with open(f"{base}/c.txt", "w") as f:
            f.write("a.png:\ta cat\n")
        return caption_embed.main, ["--captions", f"{base}/c.txt", "--out", f"{out}/t.pt"], \
            f"{out}/t.pt"
    if kind == "compare":
        return compare.main, base_args(folder, out, "--name", "ref"), f"{out}/ref"
    if kind == "study":
        return study.main, ["--root", f"{out}/study", "--data", f"{base}/shapes", "--docs",
                            f"{out}/docs"], f"{out}/study"
    if kind == "export":
        shutil.copytree(finished, f"{out}/run")
        return export_tool.main, [f"{out}/run"], f"{out}/run"
    if kind == "shapes":
        return shapes.main, ["--out", f"{out}/shapes"], f"{out}/shapes"
    return plot.main, [finished, "--out", f"{out}/p.png"], f"{out}/p.png"


@pytest.mark.parametrize("kind", ["caption_images", "caption_embed", "compare", "study",
                                  "export", "shapes", "plot"])
def test_a_second_process_on_the_same_output_is_refused_naming_the_first(
        kind, pictures, folder, finished, tmp_path, monkeypatch):
    """While another process writes the output (a caption file, an embeddings file, a
    comparison's or study's folder, a run folder, a data folder, a plot), the tool is refused
    in one line naming it, before it reads or writes anything."""
    main, argv, path = claims(kind, str(tmp_path), pictures, folder, finished)
    for name in ("train", "image_split"):
        monkeypatch.setattr(tt, name, lambda *a, **k: pytest.fail("work began"))
    monkeypatch.setattr(caption_embed, "TextEncoder", lambda *a: pytest.fail("work began"))
    monkeypatch.setattr(study, "prepare", lambda *a: pytest.fail("work began"))
    monkeypatch.setattr(shapes, "write", lambda *a: pytest.fail("work began"))
    with held(path) as pid:
        before = snapshot(tmp_path)  # the holder's claim among the files
        with pytest.raises(UserError) as e:
            main([str(a) for a in argv])
        assert snapshot(tmp_path) == before
    assert str(e.value).startswith(f"{os.path.abspath(path)} is being written by process {pid} ")


# ----------------------------------------------------------------------------
# (3) Reuse only of what matches

def test_compare_reuses_an_arm_only_with_the_settings_asked_for(compared, monkeypatch):
    """The same command reuses the finished arms; other settings (the issue's --label-noise
    0.5 --lr 0.01), other embeddings under the same name, or other settings of a tool's own
    arm (run_arm's settings=) are refused in one line naming what differs, before training."""
    argv, root = compared
    monkeypatch.setattr(tt, "train", lambda *a, **k: pytest.fail("an arm was trained"))
    compare.main(argv)
    with pytest.raises(UserError) as e:
        compare.main(argv + ["--label-noise", "0.5", "--lr", "0.01"])
    assert str(e.value) == (f"{root}/seed0-baseline was trained with label_noise 0.0, lr 0.003; "
                            f"asked for 0.5, 0.01: choose another --name, or delete "
                            f"{root}/seed0-baseline")
    cfg = tt.parse_config(argv)[0]
    with pytest.raises(UserError) as e:
        compare.run_arm(cfg, f"{root}/seed0-textteacher", settings={"temperature": 2})
    assert str(e.value).startswith(f"{root}/seed0-textteacher was trained with temperature "
                                   "None; asked for 2: ")
    text = cfg.text
    with open(text, "rb") as f:
        original = f.read()
    try:  # the embeddings file replaced by another of the same shape
        emb = torch.load(text, weights_only=True)
        write_embeddings(text, emb["keys"], emb["embeddings"] + 1)
        with pytest.raises(UserError) as e:
            compare.main(argv)
        assert str(e.value).startswith(f"{root}/seed0-textteacher was trained with "
                                       "text_sha256 ")
    finally:
        with open(text, "wb") as f:
            f.write(original)


def test_an_unfinished_arm_is_continued_only_with_its_settings_and_never_taken_as_finished(
        folder, tmp_path, monkeypatch, capsys):
    """A comparison stopped by SIGTERM (kill, systemd, SLURM) in the baseline's second epoch:
    one line with its advice and exit 143. Its arm then got an export/ (as the old export.py
    wrote one of any checkpoint): continued only with its own settings, and then trained to
    its last epoch, not reused with one epoch of two; on the way, Ctrl-C (SIGINT) in the text
    arm's second epoch is one line with the same advice and exit 130, and followed, the text
    arm continues from its first: both arms end with the logs of a comparison never stopped."""
    argv = [str(a) for a in base_args(folder, tmp_path, *CHEAP, "--name", "u")]
    signal_at_step(monkeypatch, 7, signal.SIGTERM)  # 6 steps per epoch: epoch 2's first
    capsys.readouterr()
    assert command_here("experiments/compare.py", argv) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted by SIGTERM; every arm keeps its last checkpoint: run the same command "
        "again to continue"]
    monkeypatch.undo()
    arm = tmp_path / "u" / "seed0-baseline"
    ckpt = checkpoint(arm)
    assert ckpt["epoch"] == 1
    vit = tt.ViT(**ckpt["model_args"])
    vit.load_state_dict({k[4:]: v for k, v in ckpt["model"].items() if k.startswith("vit.")})
    tt.export(vit, ckpt["model_args"], ckpt["classes"], str(arm / "export"))
    with pytest.raises(UserError) as e:
        compare.main(argv + ["--lr", "0.01"])
    assert str(e.value).startswith(f"{arm} was trained with lr 0.003; asked for 0.01: ")
    assert checkpoint(arm)["epoch"] == 1
    with monkeypatch.context() as mp:  # the baseline's epoch 2, the text arm's 1, then its 2
        signal_at_step(mp, 6 + 6 + 1, signal.SIGINT)
        capsys.readouterr()
        assert command_here("experiments/compare.py", argv) == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted; every arm keeps its last checkpoint: run the same command again to "
        "continue"]
    assert checkpoint(tmp_path / "u" / "seed0-textteacher")["epoch"] == 1
    summary = compare.main(argv)
    assert len(metrics(arm)) == 2 and len(summary["top1_per_epoch"]["baseline"]) == 2
    compare.main(argv[:-1] + ["whole"])  # never stopped: the same logs, arm by arm
    for a in ("seed0-baseline", "seed0-textteacher"):
        assert untimed(tmp_path / "u" / a) == untimed(tmp_path / "whole" / a), a


def test_export_of_an_unfinished_run_is_refused_or_kept_apart(folder, tmp_path):
    """export.py of a run stopped after epoch 1 of 2: refused in one line, nothing written;
    with --unfinished it goes to export-epoch1/, and export/ never holds a program of other
    weights than its own (after the run is finished: no model.pt2 of epoch 1 beside them)."""
    cfg, given = tt.parse_config(base_args(folder, tmp_path, *CHEAP, "--name", "r"))
    run = tmp_path / "r"
    with pytest.MonkeyPatch.context() as m:
        signal_at_step(m, 7, signal.SIGINT)  # Ctrl-C in epoch 2's first step
        with pytest.raises(KeyboardInterrupt):
            tt.train(cfg, given)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        export_tool.main([str(run)])
    assert str(e.value) == (f"{run} has trained 1 of its 2 epochs: finish it (python "
                            f"textteacher.py --resume {run}), or pass --unfinished to export "
                            f"this checkpoint to {run}/export-epoch1")
    assert snapshot(tmp_path) == before
    export_tool.main([str(run), "--unfinished"])
    assert sorted(os.listdir(run / "export-epoch1")) == ["config.json", "model.pt2",
                                                         "model.safetensors"]
    assert not (run / "export").exists()
    assert tt.main(["--resume", str(run)]) is None
    assert sorted(os.listdir(run / "export")) == ["config.json", "model.safetensors"]


def test_a_failed_export_leaves_no_program_of_other_weights(finished, tmp_path, monkeypatch):
    """export.py stopped after writing the weights and before the program: the model.pt2 of
    an earlier export is gone, not left to give other logits than the weights beside it."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "export" / "model.pt2").write_bytes(b"an older program")

    def fail(*a, **k):
        raise RuntimeError("torch.export failed")
    monkeypatch.setattr(torch.export, "export", fail)
    with pytest.raises(RuntimeError):
        export_tool.main([str(run)])
    assert sorted(os.listdir(run / "export")) == ["config.json", "model.safetensors"]


def test_alignment_without_matching_validation_captions_is_left_out(folder, tmp_path, capsys):
    """Validation captions of other images (another data set's): the alignment metrics are
    left out with a note, where the last epoch used to crash on them."""
    root, text, keys = folder
    path = write_embeddings(tmp_path / "t.pt", keys, torch.randn(len(keys), 16),
                            val_keys=["x.png", "y.png"], val_embeddings=torch.randn(2, 16))
    cfg = tt.Config(data=root, data_dir="", model="micro", img_size=16, patch_size=8, epochs=1,
                    text=path)
    capsys.readouterr()
    assert compare.alignment(cfg, path) is None
    assert capsys.readouterr().err == (f"note: 0 validation images of {root} have a caption in "
                                       f"{path} (another data set's captions?): the alignment "
                                       "metrics are left out\n")


# ----------------------------------------------------------------------------
# (4) --force replaces what the tool wrote, never an input or a file of the user's

@pytest.mark.parametrize("force", [[], ["--force"]])
def test_shapes_never_draws_over_a_folder_it_did_not_write(force, tmp_path):
    data = tmp_path / "MYDATA"
    write_png(data / "train" / "cat" / "a.png", (8, 8), 0)
    (data / "captions_train.txt").write_text("a.png:\tmy own caption\n")
    (data / "text.pt").write_bytes(b"my own embeddings")
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        shapes.main(["--out", str(data), *force])
    assert str(e.value) == (f"{data} holds files that experiments/shapes.py did not write, and "
                            "--force redraws only its own shapes set: choose another --out (an "
                            "old shapes set, from before shapes.json: delete it)")
    assert snapshot(tmp_path) == before


def test_shapes_draws_its_own_set_again_only_with_force(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes.write, "__defaults__", ({"train": (20, 0), "val": (10, 1)},))
    embedded = []
    monkeypatch.setattr(shapes, "embed", lambda attrs, paths, out: embedded.append(out))
    out = str(tmp_path / "s")
    shapes.main(["--out", out])
    with pytest.raises(UserError, match="already holds the shapes set; pass --force"):
        shapes.main(["--out", out])
    shapes.main(["--out", out, "--force"])
    assert embedded == [f"{out}/text.pt"] * 2
    with open(f"{out}/{shapes.MARKER}") as f:
        assert json.load(f)["tool"] == "experiments/shapes.py"


@pytest.mark.parametrize("flag", ["--captions", "--val-captions", "--import-zip"])
def test_caption_embed_never_writes_over_an_input(flag, tmp_path, monkeypatch):
    """--out naming an input (also by another path to it, or through a link) is refused,
    with or without --force, and the input is left as it was."""
    monkeypatch.setattr(caption_embed, "TextEncoder", lambda *a: pytest.fail("model loaded"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("a.png:\ta cat\n")
    (tmp_path / "v.txt").write_text("b.png:\ta dog\n")
    (tmp_path / "z.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    source = {"--captions": "c.txt", "--val-captions": "v.txt", "--import-zip": "z.zip"}[flag]
    argv = ["--captions", "c.txt", "--val-captions", "v.txt"] if flag != "--import-zip" else [
        "--import-zip", "z.zip"]
    os.symlink(source, tmp_path / "link")
    before = snapshot(tmp_path)
    for out in (source, f"./{source}", str(tmp_path / source), "link"):
        with pytest.raises(UserError) as e:
            caption_embed.main([*argv, "--out", out, "--force"])
        assert str(e.value) == (f"--out {out} is the {flag} file, an input: name another file "
                                "for the embeddings")
    assert snapshot(tmp_path) == before


def test_caption_embed_force_replaces_only_an_embeddings_file(tmp_path):
    """--force replaces an embeddings file (this script's format), never another file."""
    import io
    import zipfile
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        for key in ("a.png", "b.png"):
            buf = io.BytesIO()
            np.save(buf, np.ones(4, np.float32) * len(key))
            zf.writestr(f"{key}.emb.npy", buf.getvalue())
    out = tmp_path / "t.pt"
    caption_embed.main(["--import-zip", str(tmp_path / "z.zip"), "--out", str(out)])
    caption_embed.main(["--import-zip", str(tmp_path / "z.zip"), "--out", str(out), "--force"])
    for name, content in (("notes.pt", b"my notes"), ("model.pt", None)):
        mine = tmp_path / name
        if content is None:
            torch.save({"weights": torch.ones(2)}, mine)  # a torch file, not embeddings
        else:
            mine.write_bytes(content)
        before = mine.read_bytes()
        with pytest.raises(UserError) as e:
            caption_embed.main(["--import-zip", str(tmp_path / "z.zip"), "--out", str(mine),
                                "--force"])
        assert str(e.value) == (f"{mine} is not an embeddings file of caption_embed.py, and "
                                "--force replaces only those: choose another --out")
        assert mine.read_bytes() == before


def test_caption_images_force_replaces_only_its_own_caption_file(pictures, tmp_path):
    """--force replaces a caption file caption_images.py wrote (OUT.json says so), never a
    file of the user's, nor a user's OUT.json beside a new OUT; refused before the model."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    (tmp_path / "new.txt.json").write_text('{"mine": 1}')
    before = snapshot(tmp_path)
    for out, message in ((notes, f"{notes} was not written by caption_images.py (no {notes}"
                          f".json of its own beside it), and --force replaces only its own "
                          "caption files: choose another --out"),
                         (tmp_path / "new.txt", f"{tmp_path}/new.txt.json was not written by "
                          "caption_images.py: choose another --out")):
        with pytest.raises(UserError) as e:
            caption_images.main(["--data", pictures, "--model", "nowhere/no-such-model",
                                 "--out", str(out), "--force"])
        assert str(e.value) == message
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------
# (5) and (6): 16-bit images, a caption longer than the model, a metrics file torn or empty

def test_caption_images_reads_a_16_bit_png_as_its_8_bit_image(tmp_path):
    """A 16-bit grey PNG is captioned as the image it shows, not as an almost white one."""
    from PIL import Image
    grey = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # up to 63000 of 65535
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "train" / cls)
        Image.fromarray(grey).save(tmp_path / "train" / cls / f"{cls}.png")
    dataset, _, _ = tt.image_split(str(tmp_path), None, "train")
    _, image = caption_images.Share(dataset, [0])[0]
    expected = np.round(grey / 257).astype(np.uint8)
    assert np.abs(np.asarray(image)[..., 0].astype(int) - expected).max() <= 1


def test_caption_images_refuses_more_new_tokens_than_the_model_has_positions(
        pictures, blip, tmp_path, monkeypatch):
    """The tiny BLIP has 64 text positions: --max-new-tokens 65 ends in one line before the
    weights load and before any caption, where it used to fail mid-run (IndexError)."""
    import transformers
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(UserError) as e:
        caption_images.main(["--data", pictures, "--model", blip, "--out",
                             str(tmp_path / "c.txt"), "--max-new-tokens", "65", "--workers", "0"])
    assert str(e.value) == f"--max-new-tokens 65 is more than {blip} can write: at most 64"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content, message", [
    ("", "metrics.jsonl holds no epoch yet: plot it once its first epoch has ended"),
    ('{"epoch": 1, "top1": 5.0, "loss_txt": null}\n{"epoch": 2, "to',
     "metrics.jsonl, line 2: not an epoch record of textteacher.py (a torn copy?)"),
], ids=["empty", "torn"])
def test_plot_of_an_empty_or_torn_metrics_file_is_one_line(content, message, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError) as e:
        plot.main([str(run), "--out", str(tmp_path / "p.png")])
    assert str(e.value) == f"{run}/{message}"
    assert sorted(os.listdir(tmp_path)) == ["run"]


# ----------------------------------------------------------------------------
# The plumbing behind (2) and (3): where run_arm keeps an arm's settings, a study's workers

def test_run_arm_keeps_the_settings_of_a_new_arm_beside_it(tmp_path, monkeypatch):
    """run_arm(settings=...) records them in FOLDER.arm.json before the trainer makes the
    folder (which must stay free of other files until its first checkpoint)."""
    seen = []
    monkeypatch.setattr(tt, "train", lambda cfg, **k: seen.append(
        (cfg.resume, os.path.exists(f"{tmp_path}/a"))) or os.makedirs(f"{tmp_path}/a"))
    monkeypatch.setattr(compare, "read_metrics", lambda folder: [])
    cfg = dataclasses.replace(tt.Config(), epochs=1)
    compare.run_arm(cfg, f"{tmp_path}/a", settings={"teacher": "t", "temperature": (2, 1)})
    assert seen == [("", False)]
    with open(f"{tmp_path}/a.arm.json") as f:
        assert json.load(f) == {"teacher": "t", "temperature": [2, 1]}


def test_a_failed_study_worker_is_one_line(tmp_path, monkeypatch):
    """A worker of the study that fails on an input error: the study ends in that one line
    (with the worker's exit code), not in the worker's line and one of its own."""
    worker = tmp_path / "worker.py"
    worker.write_text("import sys\nprint('error: no data here', file=sys.stderr)\nsys.exit(2)\n")
    with pytest.raises(UserError) as e:
        runner.start_workers(str(worker), [], 2)
    assert str(e.value) == ("no data here (worker 0; the finished runs are kept: run the same "
                            "command again to continue)") and e.value.code == 2

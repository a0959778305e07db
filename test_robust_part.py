"""Tests of distributed training, exact resume and bad input: CPU, offline.

To be merged into test_textteacher.py. Run: python -m pytest -q test_robust_part.py
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from test_textteacher import HERE, cli, metrics, run, tt, write_embeddings

TIMING = {"images_per_s", "epoch_time"}  # the only fields of metrics.jsonl that may differ between equal runs


# ----------------------------------------------------------------------------
# helpers

def write_folder(root, classes=("a", "b", "c"), train=64, val=11):
    """An image folder of random 36x40 PNGs (train/CLASS, val/CLASS); returns the training file names.
    3 x 11 = 33 validation images: an odd number, so two ranks cannot split it evenly."""
    from PIL import Image
    rng = np.random.default_rng(0)
    keys = []
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                name = f"{c}_{split}_{i}.png"
                Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(os.path.join(root, split, c, name))
                if split == "train":
                    keys.append(name)
    return keys


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(data folder, embeddings file of its 192 training images, their keys)."""
    base = tmp_path_factory.mktemp("data")
    keys = write_folder(str(base / "pets"))
    write_embeddings(base / "text.pt", keys, torch.randn(len(keys), 32, generator=torch.Generator().manual_seed(0)))
    return str(base / "pets"), str(base / "text.pt"), keys


def base_args(folder, out):
    """A small run on the image folder: 6 steps of 32 per epoch, 2 epochs."""
    root, text, _ = folder
    return ["--data", root, "--text", text, "--img-size", "32", "--patch-size", "8", "--model", "micro",
            "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1", "--workers", "0", "--log-every", "10",
            "--out-dir", str(out)]


# every source of randomness on: stochastic depth, CutMix, 3-Augment; 6 steps of 16 per epoch
RANDOM = ["--drop-path", "0.1", "--cutmix", "1.0", "--augment", "3aug", "--batch-size", "16", "--limit", "96"]
CHEAP = ["--augment", "crop"]  # where augmentation is not the point


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def untimed(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run_dir)]


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def snapshot(folder):
    """Every file under folder with its bytes: to show that a refused command wrote nothing."""
    out = {}
    for dp, _, fns in os.walk(folder):
        for fn in fns:
            with open(os.path.join(dp, fn), "rb") as f:
                out[os.path.join(dp, fn)] = f.read()
    return out


def fails(capsys, argv, code=2):
    """Run in this process; assert the exit code and one stderr line, and return that line."""
    capsys.readouterr()
    assert run(argv) == code
    return one_line(capsys.readouterr().err)


class StopAfter(dict):
    """A stop flag as main's signal handler sets it, raised after n steps (read once per step)."""

    def __init__(self, n):
        super().__init__(signal=None)
        self.reads, self.n = 0, n

    def __getitem__(self, key):
        self.reads += 1
        return int(signal.SIGINT) if self.reads >= self.n else None


def same_threads():
    """The environment of a subprocess that must compute bit for bit like this process: the
    same number of intra-op threads (a sum split over other threads may round differently)."""
    return dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """An uninterrupted run with every source of randomness on, in this process with --workers 0:
    the interrupted runs below (some with workers, some in a script) must end bit-identical to it."""
    out = tmp_path_factory.mktemp("ref")
    assert run(base_args(folder, out) + RANDOM + ["--name", "full"]) == 0
    return str(out / "full")


# ----------------------------------------------------------------------------
# distributed training and gradient accumulation

def sensitive(args):
    """Make a step proportional to the gradient: AdamW with eps 1 moves each weight by about
    lr * g / (|g| + 1) ~ g, no clipping, no warm-up; so a gradient scaled by 2 (a missing
    1 / accum, a sum instead of a mean over ranks) shows in the weights."""
    return args + ["--optimizer", "adamw", "--opt-eps", "1", "--lr", "1", "--weight-decay", "0", "--clip-grad", "0",
                   "--warmup-epochs", "0", "--epochs", "1", "--batch-size", "64", "--drop-path", "0", "--cutmix", "0"] + CHEAP


def test_accumulation_of_2x32_equals_one_batch_of_64_without_text(folder, tmp_path):
    args = sensitive(base_args(folder, tmp_path)) + ["--text-loss-lambda", "0", "--limit", "128"]  # 2 steps
    assert run(args + ["--accum", "1", "--name", "one"]) == 0
    assert run(args + ["--accum", "2", "--name", "two"]) == 0
    one, two = checkpoint(tmp_path / "one")["model"], checkpoint(tmp_path / "two")["model"]
    torch.manual_seed(0)
    init = tt.build_model(tt.parse_config(args)[0], 3, 0).state_dict()
    assert max((one[k] - init[k]).abs().max() for k in one) > 1e-2  # the weights did move
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {here!r})
import textteacher as tt
built, build, val, evaluate = [], tt.build_model, [], tt.evaluate
tt.build_model = lambda *a: built.append(build(*a)) or built[-1]  # keep this rank's model...
tt.evaluate = lambda vit, loader, *a: val.append(list(loader.sampler)) or evaluate(vit, loader, *a)  # ...and val share
tt.main(sys.argv[2:])
torch.save(dict(model=built[0].state_dict(), val=val[0]), os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
"""


def test_two_processes_equal_one_with_accumulation_and_count_each_val_image_once(folder, tmp_path):
    """torchrun with 2 gloo processes x accum 2 x 16 per device must equal 1 process x accum 4
    x 16: the same micro-batches (the sampler's split), the same contrastive loss on each, the
    gradient averaged the same way; and both ranks must hold the same weights."""
    args = sensitive(base_args(folder, tmp_path))
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT.format(here=HERE))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        str(tmp_path / "ddp.py"), str(tmp_path), *args, "--accum", "2", "--name", "ddp"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sum(line.startswith("run ") for line in r.stdout.splitlines()) == 1  # rank 0 alone prints...
    assert len(metrics(str(tmp_path / "ddp"))) == 1  # ...and logs
    (rank0, val0), (rank1, val1) = (torch.load(tmp_path / f"rank{r}.pt").values() for r in (0, 1))
    assert sorted(val0 + val1) == list(range(33))  # each validation image on exactly one rank
    assert_same_weights(rank0, rank1)
    assert any(k.startswith("text_head") for k in rank0)
    assert_same_weights(rank0, checkpoint(tmp_path / "ddp")["model"])

    assert run(args + ["--accum", "4", "--name", "single"]) == 0
    single = checkpoint(tmp_path / "single")["model"]
    for k in single:
        torch.testing.assert_close(rank0[k], single[k], rtol=0, atol=1e-6, msg=k)

    # the accuracy the two ranks reported is that of one process evaluating all 33 images
    cfg = tt.parse_config(args)[0]
    _, val, _, classes, *_ = tt.build_data(cfg)
    model = tt.build_model(cfg, len(classes), 32)
    model.load_state_dict(rank0)
    loader = torch.utils.data.DataLoader(tt.EvalSet(val, 32), batch_size=7)
    top1, top5 = tt.evaluate(model.vit, loader, torch.device("cpu"), tt.contextlib.nullcontext(), False)
    m = metrics(str(tmp_path / "ddp"))[0]
    assert len(val) == 33 and 0 < top1 < 100  # 33 images: an image counted twice or missed would change top1...
    assert (m["top1"], m["top5"]) == (top1, top5)  # ...so equal numbers mean equal counts


# ----------------------------------------------------------------------------
# exact resume

def test_sigkill_mid_epoch_then_resume_is_bit_identical(folder, reference, tmp_path, capsys):
    args = base_args(folder, tmp_path) + RANDOM + ["--workers", "2", "--name", "cut"]
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "textteacher.py"), *args, "--ckpt-every", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=same_threads())
    path, deadline = tmp_path / "cut" / "checkpoint.pt", time.time() + 240
    try:
        while time.time() < deadline and p.poll() is None:
            if path.exists() and torch.load(path, weights_only=True)["step"] > 0:
                break
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = checkpoint(tmp_path / "cut")
    assert killed_at["step"] > 0  # the run died mid-epoch and continues from there
    capsys.readouterr()
    assert run(["--resume", str(tmp_path / "cut"), "--workers", "2"]) == 0
    assert f"resuming at epoch {killed_at['epoch'] + 1} step {killed_at['step']}" in capsys.readouterr().out
    assert_same_weights(checkpoint(tmp_path / "cut")["model"], checkpoint(reference)["model"])
    assert untimed(str(tmp_path / "cut")) == untimed(reference)


def test_ctrl_c_saves_a_checkpoint_and_resume_is_bit_identical(folder, reference, tmp_path):
    """Ctrl-C reaches the whole process group (the data workers too); the run finishes its
    step, saves, prints one line and exits with 130."""
    args = base_args(folder, tmp_path) + RANDOM + ["--workers", "2", "--name", "c"]
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "textteacher.py"), *args], start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=same_threads())
    try:
        for line in p.stdout:
            if line.startswith("epoch 1/2"):
                os.killpg(p.pid, signal.SIGINT)
                break
        _, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    line = one_line(err)
    stopped = checkpoint(tmp_path / "c")
    assert line.startswith(f"stopped by signal 2 at epoch 2 step {stopped['step']};") and f"--resume {tmp_path / 'c'}" in line
    assert stopped["epoch"] == 1 and stopped["step"] > 0 and len(metrics(str(tmp_path / "c"))) == 1
    assert run(["--resume", str(tmp_path / "c")]) == 0
    assert_same_weights(checkpoint(tmp_path / "c")["model"], checkpoint(reference)["model"])
    assert untimed(str(tmp_path / "c")) == untimed(reference)


def test_stop_at_the_last_step_of_an_epoch_then_resume(folder, reference, tmp_path):
    """A stop after the epoch's last step, before its evaluation: the resumed run starts with
    no step left in the epoch and must still evaluate and log it."""
    cfg, given = tt.parse_config(base_args(folder, tmp_path) + RANDOM + ["--name", "last"])
    with pytest.raises(tt.Interrupted):
        tt.train(cfg, given, StopAfter(6))
    stopped = checkpoint(tmp_path / "last")
    assert (stopped["epoch"], stopped["step"]) == (0, 6) and not os.path.exists(tmp_path / "last" / "metrics.jsonl")
    assert run(["--resume", str(tmp_path / "last")]) == 0
    assert_same_weights(checkpoint(tmp_path / "last")["model"], checkpoint(reference)["model"])
    assert untimed(str(tmp_path / "last")) == untimed(reference)


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_resume_logs_each_epoch_once(folder, reference, tmp_path, monkeypatch):
    """The disk fills while the end-of-epoch-1 checkpoint is written, after epoch 1 was logged:
    the previous checkpoint (epoch 1, step 4) must be intact, no temporary file left, and the
    resumed run must not log epoch 1 twice."""
    save, saves = torch.save, []

    def disk_full_on_third_checkpoint(obj, f, *a, **k):
        if "checkpoint" in str(f):
            saves.append(str(f))
            if len(saves) == 3:
                with open(f, "wb") as out:
                    out.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(28, "No space left on device")
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", disk_full_on_third_checkpoint)
    with pytest.raises(OSError, match="No space"):
        run(base_args(folder, tmp_path) + RANDOM + ["--name", "full", "--ckpt-every", "2"])
    monkeypatch.setattr(torch, "save", save)
    assert os.path.basename(saves[2]) != "checkpoint.pt"  # written to a temporary file...
    assert sorted(os.listdir(tmp_path / "full")) == ["checkpoint.pt", "config.json", "metrics.jsonl"]  # ...now removed
    previous = checkpoint(tmp_path / "full")
    assert (previous["epoch"], previous["step"]) == (0, 4) and len(metrics(str(tmp_path / "full"))) == 1
    assert run(["--resume", str(tmp_path / "full")]) == 0
    assert_same_weights(checkpoint(tmp_path / "full")["model"], checkpoint(reference)["model"])
    assert untimed(str(tmp_path / "full")) == untimed(reference)


REAL_CROSS_ENTROPY = torch.nn.functional.cross_entropy


def nan_at_call(monkeypatch, n):
    """Make the n-th classification loss NaN (counted from 1; one call per step without text)."""
    real, calls = REAL_CROSS_ENTROPY, []

    def cross_entropy(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == n else loss
    monkeypatch.setattr(tt.F, "cross_entropy", cross_entropy)


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch, capsys):
    args = base_args(folder, tmp_path) + CHEAP + ["--text-loss-lambda", "0", "--ckpt-every", "2"]
    nan_at_call(monkeypatch, 4)  # step 3 (0-based); found at step 4's checkpoint boundary
    line = fails(capsys, args + ["--name", "nan"], code=1)
    assert line.startswith("error: the loss became NaN or infinite at step 3;") and str(tmp_path / "nan") in line
    kept = checkpoint(tmp_path / "nan")
    assert (kept["epoch"], kept["step"]) == (0, 2) and all(torch.isfinite(v).all() for v in kept["model"].values())
    # a stop requested after the NaN step (between two boundaries) must not save the NaN weights
    nan_at_call(monkeypatch, 3)
    cfg, given = tt.parse_config(args + ["--name", "nan2"])
    with pytest.raises(tt.Diverged, match="at step 2;"):
        tt.train(cfg, given, StopAfter(3))
    assert checkpoint(tmp_path / "nan2")["step"] == 2


# ----------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written

@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A finished one-epoch run with a 32-d text head, and its own copy of the embeddings."""
    out = tmp_path_factory.mktemp("done")
    shutil.copy(folder[1], out / "text.pt")
    args = base_args(folder, out) + CHEAP + ["--epochs", "1", "--text", str(out / "text.pt"), "--name", "x"]
    assert run(args) == 0
    return str(out / "x"), args, str(out / "text.pt")


def test_data_folder_missing_or_empty(tmp_path, capsys):
    args = ["--data", "imagenet", "--model", "micro", "--out-dir", str(tmp_path), "--name", "r"]
    line = fails(capsys, args + ["--data-dir", str(tmp_path / "nowhere")])
    assert line.startswith("error: data folder") and "nowhere is missing or empty" in line
    os.makedirs(tmp_path / "empty")
    assert "empty is missing or empty" in fails(capsys, args + ["--data-dir", str(tmp_path / "empty")])
    assert not os.path.exists(tmp_path / "r")


def test_class_folder_without_images(folder, tmp_path, capsys):
    root = str(tmp_path / "d")
    write_folder(root, train=2, val=1)
    os.makedirs(os.path.join(root, "train", "zebra"))
    open(os.path.join(root, "train", "zebra", "notes.txt"), "w").close()
    line = fails(capsys, ["--data", root, "--out-dir", str(tmp_path), "--name", "r"])
    assert line == f"error: class folder {os.path.join(root, 'train', 'zebra')} has no images; remove it or add its images"
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("workers, subprocess_", [(0, False), (2, False), (2, True)])
def test_an_undecodable_image_is_named(tmp_path, capsys, workers, subprocess_):
    """Decoded in the main process (workers 0) or in a DataLoader worker, whose error arrives
    wrapped in the worker's traceback; in this process and in a script: the same one line."""
    root = str(tmp_path / "d")
    write_folder(root, train=4, val=1)
    bad = os.path.join(root, "train", "b", "b_train_1.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    args = ["--data", root, "--img-size", "32", "--patch-size", "8", "--model", "micro", "--batch-size", "4",
            "--epochs", "1", "--workers", str(workers), "--out-dir", str(tmp_path), "--name", "r"]
    expected = f"error: cannot decode image {bad} (UnidentifiedImageError); delete or replace the file"
    if subprocess_:
        r = cli(*args)
        assert r.returncode == 2 and one_line(r.stderr) == expected
        return
    assert fails(capsys, args) == expected
    # the run had started: its folder holds no checkpoint, and the same command says what to do
    before = snapshot(tmp_path / "r")
    assert "saved no checkpoint" in fails(capsys, args) and snapshot(tmp_path / "r") == before


def test_embeddings_of_another_dataset(folder, tmp_path, capsys):
    args = base_args(folder, tmp_path) + ["--name", "r"]
    write_embeddings(tmp_path / "other.pt", [f"n0144_{i}.JPEG" for i in range(300)], torch.randn(300, 8))
    line = fails(capsys, args + ["--text", str(tmp_path / "other.pt")])
    assert "192 of 192 training images have no text target" in line and "another dataset" in line
    # keys can match by chance (shapes and CIFAR-100 are both keyed 0, 1, ...): the dataset tag decides
    _, _, keys = folder
    write_raw_embeddings(tmp_path / "cifar.pt", keys, torch.randn(len(keys), 8), dataset="cifar100")
    line = fails(capsys, args + ["--data", "imagenet", "--data-dir", folder[0], "--text", str(tmp_path / "cifar.pt")])
    assert line == (f"error: {tmp_path / 'cifar.pt'} holds the captions of cifar100, not of --data imagenet; "
                    "embed the captions of imagenet with caption_embed.py")
    assert not os.path.exists(tmp_path / "r")


def write_raw_embeddings(path, keys, vectors, **changes):
    """write_embeddings, then some fields replaced (e.g. split)."""
    write_embeddings(path, keys, vectors)
    emb = torch.load(path, weights_only=True)
    emb.update(changes)
    torch.save(emb, path)


def test_embeddings_of_the_validation_split(folder, tmp_path, capsys):
    _, _, keys = folder
    write_raw_embeddings(tmp_path / "val.pt", keys, torch.randn(len(keys), 8), split="val")
    line = fails(capsys, base_args(folder, tmp_path) + ["--text", str(tmp_path / "val.pt"), "--name", "r"])
    assert line.startswith("error: ") and "holds the 'val' split" in line
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_embeddings_with_nan_or_inf(folder, tmp_path, capsys, bad):
    _, _, keys = folder
    vectors = torch.randn(len(keys), 8)
    vectors[100, 3] = bad
    write_embeddings(tmp_path / "bad.pt", keys, vectors)
    line = fails(capsys, base_args(folder, tmp_path) + ["--text", str(tmp_path / "bad.pt"), "--name", "r"])
    assert line == f"error: {tmp_path / 'bad.pt'} contains NaN or inf values; write it again with caption_embed.py"
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("flag", ["1", "-0.1"])
def test_text_loss_lambda_outside_0_1(folder, tmp_path, capsys, flag):
    line = fails(capsys, base_args(folder, tmp_path) + ["--text-loss-lambda", flag, "--name", "r"])
    assert line.startswith(f"error: --text-loss-lambda must be in [0, 1), got {float(flag)}")
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("flag, value, least", [("--accum", "0", 1), ("--batch-size", "0", 1), ("--log-every", "0", 1),
                                                ("--ckpt-every", "-1", 0), ("--workers", "-2", -1)])
def test_counts_out_of_range(folder, tmp_path, capsys, flag, value, least):
    line = fails(capsys, base_args(folder, tmp_path) + [flag, value, "--name", "r"])
    assert line == f"error: {flag} must be at least {least}, got {value}"
    assert not os.path.exists(tmp_path / "r")


def test_a_per_device_batch_of_one_with_the_text_loss(folder, tmp_path, capsys):
    line = fails(capsys, base_args(folder, tmp_path) + ["--batch-size", "2", "--accum", "2", "--name", "r"])
    assert line.startswith("error: the per-device batch is 1: the contrastive loss needs at least 2 images")
    assert not os.path.exists(tmp_path / "r")


def test_resume_refuses_another_model_dataset_or_embeddings_dimension(finished, folder, tmp_path, capsys):
    run_dir, args, text = finished
    before = snapshot(run_dir)
    line = fails(capsys, ["--resume", run_dir, "--model", "tiny"])
    assert line.startswith(f"error: --resume {run_dir}/checkpoint.pt is a run with other settings (model='micro')")
    line = fails(capsys, ["--resume", run_dir, "--data", "shapes"])
    assert f"(data={folder[0]!r}" in line
    saved = open(text, "rb").read()
    try:  # the run's embeddings file replaced by one of another dimension
        _, _, keys = folder
        write_embeddings(text, keys, torch.randn(len(keys), 16))
        line = fails(capsys, ["--resume", run_dir])
        assert line.startswith(f"error: the checkpoint's text head has 32 dimensions but {text} has 16")
    finally:
        open(text, "wb").write(saved)
    assert snapshot(run_dir) == before


def test_an_existing_run_is_not_overwritten(finished, capsys):
    run_dir, args, _ = finished
    before = snapshot(run_dir)
    line = fails(capsys, args)
    assert line == f"error: {run_dir} already holds a run; continue it with --resume {run_dir} or choose another --name"
    assert snapshot(run_dir) == before

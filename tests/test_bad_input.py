"""Every failure a user can cause in textteacher.py ends in one line on stderr, starting
"error:", with the exit code of its kind (2 for bad input, 1 for a diverged run, 130 for
Ctrl-C), and leaves nothing behind that would block the next command. The groups follow the
five kinds of defect of issue 10: (1) recovery from divergence, (2) output locations and full
disks, (3) resuming with other text targets or from elsewhere, (4) numbers and names that must
be checked where they enter, (5) the newcomer's demo; then the other bad inputs (data folders,
embeddings files, resume).

Run: python -m pytest -q tests/test_bad_input.py
"""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
import tqdm
from common import (CHEAP, RANDOM, ROOT, TEXT_DIM, assert_same_weights, base_args, checkpoint,
                    crash_in_epoch, fails, folder, metrics, poison_at_call, run, snapshot,
                    untimed, write_embeddings, write_folder)

import textteacher as tt

assert folder  # a fixture, used by name


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """An uninterrupted run with every source of randomness on: runs that failed a write and
    were resumed must end bit-identical to it."""
    out = tmp_path_factory.mktemp("ref")
    assert run(base_args(folder, out, *RANDOM, "--name", "full")) == 0
    return str(out / "full")


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """A finished two-epoch run with its own copy of the embeddings, and what it printed."""
    out = tmp_path_factory.mktemp("done")
    shutil.copy(folder[1], out / "text.pt")
    args = base_args(folder, out, *CHEAP, "--text", out / "text.pt", "--name", "x")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert run(args) == 0
    return str(out / "x"), [str(a) for a in args], str(out / "text.pt"), stdout.getvalue()


@contextlib.contextmanager
def mounted_tmpfs(path, options):
    """A tmpfs at path (root only; else the test is skipped), unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ----------------------------------------------------------------------------
# (1) Recovery from divergence: advice that can be followed, from a checkpoint before the bad step

def test_divergence_points_at_a_resume_with_a_lower_lr_from_before_the_bad_step(
        folder, tmp_path, monkeypatch, capsys):
    """An infinite loss at step 4: the run stops (exit 1) with one line pointing at
    `--resume RUN --lr`; the checkpoint it leaves (step 2) holds exactly the weights and
    optimiser state of a clean run at step 2, so none of the bad step's update; and the advice,
    followed as written with a lower --lr, is accepted, printed, and runs to the end."""
    args = base_args(folder, tmp_path, "--ckpt-every", "2")
    poison_at_call(monkeypatch, 4)
    run_dir = str(tmp_path / "bad")
    line = fails(capsys, args + ["--name", "bad"], code=1)
    assert line == ("error: the loss or the gradient became NaN or infinite; the last checkpoint "
                    f"is from before it: --resume {run_dir} --lr LOWER (or --clip-grad LOWER)")
    monkeypatch.undo()
    real, calls = tt.step_losses, []

    def crash_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(*a, **k)
    monkeypatch.setattr(tt, "step_losses", crash_at_step_3)
    with pytest.raises(RuntimeError, match="power cut"):
        run(args + ["--name", "clean"])
    monkeypatch.undo()
    bad, clean = checkpoint(run_dir), checkpoint(tmp_path / "clean")
    assert (bad["epoch"], bad["step"]) == (clean["epoch"], clean["step"]) == (0, 2)
    assert_same_weights(bad["model"], clean["model"])
    assert bad["optimizer"]["state"].keys() == clean["optimizer"]["state"].keys()
    for k, state in bad["optimizer"]["state"].items():
        for name, value in state.items():
            other = clean["optimizer"]["state"][k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other

    resume = re.search(r"--resume (\S+) --lr LOWER", line)[1]
    capsys.readouterr()
    assert run(["--resume", resume, "--lr", "0.001"]) == 0
    assert "resuming with lr 0.003 -> 0.001" in capsys.readouterr().out
    assert len(metrics(run_dir)) == 2 and checkpoint(run_dir)["config"]["lr"] == 0.001


def test_divergence_before_the_first_checkpoint_says_so_and_leaves_no_folder(
        folder, tmp_path, monkeypatch, capsys):
    """A NaN in the very first step: there is no checkpoint to go back to, the line says so
    and what to do instead, and no run folder is left to block the same --name."""
    poison_at_call(monkeypatch, 1, float("nan"))
    line = fails(capsys, base_args(folder, tmp_path, "--name", "r"), code=1)
    assert line == ("error: the loss or the gradient became NaN or infinite; no checkpoint was "
                    "saved before it: start again with a lower --lr")
    assert not os.path.exists(tmp_path / "r")


def test_resume_refuses_other_settings_but_the_learning_rate_and_clipping(finished, capsys):
    """Only what rescues a run may change on --resume; the rest is refused in one line that
    names the setting and its value in the run, and nothing is written."""
    run_dir, args, _, _ = finished
    before = snapshot(run_dir)
    path = os.path.join(run_dir, "checkpoint.pt")
    assert fails(capsys, ["--resume", run_dir, "--model", "tiny"]) == (
        f"error: --resume {path} is a run with model='micro': drop those flags")
    data = args[args.index("--data") + 1]
    assert fails(capsys, ["--resume", run_dir, "--data", "shapes"]) == (
        f"error: --resume {path} is a run with data={data!r}: drop those flags")
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------
# (2) Output locations and disks: checked before any work, every write failure in one line

def test_an_out_dir_under_a_regular_file_is_refused_before_any_data_is_read(
        folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(tt, "image_split", lambda *a: pytest.fail("data read before the check"))
    line = fails(capsys, base_args(folder, tmp_path / "file" / "runs", "--name", "r"))
    assert line == (f"error: argument --out-dir: cannot make {tmp_path / 'file' / 'runs'}: "
                    f"{tmp_path / 'file'} is a file (see --help)")


def test_an_out_dir_that_cannot_be_written_is_refused_before_any_data_is_read(
        folder, tmp_path, monkeypatch, capsys):
    """A read-only file system (root may write anywhere else, so permissions cannot show it)."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        monkeypatch.setattr(tt, "image_split", lambda *a: pytest.fail("data read before the check"))
        line = fails(capsys, base_args(folder, ro, "--name", "r"))
        assert line == f"error: cannot write to {ro}: Read-only file system"


def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_previous_one(
        folder, reference, tmp_path, capsys):
    """A tmpfs with room for one checkpoint, not two: the second (written beside the first
    before it replaces it) fails with one line naming the path and "No space left on device";
    the first checkpoint is intact, no temporary file is left, and the run, moved to a disk
    with room, resumes to the uninterrupted run's weights and log."""
    size = os.path.getsize(os.path.join(reference, "checkpoint.pt"))
    with mounted_tmpfs(tmp_path / "small", f"size={int(size * 1.6) // 4096 * 4096}") as small:
        line = fails(capsys, base_args(folder, small, *RANDOM, "--ckpt-every", "2",
                                       "--name", "full"))
        run_dir = os.path.join(small, "full")
        assert line == (f"error: cannot write {run_dir}/checkpoint.pt: No space left on device")
        kept = checkpoint(run_dir)
        assert (kept["epoch"], kept["step"]) == (0, 2)
        assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "config.json", "log.txt",
                                               "metrics.jsonl"]
        shutil.copytree(run_dir, tmp_path / "moved")
    assert run(["--resume", tmp_path / "moved"]) == 0
    assert_same_weights(checkpoint(tmp_path / "moved")["model"], checkpoint(reference)["model"])
    assert untimed(tmp_path / "moved") == untimed(reference)


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_resume_logs_each_epoch_once(
        folder, reference, tmp_path, monkeypatch, capsys):
    """The disk fills while the end-of-epoch-1 checkpoint is written (half of it on disk): the
    previous checkpoint (step 4) is intact, no temporary file is left, and the resumed run logs
    epoch 1 once and ends bit-identical to the uninterrupted run. (Any machine: the full disk
    is simulated.)"""
    save, saves = torch.save, []

    def disk_full_on_third_checkpoint(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            saves.append(1)
            if len(saves) == 3:
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(28, "No space left on device")
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", disk_full_on_third_checkpoint)
    run_dir = tmp_path / "full"
    line = fails(capsys, base_args(folder, tmp_path, *RANDOM, "--ckpt-every", "2",
                                   "--name", "full"))
    monkeypatch.undo()
    assert line == f"error: cannot write {run_dir}/checkpoint.pt: No space left on device"
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "config.json", "log.txt",
                                           "metrics.jsonl"]
    previous = checkpoint(run_dir)
    assert (previous["epoch"], previous["step"]) == (0, 4) and metrics(run_dir) == []
    assert run(["--resume", run_dir]) == 0
    assert_same_weights(checkpoint(run_dir)["model"], checkpoint(reference)["model"])
    assert untimed(run_dir) == untimed(reference)


def test_an_existing_run_is_not_overwritten(finished, capsys):
    run_dir, args, _, _ = finished
    before = snapshot(run_dir)
    assert fails(capsys, args) == (f"error: {run_dir} holds a run: continue it with --resume "
                                   f"{run_dir}, or choose another --name")
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------
# (3) Resume checks the text targets, and works from anywhere

def test_resume_refuses_replaced_embeddings_of_the_same_dimension(finished, folder, capsys):
    """The run's embeddings file replaced by another with the same keys and dimension (the
    text loss would jump without a word): refused, naming the sha256 the run was trained on;
    one of another dimension likewise."""
    run_dir, _, text, _ = finished
    with open(text, "rb") as f:
        saved = f.read()
    sha = hashlib.sha256(saved).hexdigest()
    assert checkpoint(run_dir)["text_sha256"] == sha
    before = snapshot(run_dir)
    expected = (f"error: {run_dir} was trained on other images, classes or text targets (text "
                f"sha256 {sha}): "
                "resume it with those of its config.json")
    try:
        _, _, keys = folder
        for dim in (TEXT_DIM, 8):
            write_embeddings(text, keys, torch.randn(len(keys), dim))
            assert fails(capsys, ["--resume", run_dir]) == expected
    finally:
        with open(text, "wb") as f:
            f.write(saved)
    assert snapshot(run_dir) == before


def test_a_run_resumes_from_another_working_directory(folder, tmp_path, monkeypatch):
    """A run started with relative paths (--data, --text, --out-dir) records them absolute in
    config.json, and a command started elsewhere continues it."""
    root, text, _ = folder
    base = os.path.dirname(root)
    monkeypatch.chdir(base)
    crash_in_epoch(monkeypatch, 2)
    args = base_args(folder, os.path.relpath(tmp_path, base), *CHEAP, "--name", "r")
    args[args.index("--data") + 1] = os.path.basename(root)
    args[args.index("--text") + 1] = os.path.basename(text)
    with pytest.raises(RuntimeError, match="power cut"):
        run(args)
    monkeypatch.undo()
    with open(tmp_path / "r" / "config.json") as f:
        config = json.load(f)
    assert config["data"] == root and config["text"] == text
    assert config["text_sha256"] == checkpoint(tmp_path / "r")["text_sha256"]
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")  # where the command is typed: all that differs
    assert run(["--resume", tmp_path / "r"]) == 0
    assert [m["epoch"] for m in metrics(tmp_path / "r")] == [1, 2]


# ----------------------------------------------------------------------------
# (4) Numbers and names checked where they enter: one line, exit 2, no folder

CHOICES = "'auto', 'cpu', 'cuda', 'mps'"


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "argument --epochs: must be an integer in [1, 100000], got 0 "
                        "(see --help)"),
    (["--epochs", "-1"], "argument --epochs: must be an integer in [1, 100000], got -1 "
                         "(see --help)"),
    (["--lr", "-1"], "argument --lr: must be a number in (0, inf), got -1 (see --help)"),
    (["--lr", "nan"], "argument --lr: must be a number in (0, inf), got nan (see --help)"),
    (["--patch-size", "0"], "argument --patch-size: must be an integer in [1, 1024], got 0 "
                            "(see --help)"),
    (["--img-size", "0"], "argument --img-size: must be an integer in [5, 16384], got 0 "
                          "(see --help)"),
    # at least 2 bytes x depth 6 x (4096 ** 2 + 1) tokens x 4 x width 128 = 96.0 GiB per image
    (["--img-size", "16384", "--patch-size", "4"], "--img-size 16384: one step would hold at "
     "least 96 GiB, and this machine has MEMORY GiB"),
    (["--seed", "100000"], "argument --seed: must be an integer in [0, 100000), got 100000 "
                           "(see --help)"),
    (["--img-size", "20"], "--img-size 20 is no multiple of --patch-size 8"),
    (["--label-noise", "1"], "argument --label-noise: must be a number in [0, 1), got 1 "
                             "(see --help)"),
    (["--temperature", "0"], "unrecognized arguments: --temperature 0 (see --help)"),
    (["--text-loss-lambda", "1"], "argument --text-loss-lambda: must be a number in [0, 1), got 1 "
                                  "(see --help)"),
    (["--text-loss-lambda", "-0.1"], "argument --text-loss-lambda: must be a number in [0, 1), "
                                     "got -0.1 (see --help)"),
    (["--accum", "0"], "argument --accum: must be an integer in [1, 65536], got 0 (see --help)"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer in [1, 1e7], got 0 "
                            "(see --help)"),
    (["--log-every", "0"], "argument --log-every: must be an integer in [1, 1e12], got 0 "
                           "(see --help)"),
    (["--ckpt-every", "-1"], "argument --ckpt-every: must be an integer in [0, 1e12], got -1 "
                             "(see --help)"),
    (["--workers", "-2"], "argument --workers: must be an integer in [-1, 256], got -2 "
                          "(see --help)"),
    (["--device", "foo"], f"argument --device: invalid choice: 'foo' (choose from {CHOICES}) "
                          "(see --help)"),
    (["--epochs", "x"], "argument --epochs: must be an integer in [1, 100000], got 'x' "
                        "(see --help)"),
    (["--bogus"], "unrecognized arguments: --bogus (see --help)"),
    (["--lambda-schedule", "jump-50-30-0"], "--lambda-schedule 'jump-50-30-0' is not constant, "
     "linear, cosine, fullcosine or jump-A-B-R with A <= B (e.g. jump-30-50-0)"),
    (["--batch-size", "2", "--accum", "2"], "--batch-size 2 must split into batches of 2 or more "
     "images over the processes and --accum steps"),
    (["--batch-size", "1000"], "--batch-size 1000 is more than the 192 images"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_a_bad_flag_is_one_line_and_leaves_no_folder(folder, tmp_path, capsys, flags, message):
    line = fails(capsys, base_args(folder, tmp_path, *flags, "--name", "r"))
    assert line == f"error: {message}".replace("MEMORY", f"{tt.cli.memory() / 2**30:.0f}")
    assert not os.path.exists(tmp_path / "r")


def test_a_device_that_is_not_there(folder, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = fails(capsys, base_args(folder, tmp_path, "--device", "cuda", "--name", "r"))
    assert line == "error: --device cuda: there is none here; use --device auto or cpu"
    assert not os.path.exists(tmp_path / "r")


def undecodable_folder(tmp_path):
    """A tiny folder in which one training image is not an image; returns (root, its path)."""
    root = str(tmp_path / "d")
    write_folder(root, train=4, val=1)
    bad = os.path.join(root, "train", "b", "b_train_001.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    return root, bad


def decode_error(path):
    """The line for an image PIL cannot open, with PIL's own words for it (as the trainer's
    loader, imagesets.rgb, opens it)."""
    import imagesets
    try:
        imagesets.rgb(path)
    except Exception as e:
        return (f"error: cannot decode image {path} ({e}); replace it, or delete it and start a "
                "new run (--resume refuses a changed training set)")
    raise AssertionError(f"{path} opened")


def tiny_run(root, out, *more):
    return ["--data", root, "--preset", "imagenet", "--img-size", "16", "--patch-size", "8",
            "--model", "micro", "--batch-size", "4", "--epochs", "1", "--threads", "1",
            "--out-dir", out, *more]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_undecodable_image_is_named_and_leaves_the_name_free(tmp_path, capsys, workers):
    """Decoded in the main process or in a DataLoader worker (whose error arrives wrapped in the
    worker's traceback): the same one line, naming the file. The failure comes after setup, yet
    leaves no run folder: once the image is replaced, the same --name works."""
    root, bad = undecodable_folder(tmp_path)
    args = tiny_run(root, tmp_path, "--workers", str(workers), "--name", "r")
    assert fails(capsys, args) == decode_error(bad)
    assert not os.path.exists(tmp_path / "r")
    shutil.copy(os.path.join(root, "train", "b", "b_train_000.png"), bad)
    assert run(args) == 0 and len(metrics(tmp_path / "r")) == 1


# ----------------------------------------------------------------------------
# (5) The newcomer's demo

def test_help_shows_the_defaults_of_the_chosen_data(capsys):
    """`--data shapes --help` shows the shapes preset (15 epochs, batch 64), the default help
    the paper's ImageNet recipe (100, 2048)."""
    def defaults(argv):
        """{option: the default its help shows}, from the help's option entries."""
        capsys.readouterr()
        assert run(argv) == 0
        entries = []
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("  --"):
                entries.append(line)
            elif entries and line.startswith("    "):
                entries[-1] += " " + line.strip()
        found = {e.split()[0][2:].rstrip(","): re.search(r"\(default: ([^)]*)\)$", e)
                 for e in entries}
        return {k: m[1] for k, m in found.items() if m}
    shapes, imagenet = defaults(["--data", "shapes", "--help"]), defaults(["--help"])
    assert (shapes["epochs"], shapes["batch-size"], shapes["model"]) == ("15", "64", "micro")
    assert (imagenet["epochs"], imagenet["batch-size"], imagenet["model"]) == (
        "100", "2048", "small")
    assert imagenet["lr"] == "0.003" and shapes["lr"] == "0.001"


def test_each_epoch_prints_a_labelled_line_that_log_txt_keeps(finished):
    """One line per epoch on stdout, labelled ("epoch 1/2: loss_cls 1.1, ..."), and the same
    lines in RUN/log.txt."""
    run_dir, _, _, stdout = finished
    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2
    for n, (line, record) in enumerate(zip(lines, metrics(run_dir)), 1):
        assert line.startswith(f"epoch {n}/2: loss_cls ")
        for key in ("loss_cls", "loss_txt", "top1", "lr", "lambda"):
            assert f" {key} " in line
        assert f"top1 {record['top1']:.4g}" in line
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert f.read().splitlines() == lines


def test_a_terminal_shows_a_progress_bar_with_the_running_losses(folder, tmp_path, monkeypatch):
    """Every log boundary redraws the bar with its count and losses, whatever tqdm's own rate
    limit skips (made to skip every redraw of its own here): the last step is always shown."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    class RateLimited(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=1e6, **kwargs)
    monkeypatch.setattr(tqdm, "tqdm", RateLimited)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert run(base_args(folder, tmp_path, *CHEAP, "--epochs", "1", "--log-every", "1",
                         "--name", "r")) == 0
    shown = terminal.getvalue()
    assert "epoch 1" in shown and "loss_cls=" in shown and "loss_txt=" in shown
    assert "6/6" in shown


def test_the_thread_count_is_half_the_cores_unless_given():
    """--threads 0 (the default) uses half the cores: a small model gains little from more, and
    a busy machine makes every extra thread wait."""
    try:
        tt.compute_setup(tt.Config(device="cpu"))
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 2) // 2)
        tt.compute_setup(tt.Config(device="cpu", threads=3))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)


def test_git_ignores_the_virtual_environment():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert {".venv", ".venv/"} & set(f.read().split())


def test_ci_runs_exactly_the_readme_test_command_over_every_test_file():
    """The README's one test command is what CI runs, and it covers test_textteacher.py and the
    files in tests/."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        commands = [line.strip() for line in f if line.strip().startswith("python -m pytest")]
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert len(commands) == 1 and f"```bash\n{commands[0]}\n```" in readme
    words = commands[0].split()
    assert words[:4] == ["python", "-m", "pytest", "-q"] and words[-2:] == ["test_textteacher.py",
                                                                           "tests"]


# ----------------------------------------------------------------------------
# Data folders

def test_a_data_folder_missing_or_without_train(tmp_path, capsys):
    line = fails(capsys, tiny_run(str(tmp_path / "nowhere"), tmp_path, "--name", "r"))
    assert line.startswith(f"error: argument --data: no folder {tmp_path / 'nowhere'}, nor a "
                           "name (imagenet, cifar10, cifar100, shapes, ")
    root = tmp_path / "empty"
    os.makedirs(root)
    line = fails(capsys, tiny_run(str(root), tmp_path, "--name", "r"))
    assert line == (f"error: {root}/train: [Errno 2] No such file or directory: "
                    f"'{root}/train'; a data folder holds train/ and val/ with one sub-folder "
                    "of images per class")
    line = fails(capsys, ["--data", "imagenet", "--data-dir", str(tmp_path / "nowhere"),
                          "--out-dir", str(tmp_path), "--name", "r"])
    assert line.startswith(f"error: {tmp_path / 'nowhere'}/train: [Errno 2] No such file")
    assert not os.path.exists(tmp_path / "r")


def test_a_class_folder_without_images(tmp_path, capsys):
    root = str(tmp_path / "d")
    write_folder(root, train=2, val=1)
    os.makedirs(os.path.join(root, "train", "zebra"))
    open(os.path.join(root, "train", "zebra", "notes.txt"), "w").close()
    line = fails(capsys, tiny_run(root, tmp_path, "--name", "r"))
    assert line.startswith(f"error: {root}/train/zebra holds no image (.jpg, .jpeg, .png, ")
    assert line.endswith("): a class needs one or more")
    assert not os.path.exists(tmp_path / "r")


def test_train_and_val_with_other_classes(tmp_path, capsys):
    root = str(tmp_path / "d")
    write_folder(root, train=2, val=1)
    shutil.rmtree(os.path.join(root, "val", "c"))
    line = fails(capsys, tiny_run(root, tmp_path, "--batch-size", "2", "--name", "r"))
    assert line == f"error: the class folders of val/ and train/ of {root} differ"


def test_an_unreadable_cifar100(tmp_path, capsys):
    """A cifar-100-python folder with broken files (present, so nothing is downloaded)."""
    os.makedirs(tmp_path / "cifar" / "cifar-100-python")
    (tmp_path / "cifar" / "cifar-100-python" / "meta").write_text("broken")
    line = fails(capsys, ["--data", "cifar100", "--data-dir", str(tmp_path / "cifar"),
                          "--out-dir", str(tmp_path), "--name", "r"])
    assert line == (f"error: no readable CIFAR-100 in {tmp_path / 'cifar'} (Dataset not found or "
                    "corrupted. You can use download=True to download it); pass --data-dir, or "
                    "delete the folder to download it again")


# ----------------------------------------------------------------------------
# Embeddings files

def test_images_without_a_text_target_are_named(folder, tmp_path, capsys):
    """"Images without an embedding are silently dropped (fail instead, naming them)" (a
    pitfall of the official code in METHOD.md); all keys missing: another dataset's file."""
    _, _, keys = folder
    partial = write_embeddings(tmp_path / "partial.pt", keys[1::2], torch.randn(96, 8))
    line = fails(capsys, base_args(folder, tmp_path, "--text", partial, "--name", "r"))
    assert line == (f"error: 96 of 192 image keys have no target in {partial}, e.g. "
                    "a_train_000.png, a_train_002.png, a_train_004.png: another dataset's file?")
    other = write_embeddings(tmp_path / "other.pt", [f"n0144_{i}.JPEG" for i in range(300)],
                             torch.randn(300, 8))
    line = fails(capsys, base_args(folder, tmp_path, "--text", other, "--name", "r"))
    assert line == (f"error: 192 of 192 image keys have no target in {other}, e.g. "
                    "a_train_000.png, a_train_001.png, a_train_002.png: another dataset's file?")
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_embeddings_with_nan_or_inf(folder, tmp_path, capsys, bad):
    _, _, keys = folder
    vectors = torch.randn(len(keys), 8)
    vectors[100, 3] = bad
    path = write_embeddings(tmp_path / "bad.pt", keys, vectors)
    line = fails(capsys, base_args(folder, tmp_path, "--text", path, "--name", "r"))
    assert line == f"error: {path} contains NaN or inf"
    assert not os.path.exists(tmp_path / "r")


def test_a_file_that_is_no_embeddings_file(folder, tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    cases = {tmp_path / "junk.pt": "cannot read embeddings file {} (RuntimeError); write it with "
                                   "caption_embed.py",
             tmp_path / "none.pt": "argument --text: no file {} (see --help)",
             tmp_path / "dict.pt": "{} is not an embeddings file of caption_embed.py"}
    for path, message in cases.items():
        line = fails(capsys, base_args(folder, tmp_path, "--text", path, "--name", "r"))
        assert line == "error: " + message.format(path)
    assert not os.path.exists(tmp_path / "r")


# ----------------------------------------------------------------------------
# Resume

def test_resume_of_nothing_or_of_another_file(tmp_path, capsys):
    line = fails(capsys, ["--resume", str(tmp_path / "nothing")])
    assert line == (f"error: argument --resume: no file or folder {tmp_path / 'nothing'} "
                    "(see --help)")
    os.makedirs(tmp_path / "folder")  # a folder without a checkpoint
    line = fails(capsys, ["--resume", str(tmp_path / "folder")])
    assert line == (f"error: {tmp_path / 'folder' / 'checkpoint.pt'} does not exist: pass a "
                    "checkpoint file or a run folder")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    line = fails(capsys, ["--resume", str(tmp_path / "junk.pt")])
    assert line.startswith(f"error: {tmp_path / 'junk.pt'} is truncated or damaged, or no "
                           "checkpoint (")
    assert line.endswith("): copy it again from where it came, or start the run again")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    line = fails(capsys, ["--resume", str(tmp_path / "other.pt")])
    assert line == (f"error: {tmp_path / 'other.pt'} is not a checkpoint of this textteacher.py; "
                    "pass a checkpoint file or a run folder")

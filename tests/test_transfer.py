"""Transfer (METHOD.md, "Transfer"): fine-tuning from a trained model with --init, and the six
transfer sets of imagesets.py. The position embedding is interpolated bicubically as the
official code does it, the class head is re-initialised when the classes change, the text head
stays behind, a fine-tuning run starts from the source's logits and resumes bit for bit, each
set is read from torchvision's on-disk layout (tiny fakes here, nothing is downloaded), and
bad sources end in one line.

Run: python -m pytest -q tests/test_transfer.py
"""
import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torchvision
from common import (CHEAP, RANDOM, TEXT_DIM, assert_same_weights, base_args, checkpoint,
                    crash_in_epoch, fails, folder, run, untimed)

import imagesets
import textteacher as tt
from cli import UserError

assert folder  # a fixture, used by name


# ----------------------------------------------------------------------------
# A trained source, and a way to see the model a fine-tuning run starts its first step with

@pytest.fixture(scope="module")
def source(folder, tmp_path_factory):
    """A micro ViT (patch 8, 16 px) trained one epoch WITH a text head on the tiny folder: its
    run folder holds checkpoint.pt (text_head.* included) and export/."""
    out = tmp_path_factory.mktemp("source")
    assert run(base_args(folder, out, "--epochs", "1", "--batch-size", "64", *CHEAP,
                         "--name", "src")) == 0
    return str(out / "src")


def tune_args(data, out, init, *more):
    """A fine-tuning run from --init: no --model and no --patch-size (they come from the
    source), 16 px, 3 steps of 64 per epoch on the tiny folder."""
    return ["--data", data, "--preset", "imagenet", "--init", init, "--img-size", "16",
            "--batch-size", "64",
            "--epochs", "1", "--warmup-epochs", "1", "--workers", "0", "--threads", "1",
            "--log-every", "10", "--out-dir", out, *more]


class Stop(Exception):
    """Raised by the spy at the first step: the run is needed no further."""


def start_of(argv):
    """(a copy of the model, TextTeacher, that train() hands to its first step, the config):
    the weights after --init and before any update. textteacher.main's way in (parse_config,
    check_config, train), with train's `objective` seam watching; the run ends there."""
    seen = {}

    def objective(model, *a, **k):
        seen["model"] = copy.deepcopy(model).eval()
        raise Stop
    cfg, given = tt.parse_config([str(a) for a in argv])
    tt.check_config(cfg)
    with pytest.raises(Stop):
        tt.train(cfg, given, objective=objective)
    return seen["model"], cfg


def export_vit(export):
    """The exported ViT as someone who never saw this code loads it (no timm needed): the
    project's ViT from config.json, the weights from model.safetensors, strictly."""
    from safetensors.torch import load_file
    with open(os.path.join(export, "config.json")) as f:
        config = json.load(f)
    vit = tt.ViT(**config["textteacher"]["model_args"]).eval()
    vit.load_state_dict(load_file(os.path.join(export, "model.safetensors")), strict=True)
    return vit, config


def vit_weights(run_dir):
    """The ViT's tensors of a run's checkpoint, without their "vit." prefix."""
    return {k[4:]: v for k, v in checkpoint(run_dir)["model"].items() if k.startswith("vit.")}


# ----------------------------------------------------------------------------
# The position embedding: bicubic, as the official code interpolates it

def keys_cubic(t, a=-0.75):
    """Keys' cubic convolution kernel, a = -0.75 (PyTorch's and OpenCV's bicubic)."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_by_hand(grid, n):
    """grid [g, g, C] (float64) -> [n, n, C]: output pixel i reads the input at the half-pixel
    centre (i + 0.5) g / n - 0.5, from the 4 x 4 neighbours around it weighted by Keys' kernel,
    an index beyond the border taking the border's value."""
    g = grid.shape[0]

    def taps(i):
        x = (i + 0.5) * g / n - 0.5
        f = math.floor(x)
        return [(min(max(f + k, 0), g - 1), keys_cubic(x - (f + k))) for k in (-1, 0, 1, 2)]
    out = torch.zeros(n, n, grid.shape[2], dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            for y, wy in taps(i):
                for x, wx in taps(j):
                    out[i, j] += wy * wx * grid[y, x]
    return out


@pytest.mark.parametrize("g, n", [(4, 7), (2, 3), (14, 24), (7, 4)])
def test_the_position_embedding_is_resized_bicubically_as_the_official_code_does(g, n):
    """"interpolates the position embedding bicubically when the resolution changes (the CLS
    token has none)": resize_pos_embed equals a bicubic interpolation written out here (Keys'
    kernel, a = -0.75, half-pixel centres, borders clamped), which is what the official code's
    F.interpolate(mode="bicubic", align_corners=False) computes (resizing_interface.py,
    _set_input_strand), for growing and shrinking grids; row-major patch order on both sides."""
    pos = torch.randn(1, g * g, 5, generator=torch.Generator().manual_seed(g * 100 + n))
    got = tt.resize_pos_embed(pos, n)
    assert got.shape == (1, n * n, 5)
    want = bicubic_by_hand(pos[0].double().reshape(g, g, 5), n).reshape(1, n * n, 5)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("g, n", [(4, 7), (7, 4), (14, 24)])
def test_the_position_embedding_resize_is_timms_without_antialiasing(g, n):
    """The same resize through timm (where it is installed): resample_abs_pos_embed with no
    prefix token and antialias=False, the official code's interpolation (timm's default
    antialias=True also changes upsampling: PIL's kernel, a = -0.5, renormalised at the
    borders, up to 0.15 apart from the official result on unit-variance embeddings)."""
    layers = pytest.importorskip("timm.layers")
    pos = torch.randn(1, g * g, 6, generator=torch.Generator().manual_seed(g + n))
    want = layers.resample_abs_pos_embed(pos, (n, n), num_prefix_tokens=0, antialias=False)
    torch.testing.assert_close(tt.resize_pos_embed(pos, n), want, rtol=0, atol=1e-6)


def test_the_same_grid_keeps_the_position_embedding():
    """No resolution change, no interpolation: the same tensor comes back."""
    pos = torch.randn(1, 16, 8)
    assert tt.resize_pos_embed(pos, 4) is pos


# ----------------------------------------------------------------------------
# Starting from the source

@pytest.mark.parametrize("where", ["export", "checkpoint.pt", ""])
def test_a_run_from_init_starts_with_the_sources_logits(folder, source, tmp_path, where):
    """"The official fine-tuning starts from the pretrained checkpoint with the pretraining
    settings (width, depth ...)": a run from --init (an export/, a checkpoint file, a run
    folder) with the same classes and --img-size, given neither --model nor --patch-size,
    takes the source's size and patch, and its first step sees every ViT tensor of the source
    and so the exported ViT's logits, bit for bit."""
    init = os.path.join(source, where) if where else source
    start, cfg = start_of(tune_args(folder[0], tmp_path, init, "--name", "t"))
    assert (cfg.model, cfg.patch_size) == ("micro", 8)
    assert start.text_head is None  # no --text: no text head
    vit, config = export_vit(os.path.join(source, "export"))
    ours = config["textteacher"]["model_args"]
    assert ours["patch_size"] == 8 and ours["width"] == 128
    assert_same_weights(start.vit.state_dict(), vit.state_dict())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(start.vit(x), vit(x))


def test_new_classes_get_a_fresh_head_and_everything_else_is_the_sources(source, fakes,
                                                                        tmp_path):
    """"re-initialises the class head (truncated normal std 0.02, bias 0) when the class count
    changes" and "interpolates the position embedding ... when the resolution changes": a run
    on Flowers-102 (102 classes) at 24 px from a 3-class 16 px source starts with the head of a
    fresh ViT (the same draw as without --init: std 0.02, bias exactly 0), the source's
    position embedding resized from 2 x 2 to 3 x 3, and every other tensor the source's. The
    truncation is nn.init.trunc_normal_'s, at +-2 absolute as in timm and the official code's
    set_num_classes: in effect a normal, about 4.6% of the weights beyond 2 std."""
    model, _ = start_of(["--data", NAME["Flowers102"], "--data-dir", fakes, "--init",
                         os.path.join(source, "export"), "--img-size", "24", "--batch-size", "4",
                         "--workers", "0", "--threads", "1", "--out-dir", tmp_path, "--name", "f"])
    start = model.vit.state_dict()
    src = vit_weights(source)
    assert start.keys() == src.keys()
    assert start["pos_embed"].shape == (1, 9, 128)
    assert torch.equal(start["pos_embed"], tt.resize_pos_embed(src["pos_embed"], 3))
    for k in start.keys() - {"pos_embed", "head.weight", "head.bias"}:
        assert torch.equal(start[k], src[k]), k
    w, b = start["head.weight"], start["head.bias"]
    assert w.shape == (102, 128) and torch.all(b == 0)
    torch.manual_seed(0)  # the run's --seed: the head a run without --init starts with
    fresh = tt.ViT(num_classes=102, img_size=24, patch_size=8, width=128, depth=6, heads=4)
    assert torch.equal(w, fresh.head.weight)
    assert abs(w.std().item() / 0.02 - 1) < 0.03 and abs(w.mean().item()) < 1e-3
    assert 0.03 < (w.abs() > 0.04).float().mean().item() < 0.065 and w.abs().max() <= 2


def test_the_same_classes_keep_the_sources_head(folder, source, tmp_path):
    """The head is re-initialised only when the classes change: the same classes at another
    resolution keep the source's head (and everything but the resized position embedding)."""
    model, _ = start_of(tune_args(folder[0], tmp_path, source, "--img-size", "24", "--name", "t"))
    start, src = model.vit.state_dict(), vit_weights(source)
    assert start["pos_embed"].shape == (1, 9, 128)
    for k in start.keys() - {"pos_embed"}:
        assert torch.equal(start[k], src[k]), k


def test_no_text_head_is_carried_over(folder, source, tmp_path):
    """"drops the text head": a source trained WITH text (its checkpoint holds text_head.*)
    gives none of it. Without --text the fine-tuned model has no text head at all (its
    checkpoint holds no text_head.* key, its export no text tensor); with --text it starts
    with the fresh text head of a run without --init, not the source's."""
    assert any(k.startswith("text_head.") for k in checkpoint(source)["model"])
    assert run(tune_args(folder[0], tmp_path, os.path.join(source, "checkpoint.pt"),
                         "--name", "plain")) == 0
    ckpt = checkpoint(tmp_path / "plain")
    assert ckpt["text_dim"] == 0 and not any("text" in k for k in ckpt["model"])
    vit, _ = export_vit(str(tmp_path / "plain" / "export"))
    assert not any("text" in k for k in vit.state_dict())

    model, _ = start_of(tune_args(folder[0], tmp_path, source, "--text", folder[1],
                                  "--name", "text"))
    head = model.text_head
    torch.manual_seed(0)
    fresh = tt.build_model(tt.Config(model="micro", img_size=16, patch_size=8), 3, TEXT_DIM)
    assert torch.equal(head.weight, fresh.text_head.weight)
    assert torch.equal(head.bias, fresh.text_head.bias)
    assert not torch.equal(head.weight, checkpoint(source)["model"]["text_head.weight"])


def test_a_fine_tuning_run_resumes_bit_for_bit(folder, source, tmp_path, monkeypatch):
    """A run from --init that dies after epoch 1 (of 2) was checkpointed, resumed with
    --resume alone, ends with the weights and the log of the run that never stopped, every
    source of randomness on. The resumed run takes its start from the checkpoint: the --init
    source is gone by then and is not read again."""
    init = str(tmp_path / "init")
    shutil.copytree(os.path.join(source, "export"), init)
    args = tune_args(folder[0], tmp_path, init, "--epochs", "2", *RANDOM)
    assert run(args + ["--name", "full"]) == 0
    evaluate = tt.evaluate
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="power cut"):
        run(args + ["--name", "cut"])
    monkeypatch.setattr(tt, "evaluate", evaluate)
    cut, full = tmp_path / "cut", tmp_path / "full"
    assert checkpoint(cut)["epoch"] == 1
    shutil.rmtree(init)
    assert run(["--resume", cut]) == 0
    assert_same_weights(checkpoint(cut)["model"], checkpoint(full)["model"])
    assert untimed(cut) == untimed(full) and len(untimed(full)) == 2


# ----------------------------------------------------------------------------
# The six transfer sets, as tiny fakes in the layouts torchvision reads

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing downloads: every download function of torchvision raises, here and where the
    dataset modules imported it. Flowers-102 checks its .mat files' md5 sums, which the fakes
    cannot match: there, existence is the check."""
    def download(*a, **k):
        raise AssertionError(f"tried to download {a[:1]}")
    datasets = torchvision.datasets
    for module in (datasets.utils, datasets.flowers102, datasets.oxford_iiit_pet,
                   datasets.fgvc_aircraft, datasets.food101):
        for name in ("download_url", "download_and_extract_archive",
                     "download_file_from_google_drive"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, download)
    monkeypatch.setattr(datasets.flowers102, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))


def jpg(path, grey):
    """An 8 x 8 JPEG of one grey level, which names the image (a reader that mixes up the
    files reads another level)."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), grey, np.uint8)).save(path, quality=95)


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def grey_levels():
    """20, 29, 38, ...: one level per image of a set, far enough apart for JPEG."""
    level = 20
    while True:
        yield level
        level += 9


def fake_flowers(root):
    """flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat (labels 1-based, per image id),
    setid.mat (trnid, valid, tstid: image ids)}; 18 images of 3 classes, 6 per split, each
    split in an order of its own."""
    from scipy.io import savemat
    base, greys, ids = os.path.join(root, "flowers-102"), grey_levels(), {}
    label = {i: (i - 1) % 3 for i in range(1, 19)}  # 0-based
    splits = dict(trnid=[4, 1, 2, 6, 3, 5], valid=[12, 7, 9, 8, 10, 11],
                  tstid=[13, 18, 14, 17, 15, 16])
    for i in range(1, 19):
        ids[i] = next(greys)
        jpg(os.path.join(base, "jpg", f"image_{i:05d}.jpg"), ids[i])
    savemat(os.path.join(base, "imagelabels.mat"),
            dict(labels=np.array([[label[i] + 1 for i in range(1, 19)]], np.uint8)))
    savemat(os.path.join(base, "setid.mat"),
            {k: np.array([v], np.uint16) for k, v in splits.items()})

    def rows(*parts):
        return [(f"image_{i:05d}.jpg", label[i], ids[i]) for p in parts for i in splits[p]]
    classes = torchvision.datasets.Flowers102.classes  # the 102 names, whatever the files hold
    assert classes[:3] == ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    return dict(classes=classes, official=rows("trnid"), trainval=rows("trnid", "valid"),
                val=rows("tstid"))


def fake_aircraft(root):
    """fgvc-aircraft-2013b/data/{images/ID.jpg, variants.txt, images_variant_SPLIT.txt with
    "ID VARIANT" lines}; variants may hold spaces."""
    data, greys = os.path.join(root, "fgvc-aircraft-2013b", "data"), grey_levels()
    variants = ["707-320", "A300B4", "Cessna 172"]
    write_lines(os.path.join(data, "variants.txt"), variants)
    splits = dict(train=[("1025794", 2), ("0034309", 0), ("1340192", 1), ("0056978", 2)],
                  val=[("0062765", 1), ("2233343", 0), ("1502563", 2)],
                  test=[("1514522", 0), ("0446210", 1), ("0814578", 2), ("1401154", 1)])
    splits["trainval"] = splits["train"] + splits["val"]
    level = {}
    for name, rows in splits.items():
        for image, c in rows:
            if image not in level:
                level[image] = next(greys)
                jpg(os.path.join(data, "images", f"{image}.jpg"), level[image])
        write_lines(os.path.join(data, f"images_variant_{name}.txt"),
                    [f"{image} {variants[c]}" for image, c in rows])

    def rows(name):
        return [(f"{image}.jpg", c, level[image]) for image, c in splits[name]]
    return dict(classes=variants, official=rows("train"), trainval=rows("trainval"),
                val=rows("test"))


def fake_pets(root):
    """oxford-iiit-pet/{images/NAME.jpg, annotations/{trainval,test}.txt with "NAME CLASS
    SPECIES BREED_ID" lines, CLASS 1-based}; a breed's name is its images' name before the
    last "_", title-cased."""
    base, greys = os.path.join(root, "oxford-iiit-pet"), grey_levels()
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("american_pit_bull_terrier", 2)]
    splits = dict(trainval=[(0, 100), (2, 7), (1, 10), (0, 101), (1, 11), (2, 8)],
                  test=[(1, 12), (0, 102), (2, 9)])
    out = {}
    for name, rows in splits.items():
        lines, out[name] = [], []
        for c, n in rows:
            image = f"{breeds[c][0]}_{n}"
            out[name].append((f"{image}.jpg", c, next(greys)))
            jpg(os.path.join(base, "images", f"{image}.jpg"), out[name][-1][2])
            lines.append(f"{image} {c + 1} {breeds[c][1]} {n}")
        write_lines(os.path.join(base, "annotations", f"{name}.txt"), lines)
    os.makedirs(os.path.join(base, "annotations", "trimaps"), exist_ok=True)
    return dict(classes=["Abyssinian", "American Bulldog", "American Pit Bull Terrier"],
                official=out["trainval"], trainval=out["trainval"], val=out["test"])


def fake_cars(root):
    """stanford_cars/{devkit/{cars_meta.mat (class_names), cars_train_annos.mat},
    cars_test_annos_withlabels.mat, cars_train/NNNNN.jpg, cars_test/NNNNN.jpg}; an annotation
    is a struct (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class 1-based, fname) with MATLAB's types
    (uint8 class); the test images' file names are the training images' again."""
    from scipy.io import savemat
    base, greys = os.path.join(root, "stanford_cars"), grey_levels()
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    meta = np.empty((1, 3), dtype=object)
    meta[0] = names
    os.makedirs(os.path.join(base, "devkit"))
    savemat(os.path.join(base, "devkit", "cars_meta.mat"), dict(class_names=meta))
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    out = {}
    for split, labels, mat in (("train", [2, 0, 1, 0, 2], "devkit/cars_train_annos.mat"),
                               ("test", [1, 2, 0, 1], "cars_test_annos_withlabels.mat")):
        annotations, out[split] = np.zeros((1, len(labels)), dtype=fields), []
        for i, c in enumerate(labels):
            file = f"{i + 1:05d}.jpg"
            out[split].append((file, c, next(greys)))
            jpg(os.path.join(base, f"cars_{split}", file), out[split][-1][2])
            u8 = [np.array([[v]], np.uint8) for v in (3, 4, 7, 8, c + 1)]
            annotations[0, i] = (*u8, np.array([file]))
        savemat(os.path.join(base, mat), dict(annotations=annotations))
    return dict(classes=names, official=out["train"], trainval=out["train"], val=out["test"])


def fake_food(root):
    """food-101/{images/CLASS/ID.jpg, meta/{train,test}.json: {class: ["CLASS/ID", ...]}};
    the classes are numbered in sorted order, the images come in the file's order."""
    base, greys = os.path.join(root, "food-101"), grey_levels()
    splits = dict(train={"waffles": ["2001", "2002"], "apple_pie": ["1001", "1002"],
                         "bibimbap": ["3002", "3001"]},
                  test={"bibimbap": ["3003"], "waffles": ["2003"], "apple_pie": ["1003"]})
    classes = ["apple_pie", "bibimbap", "waffles"]
    out = {}
    for split, meta in splits.items():
        out[split] = []
        for name, images in meta.items():
            for image in images:
                out[split].append((f"{image}.jpg", classes.index(name), next(greys)))
                jpg(os.path.join(base, "images", name, f"{image}.jpg"), out[split][-1][2])
        os.makedirs(os.path.join(base, "meta"), exist_ok=True)
        with open(os.path.join(base, "meta", f"{split}.json"), "w") as f:
            json.dump({k: [f"{k}/{i}" for i in v] for k, v in meta.items()}, f)
    return dict(classes=classes, official=out["train"], trainval=out["train"], val=out["test"])


def fake_cub(root):
    """CUB_200_2011/{images/NNN.Class/FILE.jpg, images.txt ("ID PATH"), train_test_split.txt
    ("ID 1" for training)}: an image folder, its classes the folder names, in sorted order."""
    base, greys = os.path.join(root, "CUB_200_2011"), grey_levels()
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images = [(2, "Sooty_Albatross_0001_796395.jpg", 1),  # (class, file, 1: training)
              (0, "Black_Footed_Albatross_0046_18.jpg", 0),
              (1, "Laysan_Albatross_0002_1027.jpg", 1),
              (0, "Black_Footed_Albatross_0009_34.jpg", 1),
              (2, "Sooty_Albatross_0031_1066.jpg", 0),
              (1, "Laysan_Albatross_0082_524.jpg", 0),
              (0, "Black_Footed_Albatross_0002_55.jpg", 1),
              (1, "Laysan_Albatross_0044_784.jpg", 1),
              (2, "Sooty_Albatross_0007_796372.jpg", 1)]
    out = dict(train=[], val=[])
    for c, file, train in images:
        out["train" if train else "val"].append((file, c, next(greys)))
        jpg(os.path.join(base, "images", classes[c], file), out["train" if train else "val"][-1][2])
    write_lines(os.path.join(base, "images.txt"),
                [f"{i} {classes[c]}/{file}" for i, (c, file, _) in enumerate(images, 1)])
    write_lines(os.path.join(base, "train_test_split.txt"),
                [f"{i} {train}" for i, (_, _, train) in enumerate(images, 1)])
    # ImageFolder's order: the classes sorted, then the files sorted within each
    ordered = {s: sorted(rows, key=lambda r: (r[1], r[0])) for s, rows in out.items()}
    return dict(classes=classes, official=ordered["train"], trainval=ordered["train"],
                val=ordered["val"])


# each set's fake and its sizes (official training split, trainval, test), by the torchvision
# class that reads it ("": CUB-200-2011, read as an image folder)
FAKES = {"Flowers102": (fake_flowers, (6, 12, 6)), "FGVCAircraft": (fake_aircraft, (4, 7, 4)),
         "OxfordIIITPet": (fake_pets, (6, 6, 3)), "StanfordCars": (fake_cars, (5, 5, 4)),
         "Food101": (fake_food, (6, 6, 3)), "": (fake_cub, (6, 6, 3))}
NAME = {kind: name for name, (kind, *_) in imagesets.TRANSFER.items()}  # --data names
assert NAME.keys() == FAKES.keys()


EXPECTED = {}  # set name -> what its fake holds: classes, official, trainval, val


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """One --data-dir holding all six fakes; what each holds goes to EXPECTED."""
    root = tmp_path_factory.mktemp("transfer")
    EXPECTED.update({NAME[kind]: make(str(root)) for kind, (make, _) in FAKES.items()})
    return str(root)


@pytest.mark.parametrize("protocol", ["official", "trainval"])
@pytest.mark.parametrize("name", list(NAME.values()))
def test_each_transfer_set_is_read_from_torchvisions_layout(fakes, name, protocol):
    """"Its splits: Aircraft and Flowers `train` only, Pets `trainval`, the others `train`;
    the common protocol uses trainval for all", validation on `test`: image_split reads each
    set's files in its own order, with its labels, its class names (Aircraft's variants), keyed
    by file name, and each sample's image is the file its key names."""
    want = EXPECTED[name]
    for split, rows in (("train", want[protocol]), ("val", want["val"])):
        dataset, keys, classes = tt.image_split(name, fakes, split, protocol)
        assert keys == [key for key, _, _ in rows], (split, keys)
        assert list(dataset.targets) == [label for _, label, _ in rows]
        assert all(type(label) is int for label in dataset.targets)
        assert classes == want["classes"] and len(dataset) == len(rows)
        for i, (key, label, grey) in enumerate(rows):
            image, y = dataset[i]
            assert y == label and abs(np.asarray(image).mean() - grey) < 3, (key, split)
    kind = imagesets.TRANSFER[name][0]
    assert (len(want["official"]), len(want["trainval"]), len(want["val"])) == FAKES[kind][1]


@pytest.mark.parametrize("name", [NAME["StanfordCars"], NAME["Flowers102"], NAME[""]])
def test_a_missing_transfer_set_is_one_line(tmp_path, monkeypatch, name):
    """A --data-dir without the set: Stanford Cars (not downloadable) and CUB-200-2011 say so
    and what to pass; Flowers-102 tries its download, which fails offline (here: raises
    OSError), and says so in one line too."""
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.flowers102, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as e:
        tt.image_split(name, str(tmp_path), "train")
    line = str(e.value)
    assert "\n" not in line and str(tmp_path) in line and "--data-dir" in line


def test_a_transfer_set_trains_end_to_end_with_its_preset(fakes, source, tmp_path, capsys):
    """python textteacher.py --data flowers102 --data-dir DIR --init RUN/export: the preset
    applies (lr 3e-4, LAMB, label smoothing 0.1, 3-Augment and CutMix on) under the flags
    given, the size and patch come from the source, the 6 training images and 6 test images
    of the fake are trained on and evaluated, and the export names Flowers-102's 102 classes."""
    assert run(["--data", NAME["Flowers102"], "--data-dir", fakes, "--init",
                os.path.join(source, "export"), "--img-size", "16", "--epochs", "1",
                "--batch-size", "4", "--workers", "0", "--threads", "1", "--out-dir", tmp_path,
                "--name", "f"]) == 0
    ckpt = checkpoint(tmp_path / "f")
    cfg = ckpt["config"]
    assert (cfg["lr"], cfg["optimizer"], cfg["label_smoothing"], cfg["augment"], cfg["cutmix"],
            cfg["split"]) == (3e-4, "lamb", 0.1, "3aug", 1.0, "official")
    assert (cfg["model"], cfg["patch_size"], cfg["batch_size"]) == ("micro", 8, 4)
    assert cfg["data_dir"] == os.path.abspath(fakes)
    rows = EXPECTED[NAME["Flowers102"]]["official"]
    assert ckpt["split_sha256"] == tt.hashlib.sha256(repr(
        [(key, label) for key, label, _ in rows]).encode()).hexdigest()
    assert ckpt["step"] == 0 and ckpt["epoch"] == 1 and len(ckpt["history"]) == 1
    assert f"run {tmp_path / 'f'}: 6 images" in capsys.readouterr().out
    _, config = export_vit(str(tmp_path / "f" / "export"))
    assert config["label_names"] == torchvision.datasets.Flowers102.classes


# ----------------------------------------------------------------------------
# Bad sources: one line each, nothing written

def changed_export(where, source, **model_args):
    """The source's export/ with config.json's model_args changed: weights of one network
    beside the settings of another."""
    shutil.copytree(os.path.join(source, "export"), where)
    with open(os.path.join(where, "config.json")) as f:
        config = json.load(f)
    config["textteacher"]["model_args"].update(model_args)
    with open(os.path.join(where, "config.json"), "w") as f:
        json.dump(config, f)
    return where


def junk_folder(where, *names):
    os.makedirs(where)
    for name in names:
        with open(os.path.join(where, name), "wb") as f:
            f.write(os.urandom(256))
    return where


BAD = {  # case: (the --init source and more flags, in the tmp_path and of the source; the line)
    "another patch size": (lambda tmp, src: (f"{src}/export", "--patch-size", "4"),
                           "has patch size 8: drop --patch-size 4"),
    "another model": (lambda tmp, src: (src, "--model", "tiny"),
                      "has model micro: drop --model tiny"),
    "an empty folder": (lambda tmp, src: (junk_folder(f"{tmp}/empty"),), "does not exist"),
    "a folder of random files": (
        lambda tmp, src: (junk_folder(f"{tmp}/junk", "notes.txt", "checkpoint.pt"),),
        "is truncated or damaged"),
    "random bytes as model.safetensors": (
        lambda tmp, src: (junk_folder(f"{tmp}/junk", "model.safetensors"),),
        "config.json is missing, truncated, no export's config"),
    "weights narrower than config.json's (a named size)": (
        lambda tmp, src: (changed_export(f"{tmp}/wide", src, width=192, depth=12, heads=3),),
        "do not fit"),
    "weights narrower than config.json's (no named size)": (
        lambda tmp, src: (changed_export(f"{tmp}/wide", src, width=256),), "wide"),
    "a missing path": (lambda tmp, src: (f"{tmp}/nowhere",), "nowhere"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_source_is_one_line(folder, source, tmp_path, capsys, case):
    """"a new patch size is refused", and so is a --model the source is not, a folder that is
    neither a run nor an export, an export whose weights do not fit its own config.json, and a
    path that does not exist: one line on stderr that names the problem, exit code 2, and no
    run folder left behind."""
    make, words = BAD[case]
    init, *more = make(str(tmp_path), source)
    out = tmp_path / "runs"
    line = fails(capsys, tune_args(folder[0], out, init, *more, "--name", "x"))
    assert line.startswith("error: ") and words in line, line
    assert not (out / "x").exists()


# ----------------------------------------------------------------------------
# 16-bit images (CUB's reader and image folders)

def test_a_16_bit_png_is_read_as_its_8_bit_image(tmp_path):
    """imagesets.rgb, the loader of image folders and of CUB-200-2011, reads a 16-bit greyscale
    PNG (PIL mode "I;16") as its 8-bit image, level >> 8 within 1 in all three channels (PIL's
    own convert("RGB") clips it to white); 8-bit colour and grey images are unchanged; an image
    folder reads through it."""
    from PIL import Image
    levels = (np.arange(64).reshape(8, 8) * 1040 + 7).astype(np.uint16)  # 7 ... 65527
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "data" / split / c)
    deep = tmp_path / "data" / "train" / "a" / "deep.png"
    Image.fromarray(levels).save(deep)
    assert Image.open(deep).mode == "I;16"
    assert (np.asarray(Image.open(deep).convert("RGB")) == 255).mean() > 0.9  # the trap
    got = np.asarray(imagesets.rgb(deep)).astype(int)
    assert got.shape == (8, 8, 3) and (got == got[..., :1]).all()
    assert np.abs(got[..., 0] - (levels >> 8)).max() <= 1

    colour = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "data" / "train" / "b" / "colour.png")
    Image.fromarray(colour[..., 0]).save(tmp_path / "grey.png")
    assert np.array_equal(np.asarray(imagesets.rgb(tmp_path / "data/train/b/colour.png")), colour)
    assert np.array_equal(np.asarray(imagesets.rgb(tmp_path / "grey.png")),
                          np.repeat(colour[..., :1], 3, axis=2))
    dataset, keys, _ = tt.image_split(str(tmp_path / "data"), "", "train")
    assert keys == ["deep.png", "colour.png"]
    assert np.array_equal(np.asarray(dataset[0][0]), np.asarray(imagesets.rgb(deep)))

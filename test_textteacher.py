"""Tests of textteacher.py and caption_embed.py: CPU, offline, a few minutes at most.

Run: python -m pytest -q test_textteacher.py
"""
import json
import os
import pickle
import subprocess
import sys
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

torch.set_num_threads(2)


# ----------------------------------------------------------------------------
# helpers

def write_embeddings(path, keys, vectors, level="image", **extra):
    """An embeddings file in the documented format, written without caption_embed.py."""
    vectors = torch.as_tensor(vectors, dtype=torch.float32).contiguous()
    torch.save(dict(format="textteacher-embeddings-v1", embeddings=vectors, keys=list(keys), level=level, split="train",
                    mean=vectors.mean(0), std=vectors.std(0), encoder="test", pooling="none", source_sha256="",
                    dataset="", **extra), path)


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


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


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
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    opt = tt.Lamb([dict(params=[w], weight_decay=0.1), dict(params=[b], weight_decay=0.0)], lr=0.01, eps=1e-6)
    w0, b0 = w.detach().clone(), b.detach().clone()
    m_w, v_w, m_b, v_b = torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3), torch.zeros(3)
    b1, b2 = 0.9, 0.999
    for step in (1, 2):
        gw, gb = torch.randn(4, 3), torch.randn(3)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        m_w, v_w = b1 * m_w + (1 - b1) * gw, b2 * v_w + (1 - b2) * gw ** 2
        m_b, v_b = b1 * m_b + (1 - b1) * gb, b2 * v_b + (1 - b2) * gb ** 2
        u = (m_w / (1 - b1 ** step)) / ((v_w / (1 - b2 ** step)).sqrt() + 1e-6) + 0.1 * w0
        w0 = w0 - 0.01 * (w0.norm() / u.norm()) * u  # trust ratio ||w|| / ||u||
        b0 = b0 - 0.01 * (m_b / (1 - b1 ** step)) / ((v_b / (1 - b2 ** step)).sqrt() + 1e-6)  # no decay: plain Adam
        torch.testing.assert_close(w.detach(), w0)
        torch.testing.assert_close(b.detach(), b0)


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


def write_image_folder(root, classes=("cat", "dog", "eel"), per_class=6):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(per_class if split == "train" else 2):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, c, f"{c}_{split}_{i}.JPEG"))


def test_image_folder_trains_with_class_level_text(tmp_path):
    root = str(tmp_path / "pets")
    write_image_folder(root)
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
    assert run(QUICK + ["--text", shapes_text, "--compare", "--seeds", "2", "--out-dir", str(tmp_path), "--name", "c"]) == 0
    summary = json.load(open(tmp_path / "c" / "compare.json"))
    assert summary["arms"] == ["baseline", "textteacher"] and summary["seeds"] == [0, 1]
    diffs = [metrics(str(tmp_path / "c" / f"seed{s}-textteacher"))[-1]["top1"] - metrics(str(tmp_path / "c" / f"seed{s}-baseline"))[-1]["top1"]
             for s in (0, 1)]
    assert summary["textteacher"]["final_diff"][0] == pytest.approx(np.mean(diffs))
    assert summary["textteacher"]["final_diff"][1] == pytest.approx(np.std(diffs, ddof=1))
    assert metrics(str(tmp_path / "c" / "seed0-baseline"))[0]["loss_txt"] is None
    # the baseline arm is exactly the standalone baseline of the same seed
    assert run(QUICK + ["--out-dir", str(tmp_path), "--name", "alone"]) == 0
    a = torch.load(tmp_path / "alone" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "c" / "seed0-baseline" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same command again reuses the finished arms instead of training them again
    before = os.path.getmtime(tmp_path / "c" / "seed0-baseline" / "checkpoint.pt")
    assert run(QUICK + ["--text", shapes_text, "--compare", "--seeds", "2", "--out-dir", str(tmp_path), "--name", "c"]) == 0
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


def test_plot_writes_a_png_or_says_what_is_missing(tmp_path, shapes_text):
    assert run(QUICK + ["--epochs", "1", "--out-dir", str(tmp_path), "--name", "p"]) == 0
    r = cli("--plot", str(tmp_path / "p"), "--plot-out", str(tmp_path / "p.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 2 and r.stderr.strip() == "error: --plot needs matplotlib, which is optional: pip install matplotlib"
        return
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

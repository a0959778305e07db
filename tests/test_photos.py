"""
Real photos: any image folder trains (file names that repeat across classes), the small-image
recipe and CIFAR-10 by name, the study's controls, the paper's analysis (FFD and CKA) against
brute force, and the export in timm's own format.
"""
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
from common import fails, run, write_embeddings, write_folder  # noqa: E402
import analysis  # noqa: E402
import photos  # noqa: E402
import textteacher as tt  # noqa: E402


def numbered_folder(root, classes=("cat", "dog", "fox"), train=8, val=4, size=(12, 12)):
    """root/{train,val}/CLASS/NNNN.jpg: every class numbers its files alike (cifar10-1k's
    layout and that of many JPEG dumps)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name))
            for i in range(n):
                pixels = rng.normal(60 + 70 * c, 30, (*size, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i:04d}.jpg"))
    return root


def small_run(root, out, *more):
    return ["--data", root, "--batch-size", "6", "--epochs", "1", "--img-size", "12",
            "--patch-size", "4", "--threads", "1", "--out-dir", str(out), *more]


# ----------------------------------------------------------------------------
# Any image folder trains

def test_repeated_file_names_are_keyed_by_class_and_file(tmp_path):
    """A folder whose classes number their files alike is keyed CLASS/FILE; a folder of unique
    file names keeps the file name (the paper's ImageNet encodings are keyed so)."""
    root = numbered_folder(str(tmp_path / "d"))
    _, keys, classes = tt.image_split(root, "", "train")
    assert keys[:2] == ["cat/0000.jpg", "cat/0001.jpg"] and keys[-1] == "fox/0007.jpg"
    assert len(set(keys)) == len(keys) == 24 and classes == ["cat", "dog", "fox"]
    unique = str(tmp_path / "u")
    expected = write_folder(unique)
    assert tt.image_split(unique, "", "train")[1] == expected  # file names, as before
    assert expected[0] == "a_train_000.png"


@pytest.mark.parametrize("text", ["none", "class", "captions"])
def test_a_folder_with_repeated_file_names_trains(tmp_path, text):
    """Without text, with class-level text and with per-image captions keyed CLASS/FILE, a
    run on such a folder trains and exports."""
    root = numbered_folder(str(tmp_path / "d"))
    more = []
    if text == "class":
        more = ["--text", write_embeddings(tmp_path / "c.pt", ["cat", "dog", "fox"],
                                           torch.randn(3, 8), level="class")]
    if text == "captions":
        keys = tt.image_split(root, "", "train")[1]
        more = ["--text", write_embeddings(tmp_path / "e.pt", keys, torch.randn(len(keys), 8))]
    assert run(small_run(root, tmp_path, "--name", "r", *more)) == 0
    assert os.path.exists(tmp_path / "r" / "export" / "model.safetensors")


def test_captions_keyed_by_file_name_alone_are_refused_in_one_line(tmp_path, capsys):
    """The truly ambiguous case: captions keyed 0000.jpg for a folder where cat/0000.jpg and
    dog/0000.jpg both exist. One line says why, and what writes the right keys."""
    root = numbered_folder(str(tmp_path / "d"))
    names = [f"{i:04d}.jpg" for i in range(8)]
    text = write_embeddings(tmp_path / "e.pt", names, torch.randn(8, 8))
    line = fails(capsys, small_run(root, tmp_path, "--name", "r", "--text", text))
    assert line == (f"error: 24 of 24 image keys have no target in {text}, e.g. cat/0000.jpg, "
                    "cat/0001.jpg, cat/0002.jpg: file names repeat across the class folders, "
                    "so captions are keyed CLASS/FILE (caption_images.py writes them so)")
    assert not os.path.exists(tmp_path / "r")


# ----------------------------------------------------------------------------
# The small-image recipe, and CIFAR-10 by name

def test_a_folder_of_small_images_gets_the_small_recipe(tmp_path):
    """--data PATH with images of at most 64 px takes --preset small by itself; --preset
    chooses another; larger images keep the paper's recipe; every flag still wins."""
    small, large = numbered_folder(str(tmp_path / "s")), str(tmp_path / "l")
    numbered_folder(large, size=(65, 80))
    cfg, _ = tt.parse_config(["--data", small])
    assert (cfg.preset, cfg.model, cfg.patch_size, cfg.img_size, cfg.optimizer, cfg.cutmix) == (
        "small", "micro", 8, 32, "adamw", 0.0)
    assert {k: getattr(cfg, k) for k in tt.RECIPES["small"]} == tt.RECIPES["small"]
    assert tt.parse_config(["--data", large])[0].preset == "imagenet"
    cfg, _ = tt.parse_config(["--data", small, "--preset", "imagenet", "--lr", "0.5"])
    assert (cfg.preset, cfg.model, cfg.img_size, cfg.lr) == ("imagenet", "small", 224, 0.5)
    empty = tmp_path / "empty"
    os.makedirs(empty)
    assert tt.parse_config(["--data", str(empty)])[0].preset == "imagenet"  # nothing to look at


def test_help_shows_the_presets_and_the_defaults_they_set(capsys, tmp_path):
    root = numbered_folder(str(tmp_path / "s"))
    with pytest.raises(SystemExit):
        tt.parse_config(["--data", root, "-h"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--preset {small,imagenet,cifar10,cifar100,shapes," in out
    assert "ViT size (MODEL_SIZES in textteacher.py) (default: micro)" in out


def write_fake_cifar10(root, n_train=10, n_test=5):
    """torchvision's CIFAR-10 format: pickled batches in cifar-10-batches-py/."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng, batches = np.random.default_rng(0), {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        batches[name] = dict(data=rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                             labels=rng.integers(0, 10, n).tolist())
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batches[name], f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(dict(label_names=[f"kind_{i}" for i in range(10)]), f)
    return batches


def test_cifar10_by_name_through_torchvision(tmp_path, monkeypatch):
    """--data cifar10: torchvision's CIFAR10 (no download when its folder is there), keyed by
    index, pixels and labels as stored; its preset is the 32 px GPU recipe."""
    import torchvision
    batches = write_fake_cifar10(str(tmp_path))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train, keys, classes = tt.image_split("cifar10", str(tmp_path), "train")
    val = tt.image_split("cifar10", str(tmp_path), "val")[0]
    assert len(train) == 50 and len(val) == 5 and keys[:2] == ["0", "1"]
    assert classes == [f"kind_{i}" for i in range(10)]
    image, label = train[12]  # the third image of the second batch
    stored = batches["data_batch_2"]["data"][2].reshape(3, 32, 32)
    assert np.array_equal(np.asarray(image).transpose(2, 0, 1), stored)
    assert label == batches["data_batch_2"]["labels"][2]
    cfg, _ = tt.parse_config(["--data", "cifar10"])
    assert (cfg.preset, cfg.img_size, cfg.patch_size, cfg.data_dir) == ("cifar10", 32, 4, "data")


def test_an_unreadable_cifar10_is_one_line(tmp_path, capsys):
    os.makedirs(tmp_path / "cifar-10-batches-py")
    line = fails(capsys, ["--data", "cifar10", "--data-dir", str(tmp_path), "--out-dir",
                          str(tmp_path), "--name", "r"])
    assert line.startswith(f"error: no readable CIFAR-10 in {tmp_path} (")


# ----------------------------------------------------------------------------
# The study's controls

class Source:
    """A class-level TextTargets stand-in: rows of a [C, D] matrix, the mean subtracted."""

    def __init__(self, c=5, d=8):
        g = torch.Generator().manual_seed(1)
        self.vectors, self.mean = torch.randn(c + 2, d, generator=g), torch.randn(d, generator=g)
        self.rows, self.dim, self.level = torch.tensor([3, 0, 6, 1, 4]), d, "class"
        self.sha256, self.encoder = "abc", "x"


def test_permuted_gives_every_class_another_class_text():
    """Class c gets the text of class c + 1 mod C: a derangement, so no class keeps its own."""
    src = Source()
    perm = photos.Permuted(src)
    labels = torch.arange(5)
    got = perm(None, labels, torch.zeros(5, 3, 2, 2), 1.0)
    want = src.vectors[src.rows[(labels + 1) % 5]] - src.mean
    assert torch.equal(got, want)
    own = src.vectors[src.rows] - src.mean
    assert all(not torch.equal(got[c], own[c]) for c in range(5))
    assert perm.sha256 != src.sha256


def test_random_class_targets_are_fixed_directions_of_the_text_norm():
    src = Source()
    a, b = photos.RandomClass(src), photos.RandomClass(src)
    labels = torch.tensor([2, 2, 0])
    got = a(None, labels, torch.zeros(3, 3, 2, 2), 1.0)
    assert torch.equal(got[0], got[1]) and torch.equal(got, b(None, labels, got, 1.0))
    real = (src.vectors[src.rows] - src.mean).norm(dim=1).mean()
    torch.testing.assert_close(a.vectors.norm(dim=1), real.expand(5))
    mixed = a(None, labels, got, 0.25)  # CutMix mixes it as it mixes the text
    torch.testing.assert_close(mixed, 0.25 * got + 0.75 * got.flip(0))


# ----------------------------------------------------------------------------
# The paper's analysis, against brute force

def hsic(k, l):
    """HSIC(K, L) = tr(K H L H) / (n - 1)^2, H the centring matrix (Gretton et al.)."""
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


@pytest.mark.parametrize("n,p,q", [(40, 5, 7), (12, 30, 20)])  # the feature and the Gram form
def test_linear_cka_is_the_hsic_formula(n, p, q):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, p)), rng.normal(size=(n, q))
    y[:, :3] += 2 * x[:, :3]  # some shared signal
    k, l = x @ x.T, y @ y.T
    want = hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))
    got = analysis.linear_cka(torch.tensor(x), torch.tensor(y))
    assert got == pytest.approx(want, rel=1e-9)
    assert analysis.linear_cka(torch.tensor(x), torch.tensor(x)) == pytest.approx(1, abs=1e-12)
    q_mat = np.linalg.qr(rng.normal(size=(q, q)))[0]  # orthogonal, and an isotropic scale
    assert analysis.linear_cka(torch.tensor(x), torch.tensor(3.5 * y @ q_mat + 7)) == (
        pytest.approx(got, rel=1e-9))


def test_frechet_distance_in_closed_form():
    """For diagonal covariances the distance is ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2;
    for equal Gaussians 0; and a full covariance against scipy's sqrtm of the formula."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert analysis.frechet(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    m = rng.normal(size=(6, 6))
    s = m @ m.T + np.eye(6)
    assert analysis.frechet(mu1, s, mu1, s) == pytest.approx(0, abs=1e-8)
    r = rng.normal(size=(6, 6))
    s2 = r @ r.T + 0.5 * np.eye(6)
    root1 = scipy.linalg.sqrtm(s)  # the symmetric form Tr((S1^1/2 S2 S1^1/2)^1/2)
    sym = np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1)).real
    assert analysis.frechet(mu1, s, mu2, s2) == pytest.approx(
        ((mu1 - mu2) ** 2).sum() + np.trace(s) + np.trace(s2) - 2 * sym, rel=1e-8)


def test_class_gaussians_and_ffd_average_over_classes():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(30, 4, generator=g), torch.arange(30) % 3
    means, covs = analysis.class_gaussians(feats, labels, 3)
    for c in range(3):
        x = feats[labels == c].double().numpy()
        assert np.allclose(means[c].numpy(), x.mean(0)) and np.allclose(covs[c].numpy(),
                                                                         np.cov(x.T))
    other = analysis.class_gaussians(feats * 2, labels, 3)
    per_class = [analysis.frechet(means[c], covs[c], other[0][c], other[1][c]) for c in range(3)]
    assert analysis.ffd((means, covs), other) == pytest.approx(np.mean(per_class))
    assert analysis.ffd((means, covs), (means, covs)) == pytest.approx(0, abs=1e-8)


def test_ffd_statistics_of_every_epoch_and_cka_of_a_run_with_itself(tmp_path):
    """A run with record_stats saves each epoch's class Gaussians of the final-norm CLS feature
    (those of the exported model at the last epoch): FFD of the last epoch to itself is 0 and
    the others are positive; CKA of a model with itself is 1 in every attn and mlp module."""
    root = numbered_folder(str(tmp_path / "d"))
    cfg, _ = tt.parse_config(small_run(root, tmp_path, "--name", "r", "--epochs", "2"))
    folder = str(tmp_path / "r")
    tt.train(cfg, on_epoch=analysis.record_stats(cfg, folder))
    curve = analysis.ffd_curve(folder, 2)
    assert curve[1] == pytest.approx(0, abs=1e-6) and curve[0] > 0
    val = tt.image_split(root, "", "val")[0]
    vit = tt.ViT(**tt.read_source(f"{folder}/export")[0])
    vit.load_state_dict(tt.read_source(f"{folder}/export")[1])
    import transfer
    feats, labels = transfer.features(vit, val, torch.tensor(val.targets), 12)
    want = analysis.class_gaussians(feats, labels, 3)
    got = torch.load(f"{folder}.ffd/epoch2.pt", weights_only=True)
    torch.testing.assert_close(got[0], want[0]) and torch.testing.assert_close(got[1], want[1])
    images = analysis.validation_images(root, "", 12, 10)
    cka = analysis.cross_seed_cka(folder, f"{folder}/export", images)
    depth = vit.blocks.__len__()
    assert list(cka) == [f"blocks.{i}.{m}" for i in range(depth) for m in ("attn", "mlp")]
    assert all(v == pytest.approx(1, abs=1e-9) for v in cka.values())


# ----------------------------------------------------------------------------
# The export in timm's own format

def test_an_export_loads_in_timm_with_its_names_and_evaluation(tmp_path):
    """timm.create_model("local-dir:EXPORT", pretrained=True): the same logits (0 difference),
    the class names, and a pretrained_cfg from which timm's own transform gives the run's own
    validation top-1."""
    timm = pytest.importorskip("timm")
    root = numbered_folder(str(tmp_path / "d"), size=(14, 17))
    assert run(small_run(root, tmp_path, "--name", "r", "--epochs", "2")) == 0
    export = str(tmp_path / "r" / "export")
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    args, state, classes = tt.read_source(export)
    vit = tt.ViT(**args).eval()
    vit.load_state_dict(state)
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(model(x), vit(x))
    assert model.pretrained_cfg["label_names"] == classes == ["cat", "dog", "fox"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    val = tt.image_split(root, "", "val")[0]
    with torch.no_grad():
        hits = [model(transform(val[i][0])[None]).argmax().item() == val.targets[i]
                for i in range(len(val))]
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        top1 = [json.loads(line) for line in f][-1]["top1"]
    assert 100 * np.mean(hits) == pytest.approx(top1)


def test_an_export_from_before_timms_format_still_loads(tmp_path):
    """config.json as exports were written before (model_args and classes of this project):
    read_source, and so --init and every tool, still read it."""
    root = numbered_folder(str(tmp_path / "d"))
    assert run(small_run(root, tmp_path, "--name", "r")) == 0
    new, old = tmp_path / "r" / "export", tmp_path / "old"
    shutil.copytree(new, old)
    config = json.loads((new / "config.json").read_text())
    ours = config["textteacher"]["model_args"]
    (old / "config.json").write_text(json.dumps(dict(
        model_args=ours, timm_kwargs=config["model_args"], classes=config["label_names"])))
    a, b = tt.read_source(str(new)), tt.read_source(str(old))
    assert a[0] == b[0] and a[2] == b[2] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert run(small_run(root, tmp_path, "--name", "t", "--init", str(old))) == 0


# ----------------------------------------------------------------------------
# The study's grid

def test_the_study_pairs_each_arm_with_the_baseline_of_its_seed(tmp_path):
    """Within a seed the arms differ in their targets alone; the controls get their target
    sources; the FFD statistics are recorded for the two arms the analysis reads; the shapes
    cells are experiments/features.py's source runs, folder and settings, so either script
    reuses the other's runs."""
    import argparse
    import dataclasses
    import features
    root, data = str(tmp_path / "runs"), str(tmp_path / "data" / "photos")
    for made in (data, f"{root}/data-source", f"{root}/data-target"):  # what prepare() makes
        os.makedirs(made)
    runs = {r.folder: r for r in photos.runs(argparse.Namespace(root=root, data=data))}
    settings = {}
    for folder, r in runs.items():
        if callable(r.config):  # a fine-tune: made once its source has finished
            assert folder.startswith(f"{root}/finetune/") and (r.after == "") == (
                "scratch" in folder)
            assert r.config.args[-1] == r.after  # from its source
            continue
        cfg = r.config
        same = dataclasses.asdict(dataclasses.replace(cfg, text="", text_loss_lambda=0.5))
        settings.setdefault((os.path.dirname(os.path.dirname(folder)), cfg.seed,
                             cfg.label_noise, cfg.data), []).append(same)
        arm = os.path.basename(os.path.dirname(folder)).split("-")[0]
        assert (cfg.text_loss_lambda == 0) == (arm in ("baseline", "base"))
        assert (r.targets is None) == (arm not in ("permuted", "random"))
        assert (r.on_epoch is analysis.record_stats) == (
            arm in ("baseline", "class", "base", "full") and ("/shapes/" in folder
                                                              or "-n0.0/" in folder))
    assert all(len({json.dumps(s, sort_keys=True) for s in group}) == 1
               for group in settings.values())
    clean = [f for f in runs if "-n0.0/" in f and "shapes" not in f]
    assert len(clean) == 4 * 5 and len([f for f in runs if "-n0.5/" in f and "shapes" not in f
                                        ]) == 2 * 3
    shapes_data = os.path.join(os.path.dirname(data), "shapes")
    shared = {folder: cfg for folder, cfg, _ in features.jobs(f"{root}/shapes", shapes_data)}
    for folder, r in runs.items():
        if "/shapes/" in folder:
            assert dataclasses.asdict(r.config) == dataclasses.asdict(shared[folder]), folder

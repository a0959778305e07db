"""The linear probe of experiments/transfer.py and the attribute bookkeeping of
experiments/features.py: what the transfer and feature tables rest on."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from common import CHEAP, ROOT
from common import folder  # noqa: F401  (a fixture)

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import features  # noqa: E402
import shapes  # noqa: E402
import transfer  # noqa: E402


def blobs(n, dim, classes, seed, spread=0.3):
    """n points in dim dimensions around `classes` random centres, label = centre."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def linear_rule(n, seed, dim=32, classes=10):
    """Gaussian features, the label the argmax of a fixed linear map: every point its own."""
    W = torch.randn(dim, classes, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x, (x @ W).argmax(1)


def test_the_probe_separates_separable_features_and_not_shuffled_labels():
    """"the probe on separable synthetic features reaches 100% and on shuffled labels chance":
    well separated blobs are classified perfectly on held-out points; on features whose label
    is a linear rule (the probe gets about 90%), training labels permuted give held-out
    accuracy at chance, 10% for 10 classes (measured 9.0-12.6% over five permutations; the
    bound is 4 p.p.)."""
    x, y = blobs(600, 32, 10, seed=0)
    x_val, y_val = blobs(2000, 32, 10, seed=1)
    assert transfer.linear_probe(x, y, x_val, y_val) == 100.0
    x, y = linear_rule(2000, seed=0)
    x_val, y_val = linear_rule(2000, seed=1)
    assert transfer.linear_probe(x, y, x_val, y_val) > 85
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]
    assert abs(transfer.linear_probe(x, shuffled, x_val, y_val) - 10.0) < 4.0


def test_the_probe_is_deterministic_and_ignores_feature_scale():
    """Paired comparisons need the same number from the same features: two fits agree exactly;
    and standardisation makes a feature's scale irrelevant (a per-dimension rescaling of both
    splits gives the same accuracy, to a point or two of 500 for the optimiser's tolerance)."""
    x, y = linear_rule(300, seed=3, dim=16, classes=5)
    x_val, y_val = linear_rule(500, seed=4, dim=16, classes=5)
    a = transfer.linear_probe(x, y, x_val, y_val)
    assert a == transfer.linear_probe(x, y, x_val, y_val)
    assert 50 < a < 100
    scale = torch.logspace(-3, 3, 16)
    assert abs(transfer.linear_probe(x * scale, y, x_val * scale, y_val) - a) <= 0.4


def test_feature_attributes_follow_the_images(tmp_path):
    """The attributes the probes use are those of the very images an ImageFolder reads: a small
    drawn split written as shapes.py writes it, read back in ImageFolder's order, gets the shape
    of its class folder from shapes.draw's attributes through features.shapes_order."""
    import textteacher as tt
    images, labels, attrs = shapes.draw(40, seed=5)
    from PIL import Image
    for kind in shapes.KINDS:
        os.makedirs(tmp_path / "train" / kind)
    for key, image, label in zip(shapes.keys("train", 40), images, labels):
        Image.fromarray(image).save(tmp_path / "train" / shapes.KINDS[label] / key)
    ds, keys, classes = tt.image_split(str(tmp_path), "", "train")
    order = features.shapes_order(keys, "train")
    assert [classes[y] for y in ds.targets] == [attrs[i]["shape"] for i in order]
    assert sorted(order.tolist()) == list(range(40))
    # and the attribute index tables cover every value a draw can produce
    for a in features.ATTRIBUTES:
        assert {x[a] for x in attrs} <= set(features.ATTR_INDEX[a])


def test_shapes_keeps_each_images_attributes_beside_its_caption(tmp_path, monkeypatch):
    """experiments/shapes.py writes attributes_{train,val}.jsonl: for every image its key and
    exactly the attributes it was drawn with (and its caption names), in key order; the probes
    of experiments/features.py read them back as drawn."""
    splits = {"train": (20, 0), "val": (10, 1)}
    monkeypatch.setattr(shapes.write, "__defaults__", (splits,))
    monkeypatch.setattr(shapes, "embed", lambda attrs, paths, out: None)  # no encoder needed
    out = str(tmp_path / "s")
    shapes.main(["--out", out])
    for split, (n, seed) in splits.items():
        drawn = shapes.draw(n, seed)[2]
        with open(shapes.attributes_file(out, split)) as f:
            rows = [json.loads(line) for line in f]
        assert [r.pop("key") for r in rows] == shapes.keys(split, n)
        assert rows == drawn
        assert [dict(r, key=k) for r, k in zip(drawn, shapes.keys(split, n))] == \
            [dict(r, key=k) for r, k in zip(features.attributes(split, out), shapes.keys(split, n))]


def test_transfer_carries_every_arm_with_its_own_seed(folder, tmp_path, monkeypatch, capsys):
    """experiments/transfer.py on a compare.py folder: each arm (two seeds, baseline and
    TextTeacher) is fine-tuned from its own final weights with its own seed (--init, --seed in
    the fine-tune's checkpoint), probed with exactly the linear probe of its frozen features,
    and summarised as paired differences to the baseline of the same seed; an unfinished arm is
    refused in one line. Stopped by Ctrl-C (SIGINT) in its first fine-tune and then by SIGTERM
    in its second, the command says so in one line each time (exit 130, 143) and, run again,
    carries on from there to the fine-tunes of a transfer never stopped."""
    import signal
    import compare
    import textteacher as tt
    from common import command_here, signal_at_step, untimed
    argv = ["--data", folder[0], "--img-size", "16", "--patch-size", "8", "--model", "micro",
            "--batch-size", "32", "--epochs", "1", "--workers", "0", "--threads", "1",
            "--out-dir", str(tmp_path), *CHEAP]
    compare.main(argv + ["--text", folder[1], "--name", "c", "--seeds", "2"])
    root = str(tmp_path / "c")
    shutil.copytree(root, tmp_path / "whole")  # its fine-tunes never stopped, below
    for at, signum, word in ((3, signal.SIGINT, "interrupted"),  # the first fine-tune's third
                             (6 + 3, signal.SIGTERM, "interrupted by SIGTERM")):  # the second's
        with monkeypatch.context() as mp:  # 6 steps a fine-tune
            signal_at_step(mp, at, signum)
            capsys.readouterr()
            assert command_here("experiments/transfer.py", [root, "--finetune", *argv]) == (
                128 + signum)
            assert capsys.readouterr().err.strip().splitlines() == [
                f"{word}; run the same command again to continue"]
    summary = transfer.transfer(root, argv, finetune=True, do_probe=True)
    transfer.transfer(str(tmp_path / "whole"), argv, finetune=True, do_probe=False)
    for arm in ("seed0-baseline", "seed0-textteacher", "seed1-baseline", "seed1-textteacher"):
        assert untimed(os.path.join(root, "transfer-pets", arm)) == untimed(
            tmp_path / "whole" / "transfer-pets" / arm), arm
    for seed in (0, 1):
        for arm in ("baseline", "textteacher"):
            ft = torch.load(os.path.join(root, "transfer-pets", f"seed{seed}-{arm}",
                                         "checkpoint.pt"), weights_only=True)
            assert ft["config"]["init"] == os.path.join(root, f"seed{seed}-{arm}")
            assert ft["config"]["seed"] == seed and ft["text_dim"] == 0

    def direct(arm, seed):  # the probe by hand: the arm's ViT, its features, linear_probe
        args, state, _ = tt.read_source(os.path.join(root, f"seed{seed}-{arm}"))
        vit = tt.ViT(**args)
        vit.load_state_dict(state)  # the same size: nothing to resize
        xy = [transfer.features(vit, ds, torch.tensor(ds.targets), 16) for ds in (
            tt.image_split(folder[0], "", s)[0] for s in ("train", "val"))]
        return transfer.linear_probe(*xy[0], *xy[1])

    probes = {a: [direct(a, seed) for seed in (0, 1)] for a in ("baseline", "textteacher")}
    source = os.path.join(root, "seed0-textteacher")  # at another size: resized as --init does
    args, _, classes = tt.read_source(source)
    by_init = tt.ViT(**dict(args, img_size=24))
    tt.load_source(by_init, source, classes)
    frozen = transfer.frozen_vit(source, 24).state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in by_init.state_dict().items())
    assert summary["textteacher"]["probe"][0] == pytest.approx(np.mean(probes["textteacher"]))
    assert summary["textteacher"]["probe_diff"][0] == pytest.approx(
        np.mean(np.subtract(probes["textteacher"], probes["baseline"])))
    with open(os.path.join(root, "transfer-pets.json")) as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    os.remove(os.path.join(root, "seed0-baseline", "export", "config.json"))  # unfinished
    with pytest.raises(transfer.cli.UserError, match="seed0-baseline is not finished"):
        transfer.transfer(root, argv, finetune=False, do_probe=True)

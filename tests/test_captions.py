"""
The captions study's parts: caption tables as people publish them, matched to the trainer's
samples; the masking of class words; the within-class shuffle; and CKA as the official code
estimates it (torch_cka's unbiased minibatch HSIC), against brute force.
"""
import itertools
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
from test_photos import numbered_folder  # noqa: E402
import analysis  # noqa: E402
import caption_embed  # noqa: E402
import captions  # noqa: E402
import cli  # noqa: E402
import imagesets  # noqa: E402
import textteacher as tt  # noqa: E402


# ----------------------------------------------------------------------------
# CKA: the unbiased estimator of the official code

def u_statistic(k, l):
    """HSIC_1 by its definition (Song et al., 2012, Theorem 2): the mean over every 4-tuple of
    distinct indices of h = 1/24 sum over its orderings (t, u, v, w) of
    k_tu l_tu + k_tu l_vw - 2 k_tu l_tv."""
    m, total, count = len(k), 0.0, 0
    for quad in itertools.permutations(range(m), 4):
        h = 0.0
        for t, u, v, w in itertools.permutations(quad):
            h += k[t, u] * l[t, u] + k[t, u] * l[v, w] - 2 * k[t, u] * l[t, v]
        total += h / 24
        count += 1
    return total / count


def test_hsic1_is_the_u_statistic_of_its_definition():
    """The closed form torch_cka computes equals the U-statistic it estimates, on small cases."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 5))
    y[:, 0] += x[:, 0]
    k, l = x @ x.T, y @ y.T
    assert analysis.hsic1(torch.tensor(k), torch.tensor(l)) == pytest.approx(
        u_statistic(k, l), rel=1e-9)


def test_minibatch_cka_reads_zero_for_independent_wide_features_where_the_formula_does_not():
    """At the photo runs' width (17 tokens x 128 = 2176) and 1000 images, the biased formula
    reads far above 0 for independent Gaussian features; the unbiased estimate about 0."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 2176, generator=g), torch.randn(1000, 2176, generator=g)
    assert analysis.linear_cka(x, y) > 0.6
    assert abs(analysis.minibatch_cka(x, y)) < 0.02


def test_minibatch_cka_is_one_for_identical_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)
    y = x[:, :10] @ torch.randn(10, 20, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        200, 20, generator=g, dtype=torch.float64)
    assert analysis.minibatch_cka(x, x) == pytest.approx(1, abs=1e-12)
    got = analysis.minibatch_cka(x, y)
    assert 0.2 < got < 0.99
    q = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
    assert analysis.minibatch_cka(x, 3.5 * y @ q) == pytest.approx(got, rel=1e-9)
    # minibatches of 16 as the official code takes them: the 200 rows are 12 of 16 and one of 8
    sums = np.zeros(3)
    for s in range(0, 200, 16):
        xs, ys = x[s:s + 16], y[s:s + 16]
        k, l = xs @ xs.T, ys @ ys.T
        sums += [analysis.hsic1(k, l), analysis.hsic1(k, k), analysis.hsic1(l, l)]
    assert got == pytest.approx(sums[0] / np.sqrt(sums[1] * sums[2]), rel=1e-12)


def test_cka_of_models_of_different_depth_is_one_line(tmp_path):
    """Two models whose blocks differ are refused in one line whichever way round (not a
    KeyError, nor a comparison of the shared blocks alone)."""
    images = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)
    for depth in (2, 3):
        args = dict(num_classes=3, img_size=16, patch_size=8, width=16, depth=depth, heads=2,
                    layer_scale=1e-4, drop_path=0.0)
        tt.export(tt.ViT(**args), args, ["a", "b", "c"], str(tmp_path / f"d{depth}"))
    for a, b in (("d2", "d3"), ("d3", "d2")):
        with pytest.raises(cli.UserError, match="different blocks.*one depth"):
            analysis.cross_seed_cka(str(tmp_path / a), str(tmp_path / b), images)
    same = analysis.cross_seed_cka(str(tmp_path / "d2"), str(tmp_path / "d2"), images, "biased")
    assert all(v == pytest.approx(1, abs=1e-9) for v in same.values()) and len(same) == 4
    floor = analysis.cross_seed_cka(str(tmp_path / "d2"), None, images, "biased")
    assert floor.keys() == same.keys() and all(v < 1 - 1e-6 for v in floor.values())


# ----------------------------------------------------------------------------
# The study's controls

def test_masking_replaces_every_class_word_and_nothing_else():
    assert captions.mask("A Plane, two planes and a jet-ski") == (
        "A thing, two thing and a thing-ski")
    assert captions.mask("the catalog of a scattered category") == (
        "the catalog of a scattered category")  # whole words only
    assert captions.mask("Puppies near the DOG's boat") == "thing near the thing's thing"
    for words in captions.MASKED_WORDS.values():
        for w in words.split():
            assert captions.mask(f"a {w} here") == "a thing here"
            assert captions.mask(f"a {w.upper()}") == "a thing"


def test_within_class_shuffle_keeps_the_class_and_breaks_the_pairing():
    class Targets:  # what WithinClass reads of a TextTargets
        rows, sha256, level = torch.arange(60), "x", "image"
    labels = torch.arange(60) % 3
    shuffled = captions.WithinClass(Targets(), labels, seed=0)
    assert (labels[shuffled.rows] == labels).all()  # every image gets its class's caption
    assert sorted(shuffled.rows.tolist()) == list(range(60))  # each caption used once
    assert (shuffled.rows != torch.arange(60)).float().mean() > 0.8
    again = captions.WithinClass(Targets(), labels, seed=0).rows
    assert torch.equal(again, shuffled.rows) and not torch.equal(
        captions.WithinClass(Targets(), labels, seed=1).rows, shuffled.rows)


# ----------------------------------------------------------------------------
# Caption tables as people publish them

def write_table(path, rows, ext):
    """rows: dicts of path, class, caption; written as .tsv, .csv or .jsonl with a header."""
    if ext == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        sep = "\t" if ext == ".tsv" else ","
        text = sep.join(rows[0]) + "\n" + "".join(sep.join(r.values()) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("ext", [".tsv", ".csv", ".jsonl"])
def test_a_table_keyed_by_paths_matches_the_trainers_samples(tmp_path, ext):
    """A table with a path column (relative to the data folder), a caption column and more,
    in the folder's own order or not: every training image gets its own caption under the
    key the trainer gives it, the val/ rows become the validation captions."""
    root = numbered_folder(str(tmp_path / "d"), train=3, val=2)
    rows = [dict(path=f"{s}/{c}/{i:04d}.jpg", label=c, caption=f"{s} {c} number {i}")
            for s, n in (("val", 2), ("train", 3)) for c in ("fox", "cat", "dog")
            for i in range(n)]
    table = write_table(tmp_path / f"t{ext}", rows, ext)
    keys, texts, _ = caption_embed.read_captions(table, ("path", "caption"))
    matched = imagesets.match_table(root, keys, texts, table)
    for split, n in (("train", 3), ("val", 2)):
        trainer_keys = tt.image_split(root, "", split)[1]
        got = dict(zip(*matched[split]))
        assert sorted(got) == sorted(trainer_keys)
        assert all(got[k] == f"{split} {k.split('/')[0]} number {int(k[-8:-4])}"
                   for k in trainer_keys)


def test_missing_and_extra_rows_are_counted_and_named(tmp_path, capsys):
    root = numbered_folder(str(tmp_path / "d"), train=2, val=2)
    rows = [dict(path=f"{s}/{c}/{i:04d}.jpg", caption="x") for s in ("train", "val")
            for c in ("cat", "dog", "fox") for i in range(2)]
    table = write_table(tmp_path / "t.tsv", rows[:-1] + [dict(path="val/cow/0000.jpg",
                                                              caption="x")], ".tsv")
    keys, texts, _ = caption_embed.read_captions(table, ("path", "caption"))
    matched = imagesets.match_table(root, keys, texts, table)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 val images" in err[0] and "val/fox/0001.jpg" in err[0]
    assert "1 captions name no image" in err[0] and "val/cow/0000.jpg" in err[0]
    assert len(matched["val"][0]) == 5 and len(matched["train"][0]) == 6
    table = write_table(tmp_path / "u.tsv", rows[1:], ".tsv")  # a training image without one
    keys, texts, _ = caption_embed.read_captions(table, ("path", "caption"))
    with pytest.raises(cli.UserError, match=r"1 train images .*no caption .*train/cat/0000\.jpg"
                       r".*needs a caption per training image"):
        imagesets.match_table(root, keys, texts, table)


def test_a_table_embeds_from_the_command_line_with_its_validation_rows(tmp_path):
    root = numbered_folder(str(tmp_path / "d"), train=2, val=1)
    rows = [dict(path=f"{s}/{c}/{i:04d}.jpg", caption=f"a {c} {i}") for s, n in
            (("train", 2), ("val", 1)) for c in ("cat", "dog", "fox") for i in range(n)]
    table = write_table(tmp_path / "t.csv", rows, ".csv")
    out = tmp_path / "e.pt"
    caption_embed.main(["--captions", table, "--columns", "path,caption", "--data", root,
                        "--out", str(out)])
    emb = torch.load(out, weights_only=True)
    assert emb["keys"] == tt.image_split(root, "", "train")[1]
    assert emb["val_keys"] == tt.image_split(root, "", "val")[1]
    # the row of each key is its own caption's vector
    enc = caption_embed.TextEncoder(caption_embed.DEFAULT_ENCODER)
    want = enc.encode([f"a {k.split('/')[0]} {int(k[-8:-4])}" for k in emb["keys"]])
    assert torch.allclose(emb["embeddings"], want, atol=1e-5)
    tt.TextTargets(str(out), emb["keys"], ["cat", "dog", "fox"], root)  # the trainer reads it


@pytest.mark.parametrize("argv, message", [
    (["--columns", "path"], "argument --columns: must be 2 names, KEY,CAPTION"),
    (["--columns", "path,text"], r"has no column text \(its header: path, caption\)"),
], ids=["one-column", "no-such-column"])
def test_column_mistakes_are_one_line(tmp_path, argv, message):
    table = write_table(tmp_path / "t.tsv", [dict(path="train/cat/0000.jpg", caption="x")],
                        ".tsv")
    with pytest.raises(cli.UserError, match=message):
        caption_embed.main(["--captions", table, *argv, "--out", str(tmp_path / "o.pt")])

"""
The fixed-target study's cells (experiments/fixedtarget.py): a class table that learns with the
model and resumes exactly, a second classifier and a constant weight against their formulas,
and the runs shared with the photo study.
"""
import argparse
import dataclasses
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
from common import assert_same_weights, checkpoint, crash_in_epoch, write_embeddings  # noqa: E402
import fixedtarget  # noqa: E402
import photos  # noqa: E402
import textteacher as tt  # noqa: E402
from test_photos import Source, numbered_folder, small_run  # noqa: E402


def test_the_learned_table_starts_as_the_random_vectors_and_is_mixed_like_them():
    src = Source()
    learned, fixed = fixedtarget.LearnedClass(src), photos.RandomClass(src)
    labels, images = torch.tensor([4, 0, 0]), torch.zeros(3, 3, 2, 2)
    assert torch.equal(learned(None, labels, images, 1.0), fixed(None, labels, images, 1.0))
    torch.testing.assert_close(learned(None, labels, images, 0.3),
                               fixed(None, labels, images, 0.3))
    assert learned.table.requires_grad and learned.sha256 != fixed.sha256


def test_a_learned_table_trains_with_the_model_and_resumes_exactly(tmp_path, monkeypatch):
    """train() registers a module target source with the model: the optimiser moves it, the
    checkpoint holds it, and a run stopped after its first epoch continues to the same table
    and weights as one that never stopped."""
    root = numbered_folder(str(tmp_path / "d"))
    text = write_embeddings(tmp_path / "c.pt", ["cat", "dog", "fox"], torch.randn(3, 8),
                            level="class")
    cfg, _ = tt.parse_config(small_run(root, tmp_path, "--text", text, "--epochs", "2"))

    def source():
        return fixedtarget.LearnedClass(tt.TextTargets(text, [], ["cat", "dog", "fox"]))
    start = source().table.detach().clone()
    tt.train(dataclasses.replace(cfg, name="whole"), targets=source())
    whole = checkpoint(tmp_path / "whole")
    assert not torch.equal(whole["model"]["targets.table"], start)  # it learned
    with monkeypatch.context() as mp:
        crash_in_epoch(mp, 2)
        with pytest.raises(RuntimeError):
            tt.train(dataclasses.replace(cfg, name="cut"), targets=source())
    tt.train(dataclasses.replace(cfg, resume=str(tmp_path / "cut")), targets=source())
    assert_same_weights(whole["model"], checkpoint(tmp_path / "cut")["model"])
    # the export is the plain ViT: nothing of the table
    assert json.load(open(tmp_path / "whole" / "export" / "config.json"))["num_classes"] == 3


def losses(seed=0):
    g = torch.Generator().manual_seed(seed)
    vit = tt.ViT(3, 8, 4, 16, 1, 2)
    return vit, torch.randn(6, 3, 8, 8, generator=g), F.softmax(torch.randn(6, 3, generator=g), 1)


def test_the_second_classifier_is_the_classifiers_loss_on_the_text_head_with_the_weight():
    """L = lam w CE_s(head2(F), y) + (1 - lam) CE_s(head(F), y), w the ratio of the two losses'
    gradient norms at F, CE_s the label-smoothed cross-entropy: by hand."""
    torch.manual_seed(0)
    vit, images, y = losses()
    model = tt.TextTeacher(vit, text_dim=3)
    cfg, _ = tt.parse_config(["--label-smoothing", "0.1"])
    t = fixedtarget.Labels(3)(None, y.argmax(1), images, 1.0)
    assert torch.equal(t, F.one_hot(y.argmax(1), 3).float())
    loss, loss_cls, loss_2, w = fixedtarget.second_classifier(model, images, y, y, 0.5, cfg)
    feat = vit.forward_features(images)
    ce = [F.cross_entropy(h(feat), y, label_smoothing=0.1) for h in (vit.head, model.text_head)]
    g = [torch.autograd.grad(c, feat, retain_graph=True)[0].norm() for c in ce]
    want_w = (g[0] + 1e-7) / (g[1] + 1e-7)
    torch.testing.assert_close(w, want_w)
    torch.testing.assert_close(loss, 0.5 * want_w * ce[1] + 0.5 * ce[0])
    torch.testing.assert_close(loss_2, ce[1])


def test_the_prototype_cell_is_a_cross_entropy_over_the_random_class_vectors(monkeypatch):
    """The further cell: random's source (its vectors V set the head's width) and the text loss
    CE_s(z V^T, y), weighted as random's is (adaptive weight): by hand."""
    src = Source()
    monkeypatch.setattr(fixedtarget.runner, "text_targets", lambda cfg: (src, None))
    proto = fixedtarget.Prototype()
    source = proto.targets(None)
    V = photos.RandomClass(src).vectors
    assert torch.equal(proto.vectors, V) and source.sha256 == "random-class:0"
    torch.manual_seed(0)
    vit, (_, images, _) = tt.ViT(len(V), 8, 4, 16, 1, 2), losses()  # a class per vector
    y = F.softmax(torch.randn(6, len(V), generator=torch.Generator().manual_seed(3)), 1)
    model = tt.TextTeacher(vit, text_dim=source.dim)
    cfg, _ = tt.parse_config(["--label-smoothing", "0.1"])
    t = source(None, y.argmax(1), images, 1.0)
    loss, loss_cls, loss_txt, w = proto(model, images, y, t, 0.5, cfg)
    feat = vit.forward_features(images)
    ce_txt = F.cross_entropy(model.text_head(feat) @ V.T, y, label_smoothing=0.1)
    ce_cls = F.cross_entropy(vit.head(feat), y, label_smoothing=0.1)
    g = [torch.autograd.grad(c, feat, retain_graph=True)[0].norm() for c in (ce_cls, ce_txt)]
    want_w = (g[0] + 1e-7) / (g[1] + 1e-7)
    torch.testing.assert_close(w, want_w)
    torch.testing.assert_close(loss_txt, ce_txt)
    torch.testing.assert_close(loss, 0.5 * want_w * ce_txt + 0.5 * ce_cls)


def test_the_constant_weight_is_the_mean_w_of_its_run_and_replaces_the_adaptive_one(tmp_path):
    run = tmp_path / "random"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(dict(epoch=e, w=w, top1=1.0)) + "\n"
                                               for e, w in ((1, 0.2), (2, 0.5), (3, 0.8))))
    torch.manual_seed(0)
    vit, images, y = losses(1)
    model, t = tt.TextTeacher(vit, text_dim=5), torch.randn(6, 5)
    cfg, _ = tt.parse_config(["--no-adaptive-weight"])
    loss, loss_cls, loss_txt, w = fixedtarget.ConstantWeight(str(run))(
        model, images, y, t, 0.25, cfg)
    z = model.text_head(vit.forward_features(images))
    torch.testing.assert_close(loss_txt, tt.clip_loss(z, t))
    assert w.item() == pytest.approx(0.5)
    torch.testing.assert_close(loss, 0.25 * 0.5 * loss_txt + 0.75 * loss_cls)
    with pytest.raises(tt.UserError):  # on top of the adaptive weight it would be a product
        fixedtarget.ConstantWeight(str(run))(model, images, y, t, 0.25, tt.parse_config([])[0])


def test_the_study_takes_the_photo_studys_runs_and_pairs_every_cell_by_seed(tmp_path):
    """The baseline, class and random runs of seeds 0-4 are the photo study's own Runs (either
    script reuses the other's); within a seed the cells differ in their targets, objective and
    weight alone; constant waits for the run whose weight it copies."""
    root, data = str(tmp_path / "runs"), str(tmp_path / "data")
    for made in (data, f"{root}/data-source", f"{root}/data-target"):  # photos.prepare's
        os.makedirs(made)
    args = argparse.Namespace(root=root, data=data)
    runs = fixedtarget.runs(args)
    theirs = {r.folder: r for r in photos.runs(args)}
    count = {}
    for r in runs:
        cell, seed = r.folder[len(root) + 1:].split("-n0.0/seed")
        count[cell] = count.get(cell, 0) + 1
        if cell in ("baseline", "class", "random") and int(seed) < 5:
            mine, other = r, theirs[r.folder]
            assert dataclasses.asdict(mine.config) == dataclasses.asdict(other.config)
            assert mine.on_epoch is other.on_epoch and (mine.targets is None) == (
                other.targets is None)
        same = dataclasses.asdict(dataclasses.replace(
            r.config, text="", text_loss_lambda=0.5, adaptive_weight=True))
        assert same == dataclasses.asdict(dataclasses.replace(
            photos.photo_config(data, "--seed", seed), text=""))
        assert r.config.adaptive_weight == (cell != "constant")
        if cell == "constant":
            assert r.after == f"{root}/random-n0.0/seed0" == r.objective.folder
            assert runs.index(r) > [x.folder for x in runs].index(r.after)
    assert count == {c: len(s) for c, s in fixedtarget.SEEDS.items()}


def finished_run(path, top1):
    """A run folder as runner.finals reads a finished one: every epoch logged, and an export."""
    os.makedirs(os.path.join(path, "export"))
    open(os.path.join(path, "export", "config.json"), "w").write("{}")
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(dict(epoch=e, top1=top1 if e == 10 else 0.0)) + "\n"
                     for e in range(1, 11))


def test_the_report_takes_the_photo_studys_recorded_results_where_its_runs_have_not_run(
        tmp_path):
    """A shared run finished here wins over its recorded result, and the pair is named; a
    recorded seed stands in for a shared run not yet run here; a cell of this study's own is
    never taken from elsewhere; a photos.json of another shape is one line."""
    root, docs = tmp_path / "runs", tmp_path / "docs"
    docs.mkdir()
    saved = {f"{c}-n0.0": dict(top1=[40.0 + i + 10 * k for i in range(5)])
             for k, c in enumerate(fixedtarget.SHARED)}
    (docs / "photos.json").write_text(json.dumps(saved))
    finished_run(fixedtarget.folder(str(root), "random", 0), 60.5)
    finished_run(fixedtarget.folder(str(root), "learned", 3), 55.0)
    args = argparse.Namespace(root=str(root), docs=str(docs))
    top1, both = fixedtarget.top1_of(args)
    assert top1["baseline"] == {0: 40.0, 1: 41.0, 2: 42.0, 3: 43.0, 4: 44.0}
    assert top1["random"] == {0: 60.5, 1: 61.0, 2: 62.0, 3: 63.0, 4: 64.0}
    assert top1["learned"] == {3: 55.0} and top1["second"] == {} and both == [
        ("random", 0, 60.5, 60.0)]
    (docs / "photos.json").write_text(json.dumps({"baseline-n0.0": [1, 2]}))
    with pytest.raises(tt.UserError, match="photos.json is not the photo study's report"):
        fixedtarget.top1_of(args)


def test_the_new_cells_run_before_the_photo_studys_own_runs(tmp_path):
    root, data = str(tmp_path / "runs"), str(tmp_path / "data")
    os.makedirs(data)
    order = [r.folder[len(root) + 1:] for r in fixedtarget.runs(
        argparse.Namespace(root=root, data=data))]
    assert order[0] == "random-n0.0/seed0"
    shared = [i for i, f in enumerate(order) if f.split("-")[0] in fixedtarget.SHARED
              and int(f[-1]) < 5 and f != "random-n0.0/seed0"]
    assert shared == list(range(len(order) - 14, len(order)))  # the last 14
    assert order.index("prototype-n0.0/seed4") < order.index("class-n0.0/seed5")

"""Tests of the tools beside textteacher.py: benchmarks/ (the step benchmark, and the
comparisons with timm and sentence-transformers where those are installed) and experiments/
(the paired comparison with its controls, alignment metrics and vision teacher; the export with
a torch.export program; the plot; the shapes generator). Each asserts what the tool's result
means, not only that it runs.

Run: python -m pytest -q tests/test_tools.py
"""
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from common import (CHEAP, ROOT, TEXT_DIM, assert_same_weights, base_args, checkpoint, folder,
                    image_features, metrics, run, write_embeddings)

import textteacher as tt

for _tools in ("experiments", "benchmarks"):
    if os.path.join(ROOT, _tools) not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, _tools))
import compare  # noqa: E402
import shapes  # noqa: E402
import step  # noqa: E402

assert folder  # a fixture, used by name
CPU = torch.device("cpu")


def micro_cfg(**changes):
    return tt.Config(**{**dict(model="micro", img_size=16, patch_size=8, drop_path=0.0), **changes})


def synthetic_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 16, 16, generator=g), torch.eye(10)[torch.arange(6)], torch.randn(
        6, 12, generator=g)


# ----------------------------------------------------------------------------
# benchmarks/step.py

def hand_flops(width, depth, heads, img_size, patch_size, num_classes):
    """Forward FLOPs of one image, matmul by matmul, 2 * M * N * K each (FlopCounterMode's rule)."""
    grid2 = (img_size // patch_size) ** 2
    N, C, H = grid2 + 1, width, 4 * width  # tokens (patches and CLS), width, MLP hidden width
    patch = 2 * grid2 * C * (3 * patch_size ** 2)  # the convolution: [grid2, 3 p^2] x [3 p^2, C]
    block = (2 * N * C * 3 * C  # qkv
             + 2 * N * N * C  # scores q k^T, summed over heads: heads * (2 * N * N * C / heads)
             + 2 * N * N * C  # the weighted sum of the values
             + 2 * N * C * C  # proj
             + 2 * N * C * H  # fc1
             + 2 * N * H * C)  # fc2
    head = 2 * C * num_classes  # on the CLS feature only
    return patch + depth * block + head, patch


@pytest.mark.parametrize("model, img_size, patch_size, num_classes",
                         [("micro", 16, 4, 7), ("tiny", 32, 4, 100)])
def test_flop_count_matches_the_hand_formula(model, img_size, patch_size, num_classes):
    """benchmarks/step.py counts FLOPs per image: the forward pass matmul by matmul; the
    backward two matmuls per forward one (the gradients of both operands), except the patch
    convolution, whose input (the images) needs no gradient."""
    cfg = tt.Config(model=model, img_size=img_size, patch_size=patch_size)
    forward, train = step.count_flops(cfg, num_classes)
    expected, patch = hand_flops(*tt.MODEL_SIZES[model], img_size, patch_size, num_classes)
    assert forward == expected
    assert train == 3 * forward - patch


def test_the_benchmark_times_the_loops_step_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """`python benchmarks/step.py ...`: both arms run the training loop's own step_losses (the
    same function object, with and without text targets, equally often), it prints each of its
    numbers, every number is positive and finite, and nothing is written (no run folder, no
    data)."""
    assert step.step_losses is tt.step_losses
    seen, real = [], step.step_losses

    def spy(model, images, y, targets, *a, **k):
        seen.append(targets is not None)
        return real(model, images, y, targets, *a, **k)
    monkeypatch.setattr(step, "step_losses", spy)
    results, benchmark = [], step.benchmark
    monkeypatch.setattr(step, "benchmark", lambda *a, **k: results.append(benchmark(*a, **k)))
    monkeypatch.chdir(tmp_path)
    step.main(["--model", "micro", "--img-size", "16", "--patch-size", "8", "--batch-size", "8",
               "--optimizer", "adamw", "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    for word in ("parameters", "FLOPs", "baseline", "TextTeacher", "text objective",
                 "inference", "peak memory", "matmul peak"):
        assert word in out, word
    assert os.listdir(tmp_path) == []
    assert seen.count(True) == seen.count(False) > 15
    (r,) = results
    for key in ("baseline_images_per_s", "textteacher_images_per_s", "inference_images_per_s",
                "matmul_peak_flops", "train_utilisation", "inference_utilisation",
                "forward_flops", "train_flops", "textteacher_step_ratio", "text_objective_ms"):
        assert 0 < r[key] < math.inf, key
    assert r["text_head_parameters"] == (tt.MODEL_SIZES["micro"][0] + 1) * step.BENCH_TEXT_DIM
    cfg = micro_cfg()
    assert r["parameters"] == sum(p.numel() for p in tt.build_model(cfg, 1000, 0).vit.parameters())


def test_the_step_never_reads_a_value_back_to_the_host(monkeypatch):
    """On a GPU, .item(), float(t) or `if t:` in the step would stall every step until the device
    catches up: the loop's step (step_losses, backward, clipping, LAMB) reads nothing back.
    (torch's AdamW reads its step counter on the host unless fused, as it is on CUDA.)"""
    cfg = micro_cfg(optimizer="lamb")
    model = tt.build_model(cfg, 10, 12)
    optimizer = tt.build_optimizer(cfg, model, CPU)
    images, y, t = synthetic_batch()

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host inside the training step")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = tt.step_losses(model, images, y, t, 0.5, cfg)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


# A compiled model's losses, w and gradients against eager's: tests/test_cuda_path.py trains
# three compiled steps and compares every micro-batch's.


def test_against_timm_compares_the_same_network():
    """benchmarks/against_timm.py (where timm is installed; CI installs requirements.txt only):
    the same weights give the same logits in both models, so it times one network two ways."""
    pytest.importorskip("timm")
    import against_timm
    r = against_timm.main(["--model", "micro", "--img-size", "16", "--patch-size", "8",
                           "--batch-size", "8", "--steps", "3", "--warmup", "1"])
    assert r["logit_gap"] < 1e-5
    assert 0 < r["textteacher"]["speed_vs_timm"] < math.inf


# ----------------------------------------------------------------------------
# experiments/compare.py: the paired comparison, its controls, alignment and vision teacher

@pytest.fixture(scope="module")
def captioned(folder, tmp_path_factory):
    """The tiny folder's embeddings file with validation captions too, as caption_embed.py
    writes them with --val-captions."""
    root, _, keys = folder
    _, val_keys, _ = tt.image_split(root, "", "val")
    vectors = image_features(root, keys)
    path = tmp_path_factory.mktemp("captioned") / "text.pt"
    return write_embeddings(path, keys, vectors, val_keys=val_keys,
                            val_embeddings=image_features(root, val_keys, split="val"))


def test_compare_runs_both_arms_from_the_same_start(folder, captioned, tmp_path, monkeypatch):
    """experiments/compare.py --seeds 2: per seed, the baseline and TextTeacher start from the
    same ViT weights and see the same images in the same order with the same augmentation; the
    baseline arm is exactly the standalone baseline of its seed; the summary's differences are
    the mean and std of the paired ones; the last epoch of the TextTeacher arm carries the
    alignment metrics; the same command again reuses the finished arms."""
    starts, items = [], []
    build, getitem = tt.build_model, tt.Samples.__getitem__

    def spy_build(*a, **k):
        model = build(*a, **k)
        starts.append({k: v.clone() for k, v in model.vit.state_dict().items()})
        return model

    def spy_getitem(self, item):
        if isinstance(item, tuple):  # training samples come with their augmentation seed
            items[-1].append(item)
        return getitem(self, item)
    monkeypatch.setattr(tt, "build_model", lambda *a, **k: items.append([]) or spy_build(*a, **k))
    monkeypatch.setattr(tt.Samples, "__getitem__", spy_getitem)
    argv = base_args(folder, tmp_path, "--epochs", "1", "--text", captioned, "--name", "c")
    compare.main(argv + ["--seeds", "2"])
    monkeypatch.undo()
    assert len(starts) == 4  # seed 0 baseline, seed 0 TextTeacher, seed 1 ...
    for a, b in ((0, 1), (2, 3)):
        assert_same_weights(starts[a], starts[b])
        assert items[a] == items[b] and len(items[a]) == 192
    assert not torch.equal(starts[0]["pos_embed"], starts[2]["pos_embed"])  # seeds differ
    c = tmp_path / "c"
    with open(c / "compare.json") as f:
        summary = json.load(f)
    assert summary["arms"] == ["baseline", "textteacher"] and summary["seeds"] == [0, 1]
    diffs = [metrics(c / f"seed{s}-textteacher")[-1]["top1"]
             - metrics(c / f"seed{s}-baseline")[-1]["top1"] for s in (0, 1)]
    assert summary["textteacher"]["final_diff"][0] == pytest.approx(np.mean(diffs))
    assert summary["textteacher"]["final_diff"][1] == pytest.approx(np.std(diffs, ddof=1))
    assert metrics(c / "seed0-baseline")[0]["loss_txt"] is None
    last = metrics(c / "seed0-textteacher")[-1]
    assert 0 <= last["retrieval_top1"] <= 100 and -1 <= last["cos_other"] <= 1
    assert summary["textteacher"]["retrieval_top1"][0] == pytest.approx(
        np.mean([metrics(c / f"seed{s}-textteacher")[-1]["retrieval_top1"] for s in (0, 1)]))
    # the baseline arm is exactly the standalone baseline of the same seed
    alone = base_args(folder, tmp_path, "--epochs", "1", "--text-loss-lambda", "0")
    assert run(alone + ["--name", "alone"]) == 0
    assert_same_weights(checkpoint(tmp_path / "alone")["model"],
                        checkpoint(c / "seed0-baseline")["model"])
    before = os.path.getmtime(c / "seed0-baseline" / "checkpoint.pt")
    compare.main(argv + ["--seeds", "2"])
    assert os.path.getmtime(c / "seed0-baseline" / "checkpoint.pt") == before


def test_text_controls(tmp_path):
    """--control shuffle gives each image another image's target (a permutation of the same
    targets); --control random gives each image a fixed Gaussian vector with the real targets'
    per-dimension spread. Both are called as the real source is."""
    vectors = torch.randn(50, 6) * torch.arange(1.0, 7.0) + 3
    keys = [str(i) for i in range(50)]
    path = write_embeddings(tmp_path / "e.pt", keys, vectors)
    real = tt.TextTargets(path, keys, [])
    index, labels = torch.arange(50), torch.zeros(50, dtype=torch.long)
    images = torch.zeros(50, 3, 4, 4)
    t = real(index, labels, images, 1.0)
    shuffled = compare.Shuffled(real, seed=0)(index, labels, images, 1.0)
    assert not torch.equal(shuffled, t)  # another pairing...
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, t.tolist()))  # ...same set
    assert torch.equal(compare.Shuffled(real, 0)(index, labels, images, 1.0), shuffled)
    gaussian = compare.Gaussian(real, seed=0)
    g = gaussian(index, labels, images, 1.0)
    assert torch.equal(g[7], gaussian(torch.tensor([7]), labels[:1], images[:1], 1.0)[0])
    assert gaussian.dim == 6 and not torch.allclose(g, t)
    spread = torch.cat([compare.Gaussian(real, s)(index, labels, images, 1.0)
                        for s in range(40)]).std(0)
    torch.testing.assert_close(spread, vectors.std(0), rtol=0.1, atol=0)
    torch.testing.assert_close(gaussian(index, labels, images, 0.3), tt.mix(g, 0.3))


def test_alignment_against_brute_force(folder, captioned):
    """The alignment callback, at the last epoch: image-to-caption retrieval top-1 (scored by
    dot products, as the loss scores), and the mean cosine of matching and of non-matching
    pairs, against a loop over single validation images; nothing at other epochs."""
    root, _, _ = folder
    cfg = micro_cfg(data=root, data_dir="", epochs=2, text=captioned)
    torch.manual_seed(0)
    model = tt.build_model(cfg, 3, TEXT_DIM)
    on_epoch = compare.alignment(cfg, captioned, limit=20)
    record = dict(epoch=1)
    on_epoch(record, model)
    assert record == dict(epoch=1)
    record = dict(epoch=2)
    on_epoch(record, model)
    emb = torch.load(captioned, weights_only=True)
    dataset, val_keys, _ = tt.image_split(root, "", "val")
    row = {k: r for r, k in enumerate(emb["val_keys"])}
    samples = tt.Samples(dataset, torch.tensor(dataset.targets), 16)
    z, t = [], []
    with torch.no_grad():
        for i in range(20):
            image = samples[i][0][None]
            z.append(model.text_head(model.vit.eval().forward_features(tt.normalize(image)))[0])
            t.append(emb["val_embeddings"][row[val_keys[i]]] - emb["mean"])

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))
    hits = sum(max(range(20), key=lambda j: float(z[i] @ t[j])) == i for i in range(20))
    assert record["retrieval_top1"] == pytest.approx(100 * hits / 20)
    assert record["cos_match"] == pytest.approx(sum(cos(z[i], t[i]) for i in range(20)) / 20,
                                                abs=1e-5)
    assert record["cos_other"] == pytest.approx(
        sum(cos(z[i], t[j]) for i in range(20) for j in range(20) if i != j) / 380, abs=1e-5)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """A tiny randomly initialised DINOv2 saved as a Hugging Face folder. Its config says 32 px,
    twice the student's 16: a teacher fed at its own resolution would see other pixels."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=48)).save_pretrained(folder)
    return str(folder)


def test_the_vision_teacher_sees_the_students_batch_and_gives_its_pooled_features(
        dinov2, folder, tmp_path, monkeypatch):
    """"The official code feeds the teacher the student's own ImageNet-normalised 224 px batch,
    unchanged: no resize to the teacher config's image size, no re-normalisation" (METHOD.md,
    Online vision teacher), and its targets are the frozen model's pooled features of that batch.
    In a run with 3-Augment and CutMix, every batch the teacher got is bit for bit the batch the
    student's loss got, and every target is the reference model's pooler output of it."""
    from transformers import Dinov2Model
    teacher = compare.VisionTeacher(dinov2, CPU, 16)
    reference = Dinov2Model.from_pretrained(dinov2).eval()
    assert teacher.dim == 24 and not any(p.requires_grad for p in teacher.model.parameters())
    fed, steps = [], []
    teacher.model.register_forward_pre_hook(
        lambda m, args, kwargs: fed.append(kwargs.get("pixel_values", args[0] if args else None)),
        with_kwargs=True)
    real = tt.step_losses

    def spy(model, images, y, targets, *a, **k):
        steps.append((images.clone(), targets.clone()))
        return real(model, images, y, targets, *a, **k)
    monkeypatch.setattr(tt, "step_losses", spy)
    cfg, given = tt.parse_config(base_args(folder, tmp_path, "--epochs", "1", "--text", "",
                                           "--name", "t"))
    tt.train(cfg, given, targets=teacher)
    monkeypatch.undo()
    assert len(steps) == 6 and len(fed) == 6
    for pixels, (images, targets) in zip(fed, steps):
        assert torch.equal(pixels, images)
        with torch.no_grad():
            torch.testing.assert_close(targets, reference(pixel_values=images).pooler_output)
    assert checkpoint(tmp_path / "t")["text_dim"] == 24
    assert metrics(tmp_path / "t")[0]["loss_txt"] > 0


# ----------------------------------------------------------------------------
# experiments/export.py, experiments/plot.py, experiments/shapes.py

def test_export_adds_a_torch_export_program_that_gives_the_trained_logits(folder, tmp_path,
                                                                           capsys):
    """experiments/export.py RUN: the same weights as the run's own export, and a torch.export
    program model.pt2 that gives the trained model's logits, at any batch size."""
    import export as export_tool
    from safetensors.torch import load_file
    assert run(base_args(folder, tmp_path, *CHEAP, "--epochs", "1", "--name", "e")) == 0
    out = tmp_path / "e" / "export"
    written = load_file(out / "model.safetensors")
    os.remove(out / "model.safetensors")
    export_tool.main([str(tmp_path / "e")])
    assert str(out) in capsys.readouterr().out
    again = load_file(out / "model.safetensors")
    assert written.keys() == again.keys() and all(torch.equal(again[k], written[k]) for k in again)
    ckpt = checkpoint(tmp_path / "e")
    trained = tt.TextTeacher(tt.ViT(**ckpt["model_args"]), ckpt["text_dim"]).eval()
    trained.load_state_dict(ckpt["model"])
    program = torch.export.load(str(out / "model.pt2")).module()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program(x), trained(x)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(program(x[:1]), trained(x[:1])[0], rtol=1e-5, atol=1e-5)


def test_plot_writes_a_png_of_every_run(tmp_path, capsys):
    """experiments/plot.py: the runs inside a comparison folder, found and drawn into a PNG."""
    pytest.importorskip("matplotlib")
    import plot
    for name, loss_txt in (("baseline", None), ("textteacher", 2.5)):
        os.makedirs(tmp_path / "c" / name)
        with open(tmp_path / "c" / name / "metrics.jsonl", "w") as f:
            for epoch in (1, 2):
                f.write(json.dumps(dict(epoch=epoch, top1=10.0 * epoch, loss_txt=loss_txt)) + "\n")
    plot.main([str(tmp_path / "c"), "--out", str(tmp_path / "p.png")])
    assert "(2 runs)" in capsys.readouterr().out
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_is_missing(tmp_path, monkeypatch):
    """matplotlib is optional: without it the plot ends in one line saying how to get it."""
    import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(tt.UserError) as e:  # one line through cli.run, exit code 2
        plot.main([str(tmp_path), "--out", str(tmp_path / "p.png")])
    assert str(e.value) == "plotting needs matplotlib, which is optional: pip install matplotlib"
    assert os.listdir(tmp_path) == []  # no plot, no claim left behind


def test_shapes_are_drawn_deterministically_with_captions_in_the_papers_format(tmp_path):
    """experiments/shapes.py: images are a function of the seed; each caption names its
    image's shape; the set is an ordinary image folder keyed by file name, with caption files
    of lines "key:<TAB>caption" whose keys are the files' names, so it takes the path a user's
    own data takes."""
    a, la, attrs = shapes.draw(20, seed=5)
    b, lb, _ = shapes.draw(20, seed=5)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, shapes.draw(20, seed=6)[0])
    for label, attr in zip(la, attrs):
        assert attr["shape"] == shapes.KINDS[label]
        assert shapes.KINDS[label] in shapes.caption(attr).split()
        assert shapes.caption(attr, "word") == shapes.KINDS[label]
        assert shapes.caption(attr, "one-template") == shapes.TEMPLATES[0].format(**attr)
    splits = {"train": (80, 0), "val": (40, 1)}
    written = shapes.write(str(tmp_path / "s"), splits)
    for split, (n, _) in splits.items():
        path = tmp_path / "s" / f"captions_{split}.txt"
        shapes.write_captions(str(path), split, written[split])
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) == n and all(re.fullmatch(r"[^\t:]+:\t.+", line) for line in lines)
        captions = dict(line.split(":\t", 1) for line in lines)
        dataset, keys, classes = tt.image_split(str(tmp_path / "s"), "", split)
        assert classes == sorted(shapes.KINDS) and sorted(keys) == sorted(captions)
        for (path_, label), key in zip(dataset.samples, keys):
            assert classes[label] in captions[key].split()  # the folder's class is the caption's
    images, labels, _ = shapes.draw(80, 0)
    first = tmp_path / "s" / "train" / shapes.KINDS[labels[0]] / shapes.keys("train", 80)[0]
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(first)), images[0])  # PNG: lossless


# ----------------------------------------------------------------------------
# README.md

def test_the_readme_table_names_each_part_at_its_true_line():
    """Every `name` (line) of the README's paper-to-code table is a def, class or assignment
    of that name at that line of textteacher.py, and every part of the method has a row."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "textteacher.py")) as f:
        source = f.read().splitlines()
    table = readme.split("## The paper, point by point")[1].split("\n## ")[0]
    cited = re.findall(r"`(\w+)` \((\d+)\)", table)
    assert len(cited) >= 20
    for name, line in cited:
        assert re.match(rf"(def|class) {name}\b|{name} = ", source[int(line) - 1]), (name, line)
    for part in ("clip_loss", "adaptive_weight", "step_losses", "lambda_at", "cutmix", "mix",
                 "TextTeacher", "TextTargets", "build_optimizer", "lr_at", "noisy_labels",
                 "export"):
        assert part in dict(cited), part

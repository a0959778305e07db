"""Tests of experiments/distill.py: logit KD, RichKD's fusion with CLIP's zero-shot logits and the
scaled-teacher control, beside the baseline and TextTeacher. Offline: the teachers and CLIP are
tiny random models saved with save_pretrained (or exported by textteacher.py) into tmp folders.

Run: python -m pytest -q tests/test_distill.py
"""
import contextlib
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import (RANDOM, ROOT, assert_same_weights, base_args, checkpoint, folder, metrics,
                    one_line, snapshot)

import textteacher as tt

if os.path.join(ROOT, "experiments") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
import compare  # noqa: E402
import distill  # noqa: E402

assert folder  # a fixture, used by name
CPU = torch.device("cpu")
CLASSES = ["a", "b", "c"]  # the tiny folder's


# ----------------------------------------------------------------------------
# tiny teachers and a tiny CLIP, saved once per module

def export_teacher(path, classes=CLASSES, img_size=16):
    """A randomly initialised micro ViT, exported as textteacher.py exports a run."""
    torch.manual_seed(1)
    cfg = tt.Config(model="micro", img_size=img_size, patch_size=8)
    args = tt.model_args(cfg, len(classes))
    tt.export(tt.ViT(**args), args, classes, str(path))
    return str(path)


def hf_teacher(path, names=CLASSES, image_size=16):
    """A tiny random Hugging Face ViT classifier with id2label."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(2)
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=24, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=48, num_labels=len(names),
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in
                                                                  enumerate(names)})
    ViTForImageClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    base = tmp_path_factory.mktemp("teachers")
    return dict(ours=export_teacher(base / "ours"), hf=hf_teacher(base / "hf"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random CLIP with a character-level BPE tokenizer (no merges) and CLIP's image
    processor at 32 px, twice the data's 16: the cache must resize to CLIP's own size."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    path = tmp_path_factory.mktemp("clip")
    chars = "abcdefghijklmnopqrstuvwxyz-'"
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>",
                                         "<|endoftext|>"])}
    with open(path / "vocab.json", "w") as f:
        json.dump(vocab, f)
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=len(tok), max_position_embeddings=64,
                                         bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(3)
    CLIPModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------
# the formulas

def test_kd_loss_is_t_squared_times_a_brute_force_kl():
    """kd_loss = T^2 KL(softmax(z_T / T) || softmax(z_S / T)), summed over classes and averaged
    over the batch, against a loop; and the arms' objective is CE(z_S, y) with the run's label
    smoothing (the baseline's loss) + beta kd_loss, with L_kd logged and w = 1."""
    g = torch.Generator().manual_seed(0)
    zs, zt = 3 * torch.randn(5, 7, generator=g), 3 * torch.randn(5, 7, generator=g)
    for T in (1.0, 3.0, 3 / 0.7):
        total = 0.0
        for i in range(5):
            p = [math.exp(zt[i, c] / T) for c in range(7)]
            q = [math.exp(zs[i, c] / T) for c in range(7)]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            total += sum(p[c] * math.log(p[c] / q[c]) for c in range(7))
        assert distill.kd_loss(zs, zt, T).item() == pytest.approx(T * T * total / 5, rel=1e-5)
    cfg = tt.Config(model="micro", img_size=16, patch_size=8, label_smoothing=0.1)
    torch.manual_seed(0)
    model = tt.build_model(cfg, 7, 0).eval()  # no stochastic depth: two forwards agree
    images, y = torch.randn(5, 3, 16, 16, generator=g), tt.mix(torch.eye(7)[:5], 0.6)
    loss, loss_cls, loss_kd, w = distill.kd_objective(3.0, 2.5)(
        model, images, y, zt, 0.5, cfg, contextlib.nullcontext())
    logits = model.vit(images)
    ce = F.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(loss_cls, ce)
    torch.testing.assert_close(loss_kd, distill.kd_loss(logits, zt, 3.0))
    torch.testing.assert_close(loss, ce + 2.5 * loss_kd)
    assert w.item() == 1


def test_the_fused_logits_follow_the_formula():
    """kd gives z_T, scaled-teacher a z_T, richkd a z_T + (1 - a) s (lam c_i + (1 - lam)
    c_partner(i)) with c the cached cosines of the batch's samples, the partner the flipped
    batch (CutMix's), s CLIP's logit scale (or 1: RichKD's raw cosines). A source identifies
    its settings."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).eval().requires_grad_(False)
    cos = torch.rand(20, 5) * 2 - 1
    index, images, lam = torch.tensor([3, 7, 0, 12]), torch.randn(4, 3, 4, 4), 0.3
    z = teacher(images)
    kd = dict(teacher="t", alpha=1.0, clip=None)
    torch.testing.assert_close(distill.Distilled(teacher, kd)(index, None, images, lam), z)
    scaled = dict(kd, alpha=0.7)
    torch.testing.assert_close(distill.Distilled(teacher, scaled)(index, None, images, lam),
                               0.7 * z)
    partner = index.flip(0)
    for s in (50.0, 1.0):
        rich = dict(scaled, clip="c", scaled=s != 1)
        fused = distill.Distilled(teacher, rich, cos, s)(index, None, images, lam)
        for i in range(4):
            mixed = lam * s * cos[index[i]] + (1 - lam) * s * cos[partner[i]]
            torch.testing.assert_close(fused[i], 0.7 * z[i] + 0.3 * mixed)
    shas = {distill.Distilled(teacher, x).sha256 for x in (kd, scaled, dict(kd, T=4))}
    assert len(shas) == 3 and distill.Distilled.dim == 0


def test_clip_zero_shot_logits_against_a_direct_computation(clip, folder, tmp_path, monkeypatch):
    """CLIP's logits of every training image, un-augmented, through CLIP's own processor:
    cos_ic = normalize(image(x_i)) . normalize(mean_p normalize(text(prompt_p(c)))), computed
    here one image and one prompt at a time (no padding), with RichKD's 12 prompts; the logit
    scale is CLIP's exp(s). The cache is computed once: the second call loads no CLIP."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    assert len(distill.PROMPTS) == 12 and distill.PROMPTS[:2] == ("a photo of a {}",
                                                                  "a blurry photo of a {}")
    root = folder[0]
    dataset, keys, classes = tt.image_split(root, "", "train")
    cache = distill.clip_cache(str(tmp_path), clip, keys, torch.tensor(dataset.targets), classes)
    cos, scale = distill.zero_shot(clip, dataset, classes, cache, CPU)
    model = CLIPModel.from_pretrained(clip).eval()
    tok, proc = AutoTokenizer.from_pretrained(clip), AutoImageProcessor.from_pretrained(clip)
    with torch.no_grad():
        e = []
        for c in classes:
            prompts = [model.get_text_features(**tok(p.format(c), return_tensors="pt"))
                       .pooler_output[0] for p in distill.PROMPTS]
            mean = sum(p / p.norm() for p in prompts) / len(prompts)
            e.append(mean / mean.norm())
        for i in range(0, len(dataset), 37):
            pixels = proc(images=dataset[i][0], return_tensors="pt")["pixel_values"]
            assert pixels.shape[-2:] == (32, 32)
            x = model.get_image_features(pixel_values=pixels).pooler_output[0]
            for c in range(3):
                assert cos[i, c].item() == pytest.approx(float(x @ e[c] / x.norm()), abs=1e-5)
        assert float(scale) == pytest.approx(model.logit_scale.exp().item())
    assert cos.shape == (192, 3) and cos.abs().max() <= 1

    def no_clip(*a, **k):
        raise AssertionError("the cache was computed again")
    monkeypatch.setattr(CLIPModel, "from_pretrained", no_clip)
    again, _ = distill.zero_shot(clip, dataset, classes, cache, CPU)
    assert torch.equal(again, cos)


# ----------------------------------------------------------------------------
# in a training run

def test_the_teacher_is_frozen_in_eval_mode_and_fed_the_mixed_batch(teachers, clip, folder,
                                                                     tmp_path, monkeypatch):
    """In a run with 3-Augment, CutMix and stochastic depth: the (Hugging Face) teacher is in
    eval mode at every call, gets no gradient and ends with its weights unchanged; what it is
    fed is bit for bit the batch the student's loss gets; every target is a z_T of the reference
    model on that batch + (1 - a) s times the cached CLIP logits mixed with the batch's CutMix
    lambda and partner."""
    from transformers import ViTForImageClassification
    dataset, keys, classes = tt.image_split(folder[0], "", "train")
    teacher = distill.load_teacher(teachers["hf"], classes, 16, CPU)
    before = distill.digest(teacher)
    cache = distill.clip_cache(str(tmp_path), clip, keys, torch.tensor(dataset.targets), classes)
    cos, scale = distill.zero_shot(clip, dataset, classes, cache, CPU)
    settings = dict(teacher=teachers["hf"], alpha=0.7, clip=clip, scaled=True)
    source = distill.Distilled(teacher, settings, cos, float(scale))
    fed, calls, steps = [], [], []
    teacher.register_forward_pre_hook(lambda m, a: fed.append(
        (a[0].clone(), any(x.training for x in m.modules()))))
    real_call, real_objective = distill.Distilled.__call__, distill.kd_objective(3.0, 3.0)

    def spy_call(self, index, labels, images, lam):
        calls.append((index.clone(), lam))
        return real_call(self, index, labels, images, lam)

    def objective(model, images, y, t, *a):
        steps.append((images.clone(), t.clone()))
        return real_objective(model, images, y, t, *a)
    monkeypatch.setattr(distill.Distilled, "__call__", spy_call)
    cfg, given = tt.parse_config(base_args(folder, tmp_path, "--epochs", "1", "--text", "",
                                           "--name", "r", *RANDOM))
    tt.train(cfg, given, targets=source, objective=objective)
    monkeypatch.undo()
    assert len(fed) == len(steps) == len(calls) == 6
    assert not any(training for _, training in fed)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert distill.digest(teacher) == before
    assert any(lam < 1 for _, lam in calls)  # CutMix did mix
    reference = ViTForImageClassification.from_pretrained(teachers["hf"]).eval()
    for (pixels, _), (images, t), (index, lam) in zip(fed, steps, calls):
        assert torch.equal(pixels, images)
        c = float(scale) * cos[index]  # shape = [B, C]
        with torch.no_grad():
            expected = 0.7 * reference(pixel_values=images).logits + 0.3 * (
                lam * c + (1 - lam) * c.flip(0))
        torch.testing.assert_close(t, expected)
    ckpt = checkpoint(tmp_path / "r")
    assert ckpt["text_sha256"] == source.sha256 and ckpt["text_dim"] == 0
    assert not any(k.startswith("text_head") for k in ckpt["model"])
    assert metrics(tmp_path / "r")[0]["loss_txt"] > 0


def test_the_arms_are_paired_and_summarised(teachers, clip, folder, tmp_path, monkeypatch,
                                            capsys):
    """distill.py with --text and every arm, one seed: the five arms start from the same ViT
    weights, draw the same samples with the same augmentation seeds, and their students get
    the same first batch (CutMix, 3-Augment) and give the same first logits (the teacher draws
    nothing from the RNG of the student's drop-path masks); the distillation arms reach run_arm
    with the KD objective and their settings (a = 1 for kd; RichKD's scaled CLIP); the table
    has every arm, its seconds per epoch and its cost against the baseline."""
    starts, items, firsts, arm_calls = [], [], [], []
    build, getitem, forward = tt.build_model, tt.Samples.__getitem__, tt.TextTeacher.forward
    run_arm = compare.run_arm

    def spy_build(*a, **k):
        model = build(*a, **k)
        starts.append({k: v.clone() for k, v in model.vit.state_dict().items()})
        items.append([])
        firsts.append(None)
        return model

    def spy_getitem(self, item):
        if isinstance(item, tuple):  # training samples come with their augmentation seed
            items[-1].append(item)
        return getitem(self, item)

    def spy_forward(self, x):
        out = forward(self, x)
        if firsts[-1] is None:  # the batch, and the logits: the same drop-path masks too
            firsts[-1] = (x.clone(), out[0].detach().clone())
        return out

    def spy_run_arm(cfg, folder, targets=None, on_epoch=None, objective=None, settings=None):
        arm_calls.append((os.path.basename(folder), objective, settings))
        return run_arm(cfg, folder, targets, on_epoch, objective, settings)
    monkeypatch.setattr(tt, "build_model", spy_build)
    monkeypatch.setattr(tt.Samples, "__getitem__", spy_getitem)
    monkeypatch.setattr(tt.TextTeacher, "forward", spy_forward)
    monkeypatch.setattr(compare, "run_arm", spy_run_arm)
    argv = base_args(folder, tmp_path, "--epochs", "1", "--name", "d", *RANDOM) + [
        "--teacher", teachers["ours"], "--clip", clip]
    summary = distill.main(argv)
    monkeypatch.undo()
    arms = ["baseline", "textteacher", "kd", "richkd", "scaled-teacher"]
    assert [a for a, _, _ in arm_calls] == [f"seed0-{a}" for a in arms] and len(starts) == 5
    for i in range(1, 5):
        assert_same_weights(starts[0], starts[i])
        assert items[i] == items[0] and len(items[0]) == 192
        assert all(torch.equal(a, b) for a, b in zip(firsts[i], firsts[0]))
    settings = {a[6:]: s for a, objective, s in arm_calls if objective is not None}
    assert list(settings) == ["kd", "richkd", "scaled-teacher"]
    assert settings["kd"]["alpha"] == 1 and settings["scaled-teacher"]["alpha"] == 0.7
    assert settings["richkd"]["scaled"] is True and settings["richkd"]["clip"] == clip
    assert all(s["T"] == 3 and s["beta"] == 3 for s in settings.values())
    with open(tmp_path / "d" / "distill.json") as f:
        saved = json.load(f)
    assert saved["arms"] == arms and list(saved["distill"]) == arms
    for a in arms:
        times = metrics(tmp_path / "d" / f"seed0-{a}")[0]["epoch_time"]
        assert saved["distill"][a]["seconds_per_epoch"] == pytest.approx(times)
        assert saved["distill"][a]["final"][0] == summary[a]["final"][0]
    assert saved["distill"]["baseline"]["cost"] == 1
    rows = capsys.readouterr().out.strip().splitlines()[-len(arms) - 1:]
    assert "s/epoch" in rows[0] and [r.split()[0] for r in rows[1:]] == arms


# ----------------------------------------------------------------------------
# bad input: one line, nothing written

def fails(capsys, argv):
    """distill.main in this process: exit code 2 and one line on stderr, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        distill.main([str(a) for a in argv])
    assert e.value.code == 2
    return one_line(capsys.readouterr().err)


@pytest.mark.parametrize("make, flags, message", [
    (lambda p: export_teacher(p, classes=["x", "y", "z"]), [], "has the classes x, y, z"),
    (lambda p: export_teacher(p, img_size=32), [], "takes 32 px images, the student 16"),
    (lambda p: hf_teacher(p, names=["a", "b", "c", "d"]), [], "has 4 classes"),
    (lambda p: hf_teacher(p, names=["c", "b", "a"]), [], "in this order"),
    (lambda p: hf_teacher(p, image_size=32), [], "takes 32 px images"),
    (lambda p: str(p / "no-such-model"), [], "argument --teacher: no file or folder "),
    (lambda p: "someone/no-such-model", [], "is not available offline"),
    (None, ["--clip", "openai/clip-vit-large-patch14"], "CLIP 'openai/clip-vit-large-patch14'"
     " is not available offline"),
    (None, ["--clip", ""], "--arms richkd needs --clip"),
    (None, ["--arms", "kd,dkd"], "argument --arms: dkd: choose among kd,richkd,scaled-teacher"),
    (None, ["--temperature", "0"], "argument --temperature: must be a number in (0, 100], got 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(teachers, clip, folder, tmp_path, capsys,
                                                  make, flags, message):
    teacher = make(tmp_path / "teacher") if make else teachers["ours"]
    argv = base_args(folder, tmp_path / "runs", "--epochs", "1", "--name", "bad") + [
        "--teacher", teacher, "--clip", clip, *flags]
    before = snapshot(tmp_path)
    assert message in fails(capsys, argv)
    assert snapshot(tmp_path) == before


def test_a_distillation_stopped_by_ctrl_c_and_by_kill_continues_to_the_uninterrupted_results(
        teachers, folder, tmp_path, monkeypatch, capsys):
    """Ctrl-C (SIGINT) in the baseline arm's second epoch: one line, exit 130, its advice; the
    same command again continues the baseline and is stopped by SIGTERM (kill) in the KD arm's
    first epoch: one line, exit 143, the same advice; followed again, both arms end with the
    logs of a distillation never stopped."""
    import signal
    from common import CHEAP, signal_at_step, untimed
    args = base_args(folder, tmp_path, *CHEAP)
    i = args.index("--text")
    argv = [str(a) for a in args[:i] + args[i + 2:] + ["--teacher", teachers["ours"], "--arms",
                                                        "kd", "--batch-size", "64"]]
    distill.main(argv + ["--name", "whole"])
    signal_at_step(monkeypatch, 3 + 2, signal.SIGINT)  # 3 steps per epoch: epoch 2, step 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        distill.main(argv + ["--name", "cut"])
    assert e.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted; run the same command again to continue"]
    monkeypatch.undo()
    assert checkpoint(tmp_path / "cut" / "seed0-baseline")["epoch"] == 1
    assert not (tmp_path / "cut" / "seed0-kd").exists()
    with monkeypatch.context() as mp:  # SIGTERM in the KD arm's second step (its objective
        signal_at_step(mp, 2, signal.SIGTERM, where=(distill, "kd_loss"))  # calls kd_loss)
        with pytest.raises(SystemExit) as e:
            distill.main(argv + ["--name", "cut"])  # the advice, followed
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted by SIGTERM; run the same command again to continue"]
    assert len(metrics(tmp_path / "cut" / "seed0-baseline")) == 2
    assert not (tmp_path / "cut" / "seed0-kd" / "checkpoint.pt").exists()
    distill.main(argv + ["--name", "cut"])  # and followed again
    for arm in ("seed0-baseline", "seed0-kd"):
        assert untimed(tmp_path / "cut" / arm) == untimed(tmp_path / "whole" / arm), arm

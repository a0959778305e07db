"""The method's tests: what textteacher.py must do, in the order of the sections of METHOD.md
(Backbone, Text head, Alignment loss, Text targets, CutMix and the targets, Weighting, Recipe,
Label-noise experiment, Pitfalls of the official code). Each test's docstring quotes the
sentence of METHOD.md it checks; the online vision teacher is a tool, tested with the others in
tests/test_tools.py. Then one group, the training invariants: accumulation equals one big batch,
two ranks equal one, an interrupted run resumes bit for bit, a NaN stops the run.

CPU, offline, in about a minute: python -m pytest -q test_textteacher.py tests
"""
import json
import math
import os
import signal
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tests"))
from common import (CHEAP, RANDOM, assert_same_weights, base_args, checkpoint,  # noqa: E402
                    crash_in_epoch, ended, fails, folder, metrics, one_line,
                    poison_at_call, run, sensitive, start_paused, untimed, wait_for_pause,
                    write_embeddings, write_folder)
import textteacher as tt  # noqa: E402

assert folder  # a fixture, used by name
CPU = torch.device("cpu")


def tiny_cfg(**changes):
    return tt.Config(**{**dict(model="micro", img_size=16, patch_size=8, drop_path=0.0), **changes})


def batch(n=6, classes=10, dim=12, seed=0):
    """Images, soft labels (one-hot) and text targets of a synthetic micro-batch."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 16, 16, generator=g), torch.eye(classes)[torch.arange(n) % classes],
            torch.randn(n, dim, generator=g))


# ----------------------------------------------------------------------------
# One run watched at every seam, which several sections below read

@pytest.fixture(scope="module")
def spied(folder, tmp_path_factory):
    """One run with text, 3-Augment, CutMix, stochastic depth and LAMB (3 epochs of 3 steps of
    64 images), every seam of the loop watched: the target source's calls, step_losses' inputs,
    the text head's forward calls, evaluate's model, and the learning rate of every step."""
    out = tmp_path_factory.mktemp("spied")
    argv = base_args(folder, out, "--epochs", "3", "--batch-size", "64", "--drop-path", "0.1",
                     "--name", "s")
    seen = dict(targets=[], steps=[], head_calls=[], evaluate=[], lr=[], argv=argv)
    call, step, build = tt.TextTargets.__call__, tt.step_losses, tt.build_model
    evaluate, lamb_step = tt.evaluate, tt.Lamb.step

    def spy_call(self, index, labels, images, lam):
        t = call(self, index, labels, images, lam)
        seen["targets"].append((index.clone(), labels.clone(), images.clone(), lam, t.clone()))
        return t

    def spy_step(model, images, y, targets, lam, *a, **k):
        seen["steps"].append((images.clone(), y.clone(), targets, lam))
        return step(model, images, y, targets, lam, *a, **k)

    def spy_build(*a, **k):
        model = build(*a, **k)
        model.text_head.register_forward_hook(lambda m, i, o: seen["head_calls"].append(m.training))
        return model

    def spy_evaluate(vit, *a, **k):
        seen["evaluate"].append((type(vit), len(seen["head_calls"])))
        return evaluate(vit, *a, **k)

    def spy_lamb(self):
        seen["lr"].append([g["lr"] for g in self.param_groups])
        return lamb_step(self)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tt.TextTargets, "__call__", spy_call)
        mp.setattr(tt, "step_losses", spy_step)
        mp.setattr(tt, "build_model", spy_build)
        mp.setattr(tt, "evaluate", spy_evaluate)
        mp.setattr(tt.Lamb, "step", spy_lamb)
        assert run(argv) == 0
    return seen, str(out / "s")


# ----------------------------------------------------------------------------
# Backbone

def test_vit_names_shapes_and_sizes():
    """"patch embedding (conv, stride = patch), a CLS token, a learned position embedding for
    the patch tokens only (no position embedding on the CLS token), pre-norm transformer blocks
    with qkv bias, LayerScale (init 1e-4) on both residual branches, ... no dropout, LayerNorm
    eps 1e-6" and "Sizes (width/depth/heads): Ti 192/12/3, S 384/12/6, B 768/12/12, L
    1024/24/16; MLP ratio 4". The parameter names are timm's, so its models load them."""
    vit = tt.ViT(num_classes=7, img_size=32, patch_size=8, width=64, depth=2, heads=4)
    x = torch.randn(3, 3, 32, 32)
    assert vit.forward_features(x).shape == (3, 64) and vit(x).shape == (3, 7)
    assert vit.pos_embed.shape == (1, 16, 64)  # 16 patches, no slot for the CLS token
    conv = vit.patch_embed.proj
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride == (8, 8)
    names = set(vit.state_dict())
    for n in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.norm1.weight",
              "blocks.1.attn.qkv.bias", "blocks.1.attn.proj.weight", "blocks.1.ls1.gamma",
              "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight",
              "blocks.1.ls2.gamma", "norm.weight", "head.weight"]:
        assert n in names, n
    for block in vit.blocks:
        assert torch.all(block.ls1.gamma == 1e-4) and torch.all(block.ls2.gamma == 1e-4)
        assert block.mlp.fc1.out_features == 4 * 64
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.eps == 1e-6 for m in norms)
    assert not any(isinstance(m, nn.Dropout) for m in vit.modules())
    assert {k: tt.MODEL_SIZES[k] for k in ("tiny", "small", "base", "large")} == {
        "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def test_vit_forward_written_out_by_hand():
    """"pre-norm transformer blocks with qkv bias, LayerScale ... on both residual branches, ...
    a final LayerNorm, ... and a linear classifier on the post-norm CLS token", and no position
    embedding on the CLS token: the forward pass computed here from the parameters alone, with
    a softmax attention written out head by head. Every parameter is redrawn, so a missing
    LayerScale, a norm in the wrong place or a position added to the CLS token shows."""
    torch.manual_seed(0)
    vit = tt.ViT(num_classes=5, img_size=16, patch_size=8, width=32, depth=2, heads=4).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 3, 16, 16)

    def norm(h, m):
        return F.layer_norm(h, (h.shape[-1],), m.weight, m.bias, 1e-6)
    # the 2 x 2 patches in row-major order, each flattened as (channel, row, column)
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(2, 4, 192)
    conv = vit.patch_embed.proj
    tokens = patches @ conv.weight.reshape(32, -1).T + conv.bias + vit.pos_embed[0]
    h = torch.cat([vit.cls_token.expand(2, 1, 32), tokens], 1)  # [B, 5, 32]
    for block in vit.blocks:
        qkv = norm(h, block.norm1) @ block.attn.qkv.weight.T + block.attn.qkv.bias  # [B, 5, 96]
        q, k, v = qkv.split(32, -1)
        heads = []
        for i in range(4):
            s = slice(8 * i, 8 * i + 8)
            weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(8), -1)
            heads.append(weights @ v[..., s])
        attn = torch.cat(heads, -1) @ block.attn.proj.weight.T + block.attn.proj.bias
        h = h + block.ls1.gamma * attn
        hidden = F.gelu(norm(h, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
        h = h + block.ls2.gamma * (hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)
    feat = norm(h, vit.norm)[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), feat, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vit(x), feat @ vit.head.weight.T + vit.head.bias,
                                   rtol=1e-4, atol=1e-5)


def test_vit_matches_timm_when_installed():
    """"ViT trained from scratch, DeiT-III style": timm's VisionTransformer built from
    timm_kwargs loads our weights by name, strictly, and gives the same logits."""
    timm = pytest.importorskip("timm")
    args = tt.model_args(tiny_cfg(img_size=32), 5)
    vit = tt.ViT(**args).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    ref = timm.models.vision_transformer.VisionTransformer(**tt.timm_kwargs(args)).eval()
    ref.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), vit(x), rtol=1e-4, atol=1e-5)


def test_initialisation_is_timms():
    """"timm's initialisation (truncated normal std 0.02 for linear weights and the position
    embedding, the CLS token normal with std 1e-6)". Measured on a ViT-B-wide model: the CLS
    token's spread is 1e-6 (not trunc-normal 0.02, not zero), biases zero, norms identity, the
    patch convolution PyTorch's default (uniform within 1 / sqrt(fan_in))."""
    torch.manual_seed(0)
    vit = tt.ViT(num_classes=10, img_size=32, patch_size=4, width=768, depth=1, heads=12)
    cls = vit.cls_token.detach().flatten()
    assert abs(cls.std().item() / 1e-6 - 1) < 0.15 and 0 < cls.abs().max() < 1e-5
    assert abs(vit.pos_embed.std().item() / 0.02 - 1) < 0.05
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            assert abs(m.weight.std().item() / 0.02 - 1) < 0.05, name
            assert torch.all(m.bias == 0), name
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    bound = 1 / math.sqrt(3 * 4 * 4)
    w = vit.patch_embed.proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound


def test_stochastic_depth_is_linear_in_depth():
    """"stochastic depth 0.05 (linearly increasing with depth)": block i of D drops its
    branches with rate 0.05 i / (D - 1), 0 in the first; a dropped branch is dropped for whole
    samples and the kept ones are scaled by 1 / (1 - p); nothing is dropped in evaluation."""
    assert tt.Config().drop_path == 0.05
    vit = tt.ViT(num_classes=10, img_size=32, patch_size=16, width=32, depth=12, heads=2,
                 drop_path=0.05)
    for i, block in enumerate(vit.blocks):
        assert block.drop_path1.p == block.drop_path2.p == pytest.approx(0.05 * i / 11), i
    model = tt.build_model(tiny_cfg(drop_path=0.5), 3, 0)  # build_model passes --drop-path on
    last = model.vit.blocks[-1].drop_path1
    assert last.p == 0.5
    torch.manual_seed(0)
    out = last.train()(torch.ones(2000, 3, 4)).flatten(1)
    kept = out[:, 0] > 0
    assert torch.all(out[kept] == 2) and torch.all(out[~kept] == 0)  # whole samples, rescaled
    assert 0.45 < kept.float().mean() < 0.55
    x = torch.randn(5, 3, 4)
    assert torch.equal(last.eval()(x), x)


# ----------------------------------------------------------------------------
# Text head

def test_text_head_reads_the_classifiers_feature():
    """"One `Linear(width -> text_dim)` with bias and PyTorch's default initialisation. Its
    input is the same feature the classifier reads: the CLS token after the final LayerNorm."
    The head is drawn exactly as nn.Linear draws itself (timm's init does not touch it), and it
    lives outside the ViT."""
    torch.manual_seed(0)
    vit = tt.ViT(num_classes=4, img_size=16, patch_size=8, width=64, depth=1, heads=2)
    rng = torch.get_rng_state()
    model = tt.TextTeacher(vit, text_dim=10)
    torch.set_rng_state(rng)
    reference = nn.Linear(64, 10)
    head = model.text_head
    assert isinstance(head, nn.Linear) and head.bias is not None
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)
    x = torch.randn(3, 3, 16, 16)
    logits, z, feat = model(x)
    assert torch.equal(feat, vit.forward_features(x)) and torch.equal(logits, vit(x))
    assert torch.equal(z, head(feat)) and z.shape == (3, 10)
    assert not any("text" in k for k in vit.state_dict())


def test_export_drops_the_text_head_and_reproduces_the_logits(spied):
    """"It is used only for the auxiliary loss, never in the inference forward pass, and is
    removed at export." A run trained with a text head exports a plain ViT (timm's names and
    arguments) that gives the trained model's logits."""
    from safetensors.torch import load_file
    _, run_dir = spied
    ckpt = checkpoint(run_dir)
    assert any(k.startswith("text_head") for k in ckpt["model"])  # trained with a text head...
    weights = load_file(os.path.join(run_dir, "export", "model.safetensors"))
    assert not any("text" in k for k in weights)  # ...exported without it
    with open(os.path.join(run_dir, "export", "config.json")) as f:
        config = json.load(f)
    vit = tt.ViT(**config["textteacher"]["model_args"]).eval()
    vit.load_state_dict(weights, strict=True)
    trained = tt.TextTeacher(tt.ViT(**ckpt["model_args"]), ckpt["text_dim"]).eval()
    trained.load_state_dict(ckpt["model"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit(x), trained(x)[0])
    # timm's own format: what timm.create_model("local-dir:EXPORT") reads
    assert config["model_args"] == tt.timm_kwargs(config["textteacher"]["model_args"])
    assert config["model_args"]["no_embed_class"] and config["label_names"] == ["a", "b", "c"]
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]


def test_a_frozen_text_head_keeps_its_init():
    """"Option: a frozen head (its weights fixed at their random init)." The optimiser never
    holds it, so its weights stay put through training steps, while its gradient still
    reaches the backbone."""
    cfg = tiny_cfg(freeze_text_head=True)
    torch.manual_seed(0)
    model = tt.build_model(cfg, 10, 12)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = tt.build_optimizer(cfg, model, CPU)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in model.text_head.parameters())
    images, y, t = batch()
    _, _, loss_txt, _ = tt.step_losses(model, images, y, t, 0.5, cfg)
    loss_txt.backward()
    assert model.vit.norm.weight.grad.abs().sum() > 0  # the text loss reaches the ViT
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        tt.step_losses(model, images, y, t, 0.5, cfg)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = model.state_dict()
    for k in ("text_head.weight", "text_head.bias"):
        assert torch.equal(state[k], init[k])
    assert not torch.equal(state["vit.head.weight"], init["vit.head.weight"])


# ----------------------------------------------------------------------------
# Alignment loss

def test_clip_loss_against_a_double_loop():
    """"logits = z @ t^T (raw dot products: no L2 normalisation, no temperature ...)
    L_txt = ( CE(logits, arange(B)) + CE(logits^T, arange(B)) ) / 2. The two terms differ: the
    first is a softmax over captions for each image, the second over images for each caption.
    No label smoothing in this loss.\""""
    torch.manual_seed(0)
    z, t = torch.randn(6, 5), torch.randn(6, 5)
    B = len(z)
    dot = [[sum(z[i, d] * t[j, d] for d in range(5)) for j in range(B)] for i in range(B)]
    image_to_text = sum(-dot[i][i] + torch.log(sum(torch.exp(dot[i][j]) for j in range(B)))
                        for i in range(B)) / B
    text_to_image = sum(-dot[j][j] + torch.log(sum(torch.exp(dot[i][j]) for i in range(B)))
                        for j in range(B)) / B
    torch.testing.assert_close(tt.clip_loss(z, t), (image_to_text + text_to_image) / 2,
                               rtol=1e-5, atol=1e-6)
    assert abs(image_to_text - text_to_image) > 1e-3  # a one-sided loss would fail the above
    assert not torch.isclose(tt.clip_loss(2 * z, t), tt.clip_loss(z, t))  # not normalised


def test_images_of_the_same_class_are_negatives():
    """"Images of the same class count as negatives." A batch of one class: the text loss of
    the step is the plain clip loss over all B - 1 other images, nothing masked."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = tt.build_model(cfg, 10, 12)
    images, _, t = batch()
    y = torch.eye(10)[[3] * 6]
    _, _, loss_txt, _ = tt.step_losses(model, images, y, t, 0.5, cfg)
    torch.testing.assert_close(loss_txt, tt.clip_loss(model(images)[1], t))


# ----------------------------------------------------------------------------
# Text targets

def test_text_targets_are_centred_rows_matched_by_key(tmp_path):
    """"per-dimension mean and std over all stored vectors are computed once; at training time
    the mean is subtracted" and "Class-level targets ... are a supported variant, looked up by
    the class." The mean is the file's (computed once over all vectors, like the paper's
    stats.npy), not the batch's; rows are matched to samples by key, whatever the file's order;
    a per-image target ignores the label, a class-level one follows it."""
    vectors = torch.randn(5, 4) * 3 + 2
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0])  # deliberately not the rows' mean
    path = write_embeddings(tmp_path / "e.pt", ["c", "a", "b", "x", "y"], vectors, mean=mean)
    targets = tt.TextTargets(path, ["a", "b", "c"], ["k0", "k1", "k2"])
    assert targets.dim == 4
    images = torch.zeros(2, 3, 16, 16)
    got = targets(torch.tensor([2, 0]), torch.tensor([0, 0]), images, 1.0)
    torch.testing.assert_close(got, vectors[[0, 1]] - mean)
    assert torch.equal(targets(torch.tensor([2, 0]), torch.tensor([1, 2]), images, 1.0), got)
    classes = write_embeddings(tmp_path / "c.pt", ["dog", "cat"], vectors[:2], level="class")
    per_class = tt.TextTargets(classes, ["0", "1", "2"], ["cat", "dog"])
    got = per_class(torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), torch.zeros(3, 3, 4, 4), 1.0)
    torch.testing.assert_close(got, vectors[[0, 1, 0]] - vectors[:2].mean(0))


def test_targets_follow_the_sample_not_its_augmentation(spied, folder):
    """"One caption per training image, produced once from the un-augmented image; crops,
    flips and colour changes never change the target." In a run with 3-Augment and CutMix, every
    target the loss received is the stored vector of its sample (mixed by CutMix's lambda),
    whatever the augmented images were; the same sample's images differ between epochs."""
    seen, _ = spied
    _, text, _ = folder
    emb = torch.load(text, weights_only=True)
    raw = emb["embeddings"] - emb["mean"]  # the file's keys are the training keys, in order
    first_image = {}
    for (index, labels, images, lam, t), (_, _, step_t, _) in zip(seen["targets"], seen["steps"]):
        torch.testing.assert_close(t, tt.mix(raw[index], lam))
        assert torch.equal(step_t, t)  # the loss got these very targets
        for row, i in enumerate(index.tolist()):
            first_image.setdefault(i, []).append(images[row])
    again = [v for v in first_image.values() if len(v) > 1]
    assert again and all(not torch.equal(v[0], v[1]) for v in again)


def test_validation_uses_no_text(spied):
    """"Validation uses no text." Evaluation gets the plain ViT: the target source is called
    once per training micro-batch and never more, the text head runs only in training mode,
    once per training micro-batch; the validation images have no embeddings at all."""
    seen, run_dir = spied
    steps = len(seen["steps"])
    assert steps == 3 * 3  # 3 epochs of 3 steps
    assert len(seen["targets"]) == steps
    assert len(seen["head_calls"]) == steps and all(seen["head_calls"])
    assert [kind for kind, _ in seen["evaluate"]] == [tt.ViT] * 3
    assert [calls for _, calls in seen["evaluate"]] == [3, 6, 9]  # no head call in between
    assert all(r["top1"] >= 0 for r in metrics(run_dir))


def test_an_image_folder_is_keyed_by_file_name(tmp_path):
    """"one member per training image named `<image filename>.emb.npy` (e.g.
    `n01440764_10026.JPEG.emb.npy`)": a sample's key in caption and embeddings files is its
    file name, classes are the sorted sub-folders."""
    root = str(tmp_path / "pets")
    keys = write_folder(root, ("eel", "cat", "dog"), train=3, val=1, ext="JPEG")
    dataset, got_keys, classes = tt.image_split(root, "", "train")
    assert classes == ["cat", "dog", "eel"] and got_keys == sorted(keys) and len(dataset) == 9
    assert got_keys[0] == "cat_train_000.JPEG"
    image, label = dataset[4]
    assert label == 1 and image.size == (20, 16)
    val, val_keys, _ = tt.image_split(root, "", "val")
    assert val_keys == ["cat_val_000.JPEG", "dog_val_000.JPEG", "eel_val_000.JPEG"]


def write_fake_cifar100(root, n_train=40, n_test=12):
    """torchvision's CIFAR-100 format: pickled dicts in cifar-100-python/."""
    import pickle

    import numpy as np
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data[split] = dict(data=rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                           fine_labels=[int(x) for x in rng.integers(0, 100, n)],
                           coarse_labels=[int(x) for x in rng.integers(0, 20, n)],
                           filenames=[f"{split}_{i}.png" for i in range(n)])
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(data[split], f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(dict(fine_label_names=[f"class_{i}" for i in range(100)],
                         coarse_label_names=[f"super_{i}" for i in range(20)]), f)
    return data


def test_cifar100_is_read_through_torchvision_and_keyed_by_index(tmp_path, monkeypatch):
    """"One caption per training image": a CIFAR-100 image has no file name, so its key is its
    index in torchvision's training set; labels and pixels are torchvision's."""
    import torchvision
    data = write_fake_cifar100(str(tmp_path))
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train, keys, classes = tt.image_split("cifar100", str(tmp_path), "train")
    val, val_keys, _ = tt.image_split("cifar100", str(tmp_path), "val")
    assert len(train) == 40 and len(val) == 12 and keys[:3] == ["0", "1", "2"]
    assert classes[7] == "class_7" and len(classes) == 100
    image, label = train[5]
    assert torch.equal(torch.from_numpy(__import__("numpy").asarray(image)).permute(2, 0, 1),
                       torch.from_numpy(data["train"]["data"][5].reshape(3, 32, 32)))
    assert label == data["train"]["fine_labels"][5]
    sample, label, index = tt.Samples(train, torch.tensor(train.targets), 32)[5]
    assert sample.dtype == torch.uint8 and sample.shape == (3, 32, 32) and index == 5


# ----------------------------------------------------------------------------
# CutMix and the targets

def test_cutmix_pastes_a_box_of_the_flipped_batch_with_its_area_as_lambda():
    """"CutMix (alpha 1.0, one lambda per batch, box-area-corrected lambda; partner = the batch
    flipped) mixes the text targets with the same lambda and partner as the labels: t_i <- lam
    * t_i + (1 - lam) * t_partner(i). The positive pair stays on the diagonal.\""""
    assert tt.Config().cutmix == 1.0
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).clone()  # image i is all i
    partner = torch.tensor([3, 2, 1, 0])
    lams = []
    for seed in range(8):
        torch.manual_seed(seed)
        mixed, lam = tt.cutmix(images, 1.0)
        lams.append(lam)
        for i in range(4):
            pasted = mixed[i, 0] == partner[i]
            assert torch.all((mixed[i] == i) | (mixed[i] == partner[i]))
            assert lam == pytest.approx(1 - pasted.float().mean().item())  # the area, not Beta's
            rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
            if len(rows):  # a box: every pixel between its corners is pasted
                assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        torch.manual_seed(seed)
        assert torch.equal(tt.cutmix(images, 1.0)[0], mixed)  # a function of torch's seed
    assert len(set(lams)) > 4 and any(0 < lam < 1 for lam in lams)
    t = torch.randn(4, 8)
    lam = lams[0]
    mixed_t = tt.mix(t, lam)
    for i in range(4):
        torch.testing.assert_close(mixed_t[i], lam * t[i] + (1 - lam) * t[partner[i]])
    assert torch.equal(tt.mix(t, 1.0), t)


def test_the_loop_mixes_labels_and_targets_with_one_lambda_and_partner(spied):
    """"mixes the text targets with the same lambda and partner as the labels": in a training
    run, every micro-batch's soft labels and targets are mixed with the lambda CutMix drew for
    its images, and some lambdas are below 1."""
    seen, _ = spied
    lams = []
    for (index, labels, _, lam, t), (_, y, _, _) in zip(seen["targets"], seen["steps"]):
        torch.testing.assert_close(y, tt.mix(F.one_hot(labels, 3).float(), lam))
        lams.append(lam)
    assert any(lam < 1 for lam in lams)


# ----------------------------------------------------------------------------
# Weighting

def test_adaptive_weight_against_direct_gradients():
    """"w = (||dL_cls/dF|| + 1e-7) / (||dL_txt/dF|| + 1e-7), where F is the post-norm backbone
    output ..., Frobenius norms over the batch, ... detached (a number, not part of the
    graph)": the gradients taken here through a leaf copy of F, one loss at a time."""
    torch.manual_seed(0)
    model = tt.TextTeacher(tt.ViT(4, 16, 8, 32, 1, 2), text_dim=6)
    x, y, t = torch.randn(5, 3, 16, 16), torch.randint(0, 4, (5,)), torch.randn(5, 6)
    logits, z, feat = model(x)
    loss_cls, loss_txt = F.cross_entropy(logits, y), tt.clip_loss(z, t)
    w = tt.adaptive_weight(loss_cls, loss_txt, feat)
    assert not w.requires_grad
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient accumulated
    leaf = feat.detach().requires_grad_(True)
    F.cross_entropy(model.vit.head(leaf), y).backward()
    g_cls = leaf.grad.clone()
    leaf.grad = None
    tt.clip_loss(model.text_head(leaf), t).backward()
    torch.testing.assert_close(w, (g_cls.norm() + 1e-7) / (leaf.grad.norm() + 1e-7))


def test_step_losses_is_the_objective():
    """"L = lam_e * w * L_txt + (1 - lam_e) * L_cls ... Note the classification loss is
    down-weighted by (1 - lam)", w "recomputed every step, detached", and "It is skipped when
    lam_e = 0". The gradient of L is that combination with w a constant; without text (the
    baseline) L is L_cls alone; with --no-adaptive-weight, w = 1."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = tt.build_model(cfg, 10, 12)
    images, y, t = batch()
    loss, loss_cls, loss_txt, w = tt.step_losses(model, images, y, t, 0.3, cfg)
    torch.testing.assert_close(loss, 0.3 * w * loss_txt + 0.7 * loss_cls)
    logits, z, feat = model(images)
    torch.testing.assert_close(loss_txt, tt.clip_loss(z, t))
    torch.testing.assert_close(w, tt.adaptive_weight(
        F.cross_entropy(logits, y, label_smoothing=0.1), tt.clip_loss(z, t), feat))
    # the gradient treats w as a number: d L = 0.3 w dL_txt + 0.7 dL_cls
    params = [p for p in model.parameters()]
    grad = torch.autograd.grad(loss, params, retain_graph=True)
    g_txt = torch.autograd.grad(loss_txt, params, retain_graph=True, allow_unused=True)
    g_cls = torch.autograd.grad(loss_cls, params, allow_unused=True)
    for g, a, b in zip(grad, g_txt, g_cls):
        a, b = (torch.zeros_like(g) if x is None else x for x in (a, b))
        torch.testing.assert_close(g, 0.3 * w * a + 0.7 * b, rtol=1e-4, atol=1e-7)
    # lam_e = 0: no weight computed, w = 1, L = L_cls (the head still in the graph, weight 0)
    original = tt.adaptive_weight
    try:
        tt.adaptive_weight = lambda *a: pytest.fail("adaptive_weight called at lam_e = 0")
        loss, loss_cls, _, w = tt.step_losses(model, images, y, t, 0.0, cfg)
    finally:
        tt.adaptive_weight = original
    assert w == 1 and torch.equal(loss, loss_cls)
    _, _, _, w = tt.step_losses(model, images, y, t, 0.5, tiny_cfg(adaptive_weight=False))
    assert w == 1 and tt.Config().adaptive_weight is True
    base = tt.build_model(cfg, 10, 0)
    loss, loss_cls, loss_txt, w = tt.step_losses(base, images, y, None, 0.3, cfg)
    assert loss is loss_cls and loss_txt == 0 and w == 0


def test_with_the_adaptive_weight_both_losses_push_the_backbone_equally_hard():
    """"With lam = 0.5 both losses then push the backbone equally hard": at F, the gradient of
    lam w L_txt has the norm of the gradient of (1 - lam) L_cls."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = tt.build_model(cfg, 10, 12)
    images, y, t = batch()
    logits, z, feat = model(images)
    loss_cls = F.cross_entropy(logits, y, label_smoothing=0.1)
    loss_txt = tt.clip_loss(z, t)
    w = tt.adaptive_weight(loss_cls, loss_txt, feat)
    g_txt, = torch.autograd.grad(0.5 * w * loss_txt, feat, retain_graph=True)
    g_cls, = torch.autograd.grad(0.5 * loss_cls, feat)
    assert g_txt.norm().item() == pytest.approx(g_cls.norm().item(), rel=1e-4)
    assert not 0.5 < w.item() < 2  # the raw gradients differ: the weight did something


def test_lambda_schedules():
    """"linear to 0 (lam*(E-e)/E), cosine (lam*cos(pi*e/(2E))), full cosine
    (lam/2*(1+cos(pi*e/E))), and jump-a-b-r: lam until epoch a, then linearly down to r*lam at
    epoch b, r*lam after ...; the official code keeps lam while epoch <= a, so a = b keeps lam at
    epoch a.\""""
    def values(name, epochs=100):
        cfg = tt.Config(text_loss_lambda=0.5, epochs=epochs, lambda_schedule=name)
        tt.check_config(cfg)
        return [tt.lambda_at(cfg, e) for e in range(epochs)]
    assert values("constant") == [0.5] * 100
    linear, cosine, full = values("linear"), values("cosine"), values("fullcosine")
    for e in (0, 13, 50, 99):
        assert linear[e] == pytest.approx(0.5 * (100 - e) / 100)
        assert cosine[e] == pytest.approx(0.5 * math.cos(math.pi * e / 200))
        assert full[e] == pytest.approx(0.25 * (1 + math.cos(math.pi * e / 100)))
    jump = values("jump-30-50-0")
    assert jump[30] == 0.5 and jump[31] == pytest.approx(0.475) and jump[40] == pytest.approx(0.25)
    assert jump[50] == 0 and jump[99] == 0
    assert values("jump-30-50-0.5")[99] == 0.25
    same = values("jump-3-3-0", epochs=8)  # a = b: lam at epoch a, off from the next
    assert same == [0.5] * 4 + [0.0] * 4
    for bad in ("jump-30", "jump-50-30-0", "step"):
        with pytest.raises(tt.UserError):
            tt.check_config(tt.Config(lambda_schedule=bad))


def test_lambda_zero_is_the_baseline_without_a_text_head(folder, tmp_path):
    """"lam = 0 is the baseline": with --text given and --text-loss-lambda 0 no text head is
    built, trained or saved, and no text loss is logged."""
    assert run(base_args(folder, tmp_path, *CHEAP, "--epochs", "1", "--text-loss-lambda", "0",
                         "--name", "b")) == 0
    ckpt = checkpoint(tmp_path / "b")
    assert ckpt["text_dim"] == 0 and not any("text" in k for k in ckpt["model"])
    (m,) = metrics(tmp_path / "b")
    assert m["loss_txt"] is None and m["w"] is None and m["lambda"] == 0


def test_a_few_epochs_lower_both_losses(folder, tmp_path):
    """"L = lam_e * w * L_txt + (1 - lam_e) * L_cls" with "lam ... 0.5": three epochs on
    images whose class and caption they predict lower both losses; the record of each epoch
    carries lam, w, the learning rate, and both the final and the best top-1 ("Report both
    the final and the best epoch")."""
    args = base_args(folder, tmp_path, *CHEAP, "--epochs", "3", "--warmup-epochs", "0",
                     "--name", "r")
    assert run(args) == 0
    m = metrics(tmp_path / "r")
    assert len(m) == 3 and all(r["lambda"] == 0.5 and r["w"] > 0 for r in m)
    assert m[-1]["loss_cls"] < m[0]["loss_cls"] - 0.05
    assert m[-1]["loss_txt"] < m[0]["loss_txt"] - 0.1
    cfg = tt.parse_config(args)[0]
    assert [r["lr"] for r in m] == [tt.lr_at(cfg, e) for e in range(3)]
    assert [r["best_top1"] for r in m] == [max(r["top1"] for r in m[:e + 1]) for e in range(3)]
    with open(tmp_path / "r" / "config.json") as f:
        config = json.load(f)
    assert config["text"] == folder[1] and config["batch_size"] == 32


# ----------------------------------------------------------------------------
# Recipe

def test_the_defaults_are_the_papers_recipe():
    """"LAMB, lr 3e-3, weight decay 0.02 ..., eps 1e-7, global batch 2048, 5 warm-up epochs
    from 1e-6 then cosine to 1e-5 ..., gradient clipping 1.0, 224 px, 100 epochs ...; CutMix
    1.0 ... Label smoothing 0.1", with the backbone's patch 16, LayerScale 1e-4 and stochastic
    depth 0.05, and lam 0.5: the defaults, and --data imagenet changes none of them."""
    expected = dict(optimizer="lamb", lr=3e-3, weight_decay=0.02, opt_eps=1e-7, batch_size=2048,
                    warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, clip_grad=1.0, img_size=224,
                    epochs=100, cutmix=1.0, label_smoothing=0.1, augment="3aug", patch_size=16,
                    layer_scale=1e-4, drop_path=0.05, text_loss_lambda=0.5,
                    lambda_schedule="constant", adaptive_weight=True, label_noise=0.0)
    for cfg in (tt.Config(), tt.parse_config([])[0], tt.parse_config(["--data", "imagenet"])[0]):
        assert {k: getattr(cfg, k) for k in expected} == expected


def test_lamb_against_its_formula():
    """"LAMB ... weight decay 0.02 (no decay on biases and norms), eps 1e-7": every tensor its
    own moments, bias correction and trust ratio ||p|| / ||u||: two matrices of very different
    norms, an all-zero matrix (ratio 1), a bias without decay (a plain Adam step) and a matrix
    without a gradient in the first step (untouched, and a step behind afterwards)."""
    torch.manual_seed(0)
    shapes = {"w": (4, 3), "big": (5, 2), "zero": (2, 2), "late": (3, 3), "b": (3,)}
    init = {"w": torch.randn(4, 3), "big": 100 * torch.randn(5, 2), "zero": torch.zeros(2, 2),
            "late": torch.randn(3, 3), "b": torch.randn(3)}
    params = {k: nn.Parameter(v.clone()) for k, v in init.items()}
    decay = ["w", "big", "zero", "late"]
    opt = tt.Lamb([dict(params=[params[k] for k in decay], weight_decay=0.1),
                   dict(params=[params["b"]], weight_decay=0.0)], lr=0.01, eps=1e-6)
    b1, b2, lr, eps = 0.9, 0.999, 0.01, 1e-6
    ref = {k: dict(p=init[k].clone(), m=torch.zeros(s), v=torch.zeros(s), t=0)
           for k, s in shapes.items()}
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
                u = (r["p"].norm() / u.norm() if r["p"].norm() > 0 else 1.0) * u
            r["p"] = r["p"] - lr * u
        opt.step()
        for k, p in params.items():
            torch.testing.assert_close(p.detach(), ref[k]["p"], msg=f"{k} after step {step}")
    assert opt.state[params["late"]]["step"] == 2 and opt.state[params["w"]]["step"] == 3


# DeiT III's learning rate of each of 100 epochs for lr 3e-3, as its main.py applies it: timm's
# CosineLRScheduler(t_initial=100, warmup_t=5, warmup_lr_init=1e-6, lr_min=1e-5) built before
# the first epoch (which therefore runs at warmup_lr_init) and stepped with step(epoch) at the
# end of every epoch, so that epoch e >= 1 runs at the schedule's value for e - 1. Printed from
# timm 1.0 (timm/scheduler/cosine_lr.py) by exactly that loop.
DEIT3_LR = [
    1e-06, 1e-06, 0.0006008, 0.0012006, 0.0018004,  # epochs 0-4
    0.0024002, 0.00298159406919, 0.00297351943984, 0.0029639955591, 0.00295303182589,  # 5-9
    0.00294063906009, 0.00292682949186, 0.00291161674959, 0.0028950158464, 0.0028770431654,
    0.00285771644344, 0.00283705475366, 0.00281507848667, 0.00279180933037, 0.00276727024863,
    0.00274148545854, 0.00271448040659, 0.0026862817435, 0.00265691729795, 0.0026264160491,
    0.002594808098, 0.00256212463787, 0.00252839792336, 0.00249366123866, 0.00245794886467,
    0.00242129604521, 0.00238373895218, 0.00234531464989, 0.00230606105849, 0.00226601691655,
    0.00222522174278, 0.00218371579711, 0.00214154004089, 0.0020987360965, 0.00205534620626,
    0.00201141319077, 0.00196698040659, 0.00192209170353, 0.00187679138131, 0.00183112414589,
    0.00178513506531, 0.00173886952524, 0.00169237318418, 0.00164569192841, 0.0015988718267,
    0.00155195908482, 0.001505, 0.00145804091518, 0.0014111281733, 0.00136430807159,  # 50-54
    0.00131762681582, 0.00127113047476, 0.00122486493469, 0.00117887585411, 0.00113320861869,
    0.00108790829647, 0.00104301959341, 0.000998586809233, 0.000954653793736, 0.000911263903501,
    0.00086845995911, 0.000826284202889, 0.000784778257218, 0.000743983083453, 0.000703938941506,
    0.000664685350111, 0.000626261047823, 0.000588703954789, 0.000552051135326, 0.000516338761341,
    0.000481602076637, 0.000447875362126, 0.000415191902005, 0.000383583950902, 0.00035308270205,
    0.000323718256498, 0.000295519593409, 0.00026851454146, 0.000242729751374, 0.000218190669629,
    0.000194921513334, 0.000172945246338, 0.000152283556563, 0.000132956834602, 0.000114984153597,
    9.83832504134e-05, 8.31705081387e-05, 6.9360939913e-05, 5.69681741127e-05, 4.60044409016e-05,
    3.64805601606e-05, 2.84059308103e-05, 2.17885215349e-05, 1.66348629184e-05, 1.29500409997e-05,
]


def test_the_learning_rate_per_epoch_is_deit3s():
    """"5 warm-up epochs from 1e-6 then cosine to 1e-5 (exactly as DeiT III and the official
    code run it: ... no warm-up prefix, so the cosine spans all epochs and the warm-up replaces
    its start; stepped once per epoch with `step(epoch)` at the end of each epoch, so epoch 0
    and epoch 1 both run at 1e-6 and epoch e >= 1 at the schedule's value for e - 1)"."""
    cfg = tt.Config()
    got = [tt.lr_at(cfg, e) for e in range(100)]
    assert got[0] == got[1] == 1e-6
    assert got == pytest.approx(DEIT3_LR, rel=1e-9, abs=0)


def test_the_deit3_table_is_timms_schedule():
    """The table above, against timm's CosineLRScheduler itself, stepped as DeiT III's main.py
    steps it (where timm is installed)."""
    pytest.importorskip("timm")
    from timm.scheduler.cosine_lr import CosineLRScheduler
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=3e-3)
    scheduler = CosineLRScheduler(optimizer, t_initial=100, warmup_t=5, warmup_lr_init=1e-6,
                                  lr_min=1e-5)
    timm_lr = []
    for epoch in range(100):
        timm_lr.append(optimizer.param_groups[0]["lr"])  # the epoch trains at this
        scheduler.step(epoch)  # at the end of the epoch
    assert timm_lr == pytest.approx(DEIT3_LR, rel=1e-9, abs=0)


def test_the_loop_trains_each_epoch_at_its_learning_rate(spied):
    """"stepped once per epoch": every optimiser step of an epoch uses lr_at of that epoch, in
    every parameter group, and the log says so."""
    seen, run_dir = spied
    cfg = tt.parse_config(seen["argv"])[0]
    expected = [tt.lr_at(cfg, e) for e in range(3)]
    assert len(set(expected)) == 2  # epochs 0 and 1 at warmup_lr, then the cosine
    assert seen["lr"] == [[expected[e]] * len(seen["lr"][0]) for e in range(3) for _ in range(3)]
    assert [r["lr"] for r in metrics(run_dir)] == expected


def test_no_weight_decay_on_tokens_layerscale_biases_and_norms():
    """"weight decay 0.02 (no decay on biases and norms)", and as in DeiT III none on the
    position embedding, the CLS token and the LayerScale gammas either; every weight matrix
    decays, the patch convolution and the text head included. Checked on the groups, and by a
    step with all gradients zero: only the decayed tensors move."""
    cfg = tiny_cfg()
    for optimizer in ("lamb", "adamw"):
        cfg.optimizer = optimizer
        torch.manual_seed(0)
        model = tt.build_model(cfg, 10, 12)
        opt = tt.build_optimizer(cfg, model, CPU)
        decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        plain = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        assert all(g["weight_decay"] in (0, cfg.weight_decay) for g in opt.param_groups)
        names = dict(model.named_parameters())
        assert decay | plain == {id(p) for p in names.values()} and not decay & plain
        for name, p in names.items():
            exempt = (name.endswith(("pos_embed", "cls_token", "gamma", "bias"))
                      or ".norm" in name or name.startswith("vit.norm"))
            assert (id(p) in plain) == exempt, name
        assert id(names["vit.patch_embed.proj.weight"]) in decay
        assert id(names["text_head.weight"]) in decay and id(names["vit.head.weight"]) in decay
        before = {k: v.detach().clone() for k, v in names.items()}
        for p in names.values():
            p.grad = torch.zeros_like(p)
        opt.step()
        for name, p in names.items():
            assert torch.equal(p, before[name]) == (id(p) in plain), name


def test_label_smoothing_is_applied_once():
    """"Label smoothing 0.1 (the official code applies it twice, effectively about 0.19: apply
    it once)": the classification loss of a step is the smoothed cross-entropy written out here,
    with the soft (CutMix) labels smoothed once."""
    cfg = tiny_cfg()
    logits = 3 * torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    images, y, _ = batch()
    y = 0.7 * y + 0.3 * y.flip(0)  # CutMix's soft labels
    _, loss_cls, _, _ = tt.step_losses(lambda x: (logits, None, None), images, y, None, 0.0, cfg)
    log_p = torch.log_softmax(logits, 1)
    once = -((0.9 * y + 0.1 / 10) * log_p).sum(1).mean()
    twice = -((0.9 * (0.9 * y + 0.1 / 10) + 0.1 / 10) * log_p).sum(1).mean()
    torch.testing.assert_close(loss_cls, once)
    assert abs(twice - once) > 0.05


def test_3augment_and_the_evaluation_crop(folder):
    """"Augmentation "3-Augment": ... random crop 224 with 4 px reflect padding, horizontal
    flip, one of {grayscale, solarize, Gaussian blur (kernel 7, sigma 0.2-2)}, colour jitter 0.3
    ...; no mixup, RandAugment, random erasing ... Evaluation: resize 224, centre crop 224."""
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as TF
    import imagesets
    # imagesets.ThreeAugment is torchvision's pipeline below, draw for draw and (but for the
    # resize and the blur) pixel for pixel: tests/test_loader.py shows it
    augment = tt.augmentation(tt.Config(img_size=16))
    assert isinstance(augment, imagesets.ThreeAugment) and (augment.size, augment.augment) == (
        16, "3aug")
    torchvision_3augment = T.Compose([
        T.RandomCrop(16, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
        T.RandomChoice([T.Grayscale(3), T.RandomSolarize(128, 1.0), T.GaussianBlur(7, (0.2, 2))]),
        T.ColorJitter(0.3, 0.3, 0.3)])
    x = torch.randint(0, 256, (3, 16, 21), dtype=torch.uint8)
    differ = 0
    for seed in range(30):
        torch.manual_seed(seed)
        ours = augment.of_resized(x)
        torch.manual_seed(seed)
        diff = (ours.int() - torchvision_3augment(x).int()).abs()
        assert diff.max() <= 2  # only where the blur ran: its sums in another order
        differ += bool(diff.any())
    assert differ <= 20
    # evaluation: the short side resized (bicubic), then the centre crop
    dataset, _, _ = tt.image_split(folder[0], "", "val")
    image, label = dataset[0]  # 20 x 16
    sample, got_label, index = tt.Samples(dataset, torch.tensor(dataset.targets), 12)[0]
    expected = TF.center_crop(TF.pil_to_tensor(TF.resize(image, 12, T.InterpolationMode.BICUBIC)),
                              [12, 12])
    assert torch.equal(sample, expected) and (got_label, index) == (label, 0)


# ----------------------------------------------------------------------------
# Label-noise experiment

def test_label_noise_flips_exactly_round_pn_to_other_classes():
    """"50% of training labels replaced by random labels, fixed for the whole run ... (exactly
    round(p*N) samples, new label uniform over the other classes, seeded ...)\""""
    labels = torch.randint(0, 10, (1001,), generator=torch.Generator().manual_seed(0))
    noisy, flipped = tt.noisy_labels(labels, 10, 0.5, seed=3)
    assert len(flipped) == round(0.5 * 1001) == 500
    assert torch.equal((noisy != labels).nonzero().flatten(), flipped)  # exactly those changed
    again, _ = tt.noisy_labels(labels, 10, 0.5, seed=3)
    assert torch.equal(again, noisy)
    assert not torch.equal(tt.noisy_labels(labels, 10, 0.5, seed=4)[0], noisy)
    counts = torch.bincount((noisy[flipped] - labels[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 500 / 9 * 0.5  # all 9 other classes drawn
    assert torch.equal(tt.noisy_labels(labels, 10, 0.0, seed=3)[0], labels)


def test_a_label_noise_run_keeps_captions_and_validation_clean(folder, tmp_path, monkeypatch):
    """"the caption targets stay clean (they describe the image); validation labels stay
    clean": a run with --label-noise 0.25 saves which labels it flipped, trains on exactly those
    noisy labels, hands the target source the clean ones (a class-level text is looked up by
    the image's true class, as the official code keys it by the image's file name: it stays
    clean like a caption), a per-image text is looked up by the image alone, and evaluation
    counts against the clean validation labels."""
    root, text, keys = folder
    classes = write_embeddings(tmp_path / "cls.pt", ["c", "a", "b"], torch.randn(3, 8),
                               level="class")
    seen, evaluated = [], []
    call, evaluate = tt.TextTargets.__call__, tt.evaluate
    monkeypatch.setattr(tt.TextTargets, "__call__", lambda self, index, labels, images, lam:
                        seen.append((index, labels)) or call(self, index, labels, images, lam))
    monkeypatch.setattr(tt, "evaluate", lambda vit, loader, *a: evaluated.append(
        torch.cat([labels for _, labels, _ in loader])) or evaluate(vit, loader, *a))
    args = base_args(folder, tmp_path, *CHEAP, "--epochs", "1", "--label-noise", "0.25")
    assert run(args + ["--text", classes, "--name", "noisy"]) == 0
    with open(tmp_path / "noisy" / "label_noise.json") as f:
        noise = json.load(f)
    flipped = noise["flipped"] if isinstance(noise, dict) else noise
    clean = torch.tensor(tt.image_split(root, "", "train")[0].targets)
    expected, _ = tt.noisy_labels(clean, 3, 0.25, 0)
    assert len(flipped) == 48 and torch.equal((expected != clean).nonzero().flatten(),
                                              torch.tensor(flipped))
    assert len(seen) == 6
    for index, labels in seen:  # the clean class, also for the flipped images among them
        assert torch.equal(labels, clean[index])
    assert any((expected[index] != clean[index]).any() for index, _ in seen)
    val = tt.image_split(root, "", "val")[0]
    assert all(torch.equal(e.sort().values, torch.tensor(val.targets).sort().values)
               for e in evaluated)
    # per-image targets ignore the (noisy) label: the row of the image
    targets = tt.TextTargets(text, keys, ["a", "b", "c"])
    images = torch.zeros(2, 3, 16, 16)
    index = torch.tensor([5, 100])
    assert torch.equal(targets(index, expected[index], images, 1.0),
                       targets(index, clean[index], images, 1.0))


# ----------------------------------------------------------------------------
# Pitfalls of the official code not to repeat

def test_accuracy_is_counted_over_samples():
    """"validation accuracy is a mean of per-batch accuracies (weight by samples)": top-1 and
    top-5 over 7 images in batches of 5 and 2, against a count image by image."""
    torch.manual_seed(0)
    vit = tt.ViT(num_classes=6, img_size=16, patch_size=8, width=32, depth=1, heads=2)
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    with torch.no_grad():
        logits = vit.eval()(tt.normalize(images))
    labels[:5] = logits[:5].argmax(1)  # the first batch all right, the second all wrong
    labels[5:] = logits[5:].argmin(1)
    loader = [(images[:5], labels[:5], torch.arange(5)),
              (images[5:], labels[5:], torch.arange(5, 7))]
    top1, top5 = tt.evaluate(vit, loader, CPU, torch.autocast("cpu", enabled=False), False)
    top5_hits = sum(labels[i] in logits[i].topk(5).indices for i in range(7))
    assert top1 == pytest.approx(100 * 5 / 7)  # a mean of batch means would say 50
    assert top5 == pytest.approx(100 * top5_hits / 7)


def test_embeddings_are_memory_mapped(tmp_path):
    """"all embeddings are loaded into RAM per process (about 5 GB per rank for ImageNet:
    memory-map instead)": the target vectors are backed by the file itself."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux's /proc/self/maps")
    path = write_embeddings(tmp_path / "e.pt", list("abc"), torch.randn(3, 4))

    def mapped():
        with open("/proc/self/maps") as f:
            return os.path.realpath(path) in f.read()
    assert not mapped()
    targets = tt.TextTargets(path, list("abc"), [])
    assert mapped() and targets.dim == 4


# ----------------------------------------------------------------------------
# Training invariants: what any correct loop must keep, whatever the method

def test_sampler_splits_every_step_across_ranks_and_resumes_mid_epoch():
    """"Negatives are the other images of the same per-device batch": step s takes its global
    batch from one permutation of the epoch, and micro-batch a of rank r its slice; one process
    with --accum 2 therefore sees the images two processes see. A start mid-epoch continues the
    same permutation."""
    full = list(tt.EpochSampler(100, batch_size=8, accum=2, rank=0, world=1, seed=1))
    assert len(full) == 96 and len({i for i, _ in full}) == 96
    parts = [list(tt.EpochSampler(100, 8, 2, r, 2, 1)) for r in (0, 1)]
    for s in range(12):  # rank 0 takes micro-batches 0 and 2 of each step, rank 1 takes 1 and 3
        step = full[8 * s: 8 * s + 8]
        assert parts[0][4 * s: 4 * s + 4] == step[0:2] + step[4:6]
        assert parts[1][4 * s: 4 * s + 4] == step[2:4] + step[6:8]
    later = tt.EpochSampler(100, 8, 2, 0, 1, 1)
    later.epoch, later.start = 0, 5
    assert list(later) == full[40:]
    other = tt.EpochSampler(100, 8, 2, 0, 1, 1)
    other.epoch = 1
    assert [i for i, _ in other] != [i for i, _ in full]  # another order each epoch


def test_accumulation_of_2x32_equals_one_batch_of_64(folder, tmp_path):
    """Gradient accumulation is one big batch computed in parts: without text (whose negatives
    are the micro-batch) 2 x 32 gives the weights of 1 x 64, with an optimiser that would show
    a gradient off by any factor."""
    args = sensitive(base_args(folder, tmp_path, "--text-loss-lambda", "0"))
    assert run(args + ["--accum", "1", "--name", "one"]) == 0
    assert run(args + ["--accum", "2", "--name", "two"]) == 0
    one, two = checkpoint(tmp_path / "one")["model"], checkpoint(tmp_path / "two")["model"]
    torch.manual_seed(0)
    init = tt.build_model(tt.parse_config(args)[0], 3, 0).state_dict()
    assert max((one[k] - init[k]).abs().max() for k in one) > 1e-2  # the weights did move
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """An uninterrupted run with every source of randomness on, in this process with --workers
    0: the interrupted runs below (some with workers, some as commands) must end bit-identical."""
    out = tmp_path_factory.mktemp("ref")
    assert run(base_args(folder, out, *RANDOM, "--name", "full")) == 0
    return str(out / "full")


def test_a_crash_after_epoch_one_then_resume_equals_an_uninterrupted_run(folder, reference,
                                                                         tmp_path, monkeypatch):
    """The pitfall "resume does not restore RNG or scaler state", turned around: the machine
    dies after epoch 1 was checkpointed, and the resumed run ends with the weights and the log
    of the run that never stopped."""
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="power cut"):
        run(base_args(folder, tmp_path, *RANDOM, "--name", "cut"))
    monkeypatch.undo()
    assert checkpoint(tmp_path / "cut")["epoch"] == 1
    assert run(["--resume", tmp_path / "cut"]) == 0
    assert_same_weights(checkpoint(tmp_path / "cut")["model"], checkpoint(reference)["model"])
    assert untimed(tmp_path / "cut") == untimed(reference)


EXPECTED_FILES = {"checkpoint.pt", "config.json", "metrics.jsonl", "log.txt", "label_noise.json",
                  "export"}


def test_sigkill_mid_epoch_then_resume_is_bit_identical(folder, reference, tmp_path):
    """SIGKILL (no handler runs) in the middle of epoch 2 of a command with 2 data workers and
    a checkpoint every step; the resumed run (with torn temporary files beside it, as a kill
    mid-save leaves one) ends bit-identical to the uninterrupted run and leaves no
    temporary file."""
    args = base_args(folder, tmp_path, *RANDOM, "--workers", "2", "--ckpt-every", "1",
                     "--name", "cut")
    p = start_paused(tmp_path, args, at=6 + 3)  # epoch 2, step 3: steps 1 and 2 are saved
    try:
        wait_for_pause(p)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = checkpoint(tmp_path / "cut")
    assert (killed_at["epoch"], killed_at["step"]) == (1, 2)
    for torn in ("checkpoint.pt.tmp", "metrics.jsonl.tmp"):  # never read; the next save replaces it
        (tmp_path / "cut" / torn).write_bytes(b"PK\x03\x04 torn")
    assert run(["--resume", tmp_path / "cut", "--workers", "2"]) == 0
    assert_same_weights(checkpoint(tmp_path / "cut")["model"], checkpoint(reference)["model"])
    assert untimed(tmp_path / "cut") == untimed(reference)
    assert set(os.listdir(tmp_path / "cut")) <= EXPECTED_FILES


@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_ctrl_c_stops_in_one_line_and_resume_from_the_last_checkpoint_is_bit_identical(
        folder, reference, tmp_path, how):
    """Ctrl-C reaches the whole process group (the data workers too); `kill PID` (SIGTERM) the
    trainer alone. Either way the command stops with one line saying how to continue and exits
    with 128 + N, its data workers end with it (none is left in its group); the last
    checkpoint (written atomically, here after every step) is whole, and the resumed run ends
    bit-identical to the uninterrupted one."""
    signum = signal.SIGINT if how == "ctrl-c" else signal.SIGTERM
    args = base_args(folder, tmp_path, *RANDOM, "--workers", "2", "--ckpt-every", "1",
                     "--name", "c")
    p = start_paused(tmp_path, args, at=6 + 2, start_new_session=True)  # epoch 2, step 2
    try:
        wait_for_pause(p)
        (os.killpg if how == "ctrl-c" else os.kill)(p.pid, signum)
        _, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signum, err
    assert ended(group=p.pid, timeout=30)
    stopped = checkpoint(tmp_path / "c")
    assert (stopped["epoch"], stopped["step"]) == (1, 1) and len(metrics(tmp_path / "c")) == 1
    word = "interrupted" if how == "ctrl-c" else "interrupted by SIGTERM"
    assert one_line(err) == f"{word}; continue from the last checkpoint: --resume {tmp_path / 'c'}"
    assert run(["--resume", tmp_path / "c"]) == 0
    assert_same_weights(checkpoint(tmp_path / "c")["model"], checkpoint(reference)["model"])
    assert untimed(tmp_path / "c") == untimed(reference)


def test_a_nan_stops_the_run_and_the_last_checkpoint_predates_it(folder, tmp_path, monkeypatch,
                                                                 capsys):
    """A non-finite loss stops the run (exit code 1) at the next boundary, and no checkpoint
    holds weights that the bad step touched."""
    args = base_args(folder, tmp_path, *CHEAP, "--text-loss-lambda", "0", "--ckpt-every", "2")
    poison_at_call(monkeypatch, 4, float("nan"))  # step 4, found at its checkpoint
    line = fails(capsys, args + ["--name", "nan"], code=1)
    assert line.startswith("error: the loss or the gradient became NaN or infinite")
    kept = checkpoint(tmp_path / "nan")
    assert (kept["epoch"], kept["step"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in kept["model"].values())

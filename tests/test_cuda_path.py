"""The CUDA path of textteacher.py, run where there is no GPU (issue 17, item 8): on CUDA,
compute_setup turns on bf16 autocast and torch.compile, and torchrun runs one process per GPU.
Each of those runs on a CPU through the same code: bf16 autocast is the same autocast on the
"cpu" device, torch.compile captures and differentiates the same graphs, and DDP runs over gloo. Each
test trains a few real steps of the micro ViT on the tiny folder and compares them with the
plain eager fp32 run, within a tolerance its docstring states and justifies. Then
benchmarks/gpu_check.py, the script a person with a GPU runs first: its CPU-runnable paths and
its judgement. Tests that compile are skipped, with the reason, only where the platform cannot.

Run: python -m pytest -q tests/test_cuda_path.py --durations=0
"""
import functools
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
from common import (ROOT, Forked, assert_same_weights, base_args, checkpoint, folder, free_port,
                    metrics, one_line, sensitive)

import textteacher as tt

if os.path.join(ROOT, "benchmarks") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

assert folder  # a fixture, used by name
ONE_IMAGE = 100 / 33  # top-1 in % that one of the tiny folder's 33 validation images is worth


def compile_counts():
    """Graphs captured by Dynamo so far."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"],


def watched_run(argv, bf16=False, inside=True):
    """textteacher.train in this process, watched. bf16: compute_setup as on CUDA, but with the
    CPU's autocast, which train() would otherwise leave off there. Returns the run folder, the
    initial weights, every micro-batch's (model handed to step_losses, [L, L_cls, L_txt, w],
    their dtypes), and with inside the dtypes seen inside: a linear layer of the ViT, the
    logits, z (forward hooks: not on a compiled run, whose graphs they would change, and which
    Dynamo would compile again each time a hook's set of dtypes grows)."""
    seen = dict(calls=[], inside={"qkv": set(), "logits": set(), "z": set()})
    setup, build = tt.compute_setup, tt.build_model

    def compute_setup(cfg, world=1, local_rank=0):
        device, autocast, use_compile = setup(cfg, world, local_rank)
        return device, torch.autocast("cpu", torch.bfloat16) if bf16 else autocast, use_compile

    def build_model(*a, **k):
        model = build(*a, **k)
        seen["init"] = {k: v.clone() for k, v in model.state_dict().items()}
        for name, m in (("qkv", model.vit.blocks[0].attn.qkv), ("logits", model.vit.head),
                        ("z", model.text_head))[:3 if inside else 0]:
            m.register_forward_hook(lambda m, i, out, name=name: seen["inside"][name].add(
                out.dtype))
        return model

    def objective(model, *a, **k):
        out = tt.step_losses(model, *a, **k)
        seen["calls"].append((model, torch.stack([x.detach() for x in out]),
                              [x.dtype for x in out]))
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tt, "compute_setup", compute_setup)
        mp.setattr(tt, "build_model", build_model)
        cfg, given = tt.parse_config([str(a) for a in argv])
        tt.check_config(cfg)
        seen["run"] = tt.train(cfg, given, objective=objective)
    seen["losses"] = torch.stack([c[1] for c in seen["calls"]])  # [micro-batches, 4]
    return seen


def update_error(a, b, init):
    """||delta_a - delta_b|| / ||delta_b|| over all weights, delta = final - initial weights:
    how far run a's training moved the weights from where run b's moved them."""
    da = torch.cat([(a[k] - init[k]).flatten() for k in init])
    db = torch.cat([(b[k] - init[k]).flatten() for k in init])
    return ((da - db).norm() / db.norm()).item()


def args(folder, out, *more):
    """A run whose weights show a gradient's error (common.sensitive: AdamW with eps 1 and lr 1
    moves a weight by about its gradient): 3 steps of 64 images as 4 micro-batches of 16, no
    stochastic depth (compiled code draws other masks than eager), on the CPU even where a GPU
    is present."""
    return sensitive(base_args(folder, out, "--device", "cpu", "--accum", "4", *more))


@pytest.fixture(scope="module")
def eager(folder, tmp_path_factory):
    """The reference of all three: one eager fp32 process."""
    out = tmp_path_factory.mktemp("eager")
    return watched_run(args(folder, out, "--compile", "off", "--name", "eager"))


# ----------------------------------------------------------------------------
# bf16 autocast

def test_bf16_autocast_trains_like_fp32_within_bf16s_precision(folder, eager, tmp_path):
    """Three steps under bf16 autocast, as compute_setup sets it up on CUDA, against the same
    steps in fp32. Autocast was really on: a linear layer inside the ViT, the logits and z are
    bfloat16 (and float32 in the fp32 run). What must stay fp32 did: L, L_cls, L_txt and w
    (the losses are computed outside autocast from .float() outputs), the weights and the
    optimiser's state (autocast, not a bf16 model).

    Tolerances: bf16 keeps 8 significant bits, so each rounding is off by up to 2^-8 = 0.4%
    (about 3 significant digits); the ViT's many roundings partly cancel. Measured here: step 1
    (same weights, only the arithmetic differs) within 0.2%, later steps within 0.8% (they
    also start from weights that bf16 moved), the epoch's means within 0.11%, the weights'
    movement within 0.7%. Allowed: 1% at step 1, 5% later, 2% for the logged means, 3% for the
    movement, with top-1 and top-5 within one validation image. A bug (a missing factor, a
    wrong w, a term dropped under autocast) is off by tens of percent."""
    bf16 = watched_run(args(folder, tmp_path, "--compile", "off", "--name", "bf16"), bf16=True)
    assert eager["inside"] == {"qkv": {torch.float32}, "logits": {torch.float32},
                               "z": {torch.float32}}
    assert bf16["inside"] == {"qkv": {torch.bfloat16}, "logits": {torch.bfloat16},
                              "z": {torch.bfloat16}}
    assert all(dtypes == [torch.float32] * 4 for _, _, dtypes in bf16["calls"])
    state = checkpoint(bf16["run"])
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    assert {v.dtype for s in state["optimizer"]["state"].values() for v in s.values()
            if torch.is_tensor(v) and v.is_floating_point()} == {torch.float32}

    a, b = bf16["losses"], eager["losses"]
    assert a.shape == b.shape == (12, 4)  # 3 steps x 4 micro-batches
    rel = ((a - b).abs() / b.abs())[:, 1:]  # L_cls, L_txt, w of every micro-batch
    assert rel.max() > 0  # the arithmetic did change
    assert rel[:4].max() <= 0.01, rel
    assert rel.max() <= 0.05, rel
    (m_bf16,), (m_fp32,) = metrics(bf16["run"]), metrics(eager["run"])
    for key in ("loss_cls", "loss_txt", "w"):
        assert m_bf16[key] == pytest.approx(m_fp32[key], rel=0.02), key
    for key in ("top1", "top5"):
        assert abs(m_bf16[key] - m_fp32[key]) <= ONE_IMAGE + 1e-9, key
    moved = update_error(state["model"], checkpoint(eager["run"])["model"], eager["init"])
    assert moved <= 0.03


# ----------------------------------------------------------------------------
# torch.compile: Dynamo's capture and AOT autograd

# The trainer's compile in these two tests goes to the aot_eager backend: Dynamo captures the
# graphs and AOT autograd derives their backward exactly as with inductor on a GPU (graph
# breaks, DDP's bucketed graphs, autograd.grad at the heads: where compiled training goes
# wrong), and eager kernels run them. Inductor's own code for a GPU is Triton, which no CPU
# test runs; its C++ code for the CPU (a minute to compile here, cold) is no path of the
# project's, so no test pays for it: benchmarks/gpu_check.py on a GPU checks the real one.
AOT_EAGER = functools.partial(torch.compile, backend="aot_eager")


def test_compiled_training_equals_eager_with_the_adaptive_weight(folder, eager, tmp_path,
                                                                monkeypatch):
    """--compile on, as on CUDA: the same three steps as eager. Every micro-batch went through
    the compiled model (an OptimizedModule, graphs captured by Dynamo and compiled by AOT
    autograd),
    and the heads and losses outside it (TextTeacher.heads): w needs dL/dF at F, which a
    graph compiled with the heads hides (without the decorator autograd.grad fails: tried).
    w, L_cls, L_txt of every micro-batch, the logged means and the final weights equal
    eager's.

    Tolerance: a compiler may fuse operations and reorder sums, so fp32 roundings may differ
    (inductor: measured 3e-7 relative on w and the losses, 4e-7 on weights moved by up to 1.6;
    AOT autograd's decompositions too). Allowed: 1e-4
    relative, and 1e-4 on the weights; features 0.1% off in the compiled graph already fail
    (tried), an error in w or a lost term is off by percents. w itself is between 0.017 and
    0.095 and varies from step to step: a w left at 1, or frozen, would not pass."""
    torch._dynamo.reset()  # compile anew, as a fresh process would
    monkeypatch.setattr(torch, "compile", AOT_EAGER)
    graphs = compile_counts()[0]
    compiled = watched_run(args(folder, tmp_path, "--compile", "on", "--name", "compiled"),
                           inside=False)
    assert compile_counts()[0] > graphs
    assert all(isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
               for model, _, _ in compiled["calls"])
    assert all(not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
               for model, _, _ in eager["calls"])

    a, b = compiled["losses"], eager["losses"]
    assert a.shape == b.shape == (12, 4)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)
    w = b[:, 3]
    assert (w.log().abs() > 1).all(), w  # far from 1 (e ** -1 = 0.37)
    assert w.max() / w.min() > 1.2, w  # and a new value every step
    (m_compiled,), (m_eager,) = metrics(compiled["run"]), metrics(eager["run"])
    for key in ("loss_cls", "loss_txt", "w"):
        assert m_compiled[key] == pytest.approx(m_eager[key], rel=1e-4), key
    for key in ("top1", "top5"):
        assert abs(m_compiled[key] - m_eager[key]) <= ONE_IMAGE + 1e-9, key
    one, two = checkpoint(compiled["run"])["model"], checkpoint(eager["run"])["model"]
    assert max((two[k] - eager["init"][k]).abs().max() for k in two) > 0.5  # they did move
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=1e-4, msg=k)


# ----------------------------------------------------------------------------
# torch.compile under DDP: two gloo processes, as torchrun starts them

RANK_SCRIPT = """
import functools, json, os, sys
sys.path.insert(0, {root!r})
import torch
import torch._dynamo
import textteacher as tt
from torch._dynamo.utils import counters
torch._dynamo.reset()  # a new process compiles anew: none of the test process's graphs
counters.clear()
calls, built, val, build, evaluate = [], [], [], tt.build_model, tt.evaluate
torch.compile = functools.partial(torch.compile, backend="aot_eager")  # see AOT_EAGER
tt.build_model = lambda *a, **k: built.append(build(*a, **k)) or built[-1]  # this rank's model
tt.evaluate = lambda vit, loader, *a, **k: (val.append(list(loader.sampler))  # this rank's share
                                            or evaluate(vit, loader, *a, **k))


def objective(model, *a, **k):  # step_losses, watched: what it is handed, and its w
    out = tt.step_losses(model, *a, **k)
    inner = getattr(model, "_orig_mod", model)  # the module torch.compile wrapped
    calls.append(dict(model=type(model).__name__, inner=type(inner).__name__, w=out[3].item()))
    return out


cfg, given = tt.parse_config(sys.argv[2:])
tt.check_config(cfg)
tt.train(cfg, given, objective=objective)
with open(os.path.join(sys.argv[1], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(dict(calls=calls, graphs=counters["stats"]["unique_graphs"], val=val[0]), f)
torch.save(built[0].state_dict(), os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
"""


def test_compiled_ddp_over_two_gloo_processes_equals_one_eager_process(folder, eager, tmp_path):
    """Two ranks with --compile on, started with the environment torchrun --nproc_per_node=2
    gives them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: what
    train() and the gloo rendezvous read): torch.compile of the DDP model, as train()
    does it on 8 GPUs, with --accum 2 (DDP's no_sync on the first micro-batch) and 16 images a
    micro-batch. It must give the eager process with --accum 4 over the same micro-batches:
    each rank's w of each micro-batch, the logged means (of both ranks' images) and rank 0's
    weights. Both ranks ran the compiled DDP model at every micro-batch, end with the same
    weights, and count each of the 33 validation images on exactly one of them; rank 0 alone
    prints and logs. ("Negatives are the other images of the same per-device batch (no
    gathering across GPUs in the paper's code ...)": each rank's micro-batch is one contrastive
    loss, as one process's micro-batch is.)

    Tolerance, as for one compiled process: measured 4e-7 on the weights, 2e-7 relative on w
    and 1e-7 on the means. Allowed: 1e-4, where a gradient not averaged over the ranks (or
    averaged twice) moves the weights by ~1 under this optimiser, and DDP synchronising the
    wrong micro-batch (no_sync inverted: tried) puts w 12% off. The ranks see no GPU
    (CUDA_VISIBLE_DEVICES empty): train() picks NCCL whenever CUDA is available, and these
    tensors are on the CPU."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch has no gloo backend")
    (tmp_path / "rank.py").write_text(RANK_SCRIPT.format(root=ROOT))
    argv = [tmp_path, *args(folder, tmp_path, "--accum", "2", "--compile", "on", "--ckpt-every",
                            "1", "--name", "ddp")]
    port = str(free_port())
    procs = [Forked(tmp_path / "rank.py", argv, dict(
        os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", RANK=str(r), LOCAL_RANK=str(r),
        WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        for r in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(33))
    assert sum(line.startswith("run ") for out, _ in outputs for line in out.splitlines()) == 1
    assert len(metrics(tmp_path / "ddp")) == 1
    weights = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert_same_weights(*weights)
    assert_same_weights(weights[0], checkpoint(tmp_path / "ddp")["model"])
    for r in ranks:
        assert r["graphs"] >= 1
        assert {(c["model"], c["inner"]) for c in r["calls"]} == {
            ("OptimizedModule", "DistributedDataParallel")}
        assert len(r["calls"]) == 6  # 3 steps x accum 2

    # micro-batch a of rank r at step s is micro-batch 2a + r of that step in one process
    w = eager["losses"][:, 3].view(3, 4)
    for rank, r in enumerate(ranks):
        got = torch.tensor([c["w"] for c in r["calls"]]).view(3, 2)
        torch.testing.assert_close(got, w[:, rank::2], rtol=1e-4, atol=0)
    (m_ddp,), (m_eager,) = metrics(tmp_path / "ddp"), metrics(eager["run"])
    for key in ("loss_cls", "loss_txt", "w", "top1", "top5"):
        assert m_ddp[key] == pytest.approx(m_eager[key], rel=1e-4), key
    one, two = checkpoint(tmp_path / "ddp")["model"], checkpoint(eager["run"])["model"]
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=1e-4, msg=k)


# ----------------------------------------------------------------------------
# benchmarks/gpu_check.py

def test_gpu_check_without_a_gpu_says_so_in_one_line(capsys, monkeypatch):
    """Without CUDA (and without --device cpu) the check cannot check anything: one line that
    says so and what to do instead, exit code 2, before any work."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: no CUDA device here") and "--device cpu" in line


def test_gpu_check_cpu_paths_pass_and_agree(capsys, monkeypatch):
    """gpu_check's CPU smoke mode on the micro ViT, in this process: fp32, bf16 autocast, and,
    in the trainer's CPU precision (fp32), compile, fused AdamW and DDP over a one-process gloo
    group; 3 steps each, 16 images a step, compiled as the tests above compile (AOT_EAGER).
    All pass; bf16 really ran in bf16 and differs from fp32, by less than 1%
    at step 1 (bf16 rounds by up to 0.4%: see TOL_BF16); compiled, the step is eager's within
    1e-4 (fp32 in another order, as above); DDP over one process is the compiled step's at its
    first two steps; fused AdamW's first update is the per-tensor loop's within 1e-5 (measured
    2e-7); and on the micro ViT both losses fell on every path (gpu_check demands it of L_cls
    only)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", AOT_EAGER)  # see AOT_EAGER
    cfg, steps, paths = gpu_check.parse(
        ["--device", "cpu", "--model", "micro", "--img-size", "16", "--patch-size", "8",
         "--batch-size", "16", "--steps", "3", "--threads", "1",
         "--paths", "fp32,bf16,compile,adamw,ddp"])
    results = gpu_check.check(cfg, steps, paths)
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines() if line[:4] in ("PASS", "FAIL")] == [
        ["PASS", p] for p in paths]
    assert all(not r["why"] for r in results.values())
    assert [results[p]["logits_dtype"] for p in paths] == [
        torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.float32]
    assert 0 < results["bf16"]["rel"][0].max() <= 0.01
    assert results["compile"]["rel"][0].max() <= 1e-4
    assert results["ddp"]["rel"][0].max() <= 1e-4
    assert results["adamw"]["update_error"] <= 1e-5
    for r in results.values():
        assert (r["rows"][-1, 1:3] < r["rows"][0, 1:3]).all()


@pytest.mark.parametrize("on_device", [False, True])
def test_gpu_check_times_the_trainers_input_pipeline(on_device, capsys, monkeypatch):
    """The input path times the augmentation the trainer builds for the device, one thread as a
    worker has: on a CPU the whole 3-Augment; with the colour steps deferred (what the trainer
    does on a GPU, forced here) the worker's share, and the colour steps of a batch on the
    device, in their own line."""
    import imagesets
    built = []

    def augmentation(cfg, device=torch.device("cpu")):
        built.append((cfg.img_size, cfg.augment, device.type))
        return imagesets.ThreeAugment(cfg.img_size, cfg.augment, on_device=on_device)
    monkeypatch.setattr(tt, "augmentation", augmentation)
    cfg, steps, paths = gpu_check.parse(
        ["--device", "cpu", "--model", "micro", "--img-size", "16", "--patch-size", "8",
         "--batch-size", "16", "--threads", "1", "--paths", "input"])
    results = gpu_check.check(cfg, steps, paths)
    out = capsys.readouterr().out
    assert built == [(16, "3aug", "cpu")] and "PASS  input" in out
    assert results["input"]["images_per_s"] > 0
    assert ("colour_ms_per_batch" in results["input"]) == on_device
    assert ("the colour steps of a batch of 16 take" in out) == on_device


def test_gpu_check_fails_a_path_that_is_off():
    """The judgement that makes a path FAIL: a w 10% off its reference, a non-finite loss, an
    L_cls that rises, a first update off its CPU twin, logits in the wrong precision. Each is a
    reason; the reference itself passes."""
    rows = torch.tensor([[3.0, 4.0, 2.0, 0.5, 1.0], [2.5, 3.5, 1.8, 0.5, 1.0]])
    good = dict(rows=rows, update_error=1e-7, logits_dtype=torch.bfloat16)
    assert gpu_check.judge(dict(good), None) == []
    assert gpu_check.judge(dict(good), good, tol=0.05) == []
    off = rows.clone()
    off[0, 3] *= 1.1
    assert "w 0.1" in " ".join(gpu_check.judge(dict(good, rows=off), good, tol=0.05))
    nan = rows.clone()
    nan[1, 2] = float("nan")
    assert "non-finite L_txt" in " ".join(gpu_check.judge(dict(good, rows=nan)))
    assert "should fall" in " ".join(gpu_check.judge(dict(good, rows=rows.flip(0))))
    assert "CPU twin" in " ".join(gpu_check.judge(dict(good, update_error=0.01)))
    assert "not torch.bfloat16" in " ".join(gpu_check.judge(dict(good,
                                                                logits_dtype=torch.float32)))

"""
The CUDA path of textteacher.py, checked on one GPU before an epoch of ImageNet is spent on it:
the training loop's own step on a synthetic ImageNet-shaped batch (224 px, 1000 classes, 768-d
text targets), path by path, each against a reference. Meant to take about three minutes,
mostly compilation (a budget, not a measurement: it was written where there is no GPU; on
2 busy CPU cores the smoke run below takes 10 s with a warm compile cache, 1 min cold).

    python benchmarks/gpu_check.py                  # ViT-S/16, 64 images a step, 20 steps a path
    python benchmarks/gpu_check.py --model base --batch-size 128 --paths bf16,compile
    # without a GPU, the paths a CPU can take, on the micro ViT (tests/test_cuda_path.py runs it)
    python benchmarks/gpu_check.py --device cpu --model micro --img-size 16 --patch-size 8 \\
        --batch-size 16 --steps 3 --threads 1 --paths fp32,bf16,compile,adamw,ddp

The paths (--paths, all of them by default). The in-process ones start from the same weights
and see the same batch at every step, so each must keep its numbers finite and lower L_cls. The
compiled ones take the trainer's precision on the device (compute_setup: bf16 autocast on CUDA,
fp32 on a CPU, so that there they share the graphs of tests/test_cuda_path.py):
  fp32      eager, fp32, LAMB: the reference; its first update is LAMB's on CPU copies
  bf16      eager under bf16 autocast: step 1 within TOL_BF16 of fp32
  compile   torch.compile in the trainer's precision: step 1 within TOL_COMPILE of the eager
            path in that precision; its first update is LAMB's on CPU copies
  adamw     the compiled step with fused AdamW (build_optimizer's; --lr if --optimizer adamw,
            else the project's AdamW recipe): its first update is AdamW's per-tensor loop
            (neither fused nor foreach) on CPU copies
  ddp       the compiled step in DistributedDataParallel over a one-process NCCL group (gloo
            on a CPU): steps 1 and 2 (after an update from all-reduced gradients) within
            TOL_COMPILE of compile
  torchrun  torchrun --nproc_per_node=1 textteacher.py on a small synthetic image folder, one
            epoch with the preset's recipe: exit 0, finite logged losses, an export
  speed     benchmarks/step.py on the trainer's own setup: the text objective's share of the
            step, training and inference images/s, peak memory
  input     the training input pipeline (decode and the trainer's imagesets.ThreeAugment) on
            photo-like 500 x 375 JPEGs, one thread: images/s per data-loading worker, against
            the step's demand (the speed path's images/s): FAIL when the workers the trainer
            starts per GPU (up to 8, and the cores / GPUs) cannot keep up; on a GPU, also the
            time the colour steps take there, per batch and as a share of the step
Each prints PASS or FAIL with its reason, images/s and peak memory; the exit code is 0 when all
pass, 1 when one fails, 2 without a CUDA device (and without --device cpu) or for a bad flag.
The other flags are textteacher.py's model and recipe flags; --batch-size is the batch of one
step here (default 64), and the in-process paths run at --lr without warm-up.
"""
import contextlib
import dataclasses
import gc
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import step  # noqa: E402  (benchmarks/step.py: its synchronize and benchmark are reused)
import textteacher as tt  # noqa: E402
from cli import UserError, need  # noqa: E402

PATHS = ("fp32", "bf16", "compile", "adamw", "ddp", "torchrun", "speed", "input")
# Step 1 of two paths starts from the same weights, so its losses, w and gradient norm differ
# only by the arithmetic. bf16 keeps 8 significant bits: each rounding is off by up to 2^-8 =
# 0.4%, and through a ViT's many roundings, partly cancelling, step 1 differs from fp32's by
# 0.09% for the micro ViT and 0.06% for ViT-S/16 at 224 px, on a CPU. 5% leaves room for the
# GPU's kernels (cuBLAS may reduce in bf16) and is still far below what a bug does (a missing
# factor, a wrong w, a dropped term: tens of percent). Inductor fuses bf16 operations with
# fp32 intermediates where eager rounds after each: differences of that order.
TOL_BF16 = TOL_COMPILE = 0.05
# The first optimiser update on the device against the per-tensor code on CPU copies: both fp32,
# the same formula in another order, so they differ by float32 roundings (1e-7 of the update);
# 1e-3 of each tensor's update catches any tensor stepped wrongly or not at all.
TOL_UPDATE = 1e-3
COLUMNS = ("L", "L_cls", "L_txt", "w", "grad norm")  # the record of every step


def parse(argv):
    """(Config, steps, paths): gpu_check's flags, then textteacher.py's for the rest."""
    # no abbreviations: a flag of the trainer's must not be taken for one of these
    p = cli.Parser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    # two steps at least: the loss must fall
    p.add_argument("--steps", type=cli.number(int, "[2, 100000]"), default=20,
                   help="steps of each in-process path")
    p.add_argument("--paths", default=",".join(PATHS), type=cli.some_of(PATHS),
                   help=f"some of {','.join(PATHS)}")
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        p.print_help()  # then textteacher.py's flags, by parse_config
    args, rest = p.parse_known_args(argv)
    cfg, _ = tt.parse_config(["--batch-size", "64", *rest])  # one step's batch, not ImageNet's
    paths = args.paths
    need(paths, f"--paths is empty: choose among {','.join(PATHS)}")
    # the message a machine without a GPU gives, before check_config's about --device cuda
    need(cfg.device == "cpu" or torch.cuda.is_available(), "no CUDA device here (torch.cuda."
         "is_available() is False): this checks the CUDA path on a GPU; --device cpu runs the "
         "paths a CPU can take")
    need(cfg.device in ("auto", "cuda", "cpu"), f"--device {cfg.device}: CUDA, or cpu")
    tt.check_config(cfg)
    return cfg, args.steps, paths


# ----------------------------------------------------------------------------
# One path: the loop's step on one batch, again and again

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_batch(cfg, device):
    """Images [B, 3, S, S] as normalize() leaves them, one-hot labels over the classes --data
    would have (step.py's rule: ImageNet's 1000 by default), and random 768-d targets with rows
    of norm about 1, as a sentence encoder's normalised embeddings: with step.py's norm of 28,
    raw dot products make any step of the text head overshoot, and L_txt rises."""
    g = torch.Generator().manual_seed(cfg.seed)
    classes = {"shapes": 10, "cifar100": 100}.get(cfg.data, 1000)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=g)
    y = F.one_hot(torch.randint(classes, (cfg.batch_size,), generator=g), classes).float()
    t = torch.randn(cfg.batch_size, step.BENCH_TEXT_DIM, generator=g) / step.BENCH_TEXT_DIM**.5
    return images.to(device), y.to(device), t.to(device)


def cpu_update(optimizer, before, grads):
    """The first step of `optimizer` redone on CPU copies of its weights and gradients by the
    per-tensor code: AdamW's for-loop (neither fused nor foreach), or the same LAMB formula on
    CPU tensors (whose foreach operations loop over tensors). Returns the new weights."""
    copies, groups = iter(zip(before, grads)), []
    for group in optimizer.param_groups:
        params = []
        for p, g in (next(copies) for _ in group["params"]):
            params.append(p.clone().requires_grad_(True))
            params[-1].grad = g
        groups.append({**group, "params": params})
    if isinstance(optimizer, tt.Lamb):
        reference = tt.Lamb(groups)
    else:
        reference = torch.optim.AdamW([dict(g, fused=False, foreach=False) for g in groups])
    reference.step()
    return [p.detach() for g in groups for p in g["params"]]


def update_error(before, after, reference):
    """The largest relative difference, over tensors, between two first updates."""
    worst = 0.0
    for b, a, r in zip(before, after, reference):
        scale = (r - b).norm().item()
        if scale > 0 or (a - b).norm() > 0:
            worst = max(worst, ((a - b) - (r - b)).norm().item() / max(scale, 1e-30))
    return worst


def train_steps(cfg, batch, steps, autocast, compiled, ddp=False):
    """train()'s step (step_losses, backward, clipping, the optimiser) `steps` times on one
    batch from the seed's weights. Returns a dict: rows [steps, 5] of COLUMNS, the first
    update's relative difference to cpu_update's, the dtype of the logits (bf16 under
    autocast), images/s over the steps after the first (which compiles), and peak memory."""
    images, y, t = batch
    device = images.device
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    model = tt.build_model(cfg, y.shape[1], t.shape[1]).to(device)
    optimizer = tt.build_optimizer(cfg, model, device)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr  # the peak rate, no warm-up: the losses must fall within a few steps
    params = [p for group in optimizer.param_groups for p in group["params"]]
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    train_model = torch.compile(net) if compiled else net
    logits_dtype = []
    hook = model.vit.head.register_forward_hook(lambda m, i, out: logits_dtype.append(out.dtype))
    lam, rows = tt.lambda_at(cfg, 0), []
    for s in range(steps):
        if s == 1:  # the clock starts after the first step, which compiles
            step.synchronize(device)
            t0 = time.perf_counter()
        loss, loss_cls, loss_txt, w = tt.step_losses(train_model, images, y, t, lam, cfg,
                                                     autocast)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or math.inf)
        if s == 0:
            before = [p.detach().cpu().clone() for p in params]
            grads = [p.grad.detach().cpu().clone() for p in params]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if s == 0:
            after = [p.detach().cpu().clone() for p in params]
        rows.append(torch.stack([loss, loss_cls, loss_txt, w, norm]).detach().float())
    step.synchronize(device)
    seconds = time.perf_counter() - t0
    hook.remove()
    return dict(rows=torch.stack(rows).cpu(), logits_dtype=logits_dtype[0],
                update_error=update_error(before, after, cpu_update(optimizer, before, grads)),
                images_per_s=len(y) * (steps - 1) / seconds,
                peak_mb=torch.cuda.max_memory_allocated(device) / 2**20
                if device.type == "cuda" else None)


def judge(r, reference=None, tol=None, compared=1, optimizer="LAMB", dtype=torch.bfloat16):
    """The reasons r fails, if any: logits not in the path's precision (autocast off, or on
    where it should not be), a non-finite number, L_cls not falling, a first update off its
    CPU twin, the first `compared` steps more than tol from the reference path's. (Later steps
    are not compared: both paths' small differences grow as they train. L_txt need not fall:
    while the classifier memorises the batch, the backbone moves faster than LAMB lets the
    text head follow, and the text loss of random targets may rise for a few steps.)"""
    rows, why = r["rows"], []
    if r["logits_dtype"] != dtype:
        why.append(f"the logits are {r['logits_dtype']}, not {dtype}")
    if not torch.isfinite(rows).all():
        bad = [c for c, finite in zip(COLUMNS, rows.isfinite().all(0).tolist()) if not finite]
        why.append(f"non-finite {', '.join(bad)}")
    elif not rows[-1, 1] < rows[0, 1]:
        why.append(f"L_cls {rows[0, 1]:.4g} -> {rows[-1, 1]:.4g}: it should fall on a batch "
                   "seen again and again")
    if not r["update_error"] <= TOL_UPDATE:
        why.append(f"first {optimizer} update {r['update_error']:.2g} off the CPU twin's "
                   f"(tolerance {TOL_UPDATE:g})")
    if reference is not None and "rows" in reference:
        ref, label = reference["rows"][:compared], "step 1" if compared == 1 else (
            f"steps 1-{compared}")
        r["rel"] = (rows[:compared] - ref).abs().div(ref.abs()).amax(0), label
        off = [f"{c} {x:.2g}" for c, x in zip(COLUMNS, r["rel"][0].tolist()) if not x <= tol]
        if off:
            why.append(f"{r['rel'][1]} off by {', '.join(off)} (tolerance {tol:g})")
    return why


def summary(r, reference):
    """What a passing in-process path measured: how far from its reference and its CPU twin."""
    if "rows" not in r:
        return ""
    rows = r["rows"]
    text = (f"L_cls {rows[0, 1]:.4g} -> {rows[-1, 1]:.4g}, L_txt {rows[0, 2]:.4g} -> "
            f"{rows[-1, 2]:.4g}; first update {r['update_error']:.1e} off the CPU twin's")
    if "rel" in r:
        rel, steps = r["rel"]
        text += f"; {steps} at most {rel.max():.1e} off {reference}'s (relative)"
    return text


# ----------------------------------------------------------------------------
# The command: textteacher.py under torchrun, on a small synthetic image folder

def write_folder(root, cfg, classes=4):
    """root/{train,val}/cCLASS/*.png, enough training images for two steps, and root/text.pt:
    random 768-d targets keyed by file name, in caption_embed.py's format."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    keys, per_class = [], -(-(2 * cfg.batch_size + 1) // classes)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(n):
                name = f"c{c}_{split}_{i:04d}.png"
                pixels = torch.randint(256, (cfg.img_size, cfg.img_size, 3), generator=g)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(
                    os.path.join(root, split, f"c{c}", name))
                keys += [name] if split == "train" else []
    vectors = torch.randn(len(keys), step.BENCH_TEXT_DIM, generator=g)
    torch.save(dict(format="textteacher-embeddings-v1", embeddings=vectors, keys=keys,
                    level="image", split="train", mean=vectors.mean(0), std=vectors.std(0),
                    encoder="random", pooling="none", source_sha256="", dataset="gpu_check"),
               os.path.join(root, "text.pt"))


def torchrun(cfg, device):
    """One epoch of textteacher.py under torchrun with one process. WORLD_SIZE is then 1, so
    train() makes no process group (the ddp path runs NCCL); this runs the command itself:
    data loading into pinned memory, the preset's recipe with stochastic depth and CutMix,
    compilation as --compile says, evaluation, checkpoint and export."""
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(tmp, cfg)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
               f"--master-port={free_port()}", os.path.join(os.path.dirname(HERE),
                                                             "textteacher.py"),
               "--data", tmp, "--text", os.path.join(tmp, "text.pt"), "--model", cfg.model,
               "--img-size", str(cfg.img_size), "--patch-size", str(cfg.patch_size),
               "--batch-size", str(cfg.batch_size), "--epochs", "1", "--warmup-epochs", "0",
               "--device", device.type, "--compile", cfg.compile, "--out-dir", tmp,
               "--name", "run", "--log-every", "1"]
        cmd += ["--workers", "0", "--threads", "1"] if device.type == "cpu" else []
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        seconds, run = time.perf_counter() - t0, os.path.join(tmp, "run")
        if p.returncode != 0:
            last = [line for line in p.stderr.splitlines() if line.strip()][-3:]
            return dict(why=[f"exit code {p.returncode}: {' | '.join(last)}"], seconds=seconds)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            record = json.loads(f.readline())
        why = [f"{k} {record[k]} logged" for k in ("loss_cls", "loss_txt", "w")
               if not math.isfinite(record[k] or math.nan)]
        if not os.path.isfile(os.path.join(run, "export", "model.safetensors")):
            why.append("no export/model.safetensors")
        return dict(why=why, seconds=seconds, record=record)


# ----------------------------------------------------------------------------
# All paths

def check(cfg, steps, paths):
    """Run the paths; print a line for each; return {path: result} (result["why"]: the
    reasons it failed, empty when it passed)."""
    given, cfg = cfg, dataclasses.replace(cfg, drop_path=0.0)  # compiled code draws other masks
    # the trainer's own device and precision: bf16 autocast on CUDA, fp32 on a CPU
    device, autocast, trainer_compile = tt.compute_setup(cfg)
    on = autocast._enabled
    bf16 = autocast if on else torch.autocast(device.type, torch.bfloat16)
    trainer, dtype = ("bf16", torch.bfloat16) if on else ("fp32", torch.float32)
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})"
                           if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    print(f"gpu_check: ViT-{cfg.model}/{cfg.patch_size} at {cfg.img_size}px, batch "
          f"{cfg.batch_size}, {steps} steps a path on {where}; the trainer's setup here: "
          f"{'bf16 autocast' if on else 'fp32'}, {'compiled' if trainer_compile else 'eager'}",
          flush=True)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        print("  note: this GPU is older than Ampere (compute capability < 8.0): bf16 is "
              "emulated, slowly; compute_setup picks it all the same")
    batch, results = synthetic_batch(cfg, device), {}
    lamb = dataclasses.replace(cfg, optimizer="lamb")
    # AdamW at --lr if that is AdamW's, else at the project's AdamW recipe (LAMB's 3e-3 is high)
    adamw = dataclasses.replace(cfg, optimizer="adamw") if cfg.optimizer == "adamw" else (
        dataclasses.replace(cfg, **{k: tt.SMALL[k] for k in ("optimizer", "lr", "weight_decay",
                                                             "opt_eps")}))

    def path(name, run, reference=None, **judged):
        """Run one path (a crash is its failure, and the others still run), judge, print."""
        if name not in paths:
            return
        try:
            r = run()
            if "rows" in r:  # an in-process path, against its reference path if that ran
                r["why"] = judge(r, results.get(reference), **judged)
        except Exception as e:
            r = dict(why=[f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                          if str(e).strip() else type(e).__name__])
        results[name] = r
        speed = f"{r['images_per_s']:8.1f} img/s" if "images_per_s" in r else " " * 14
        memory = f"peak {r['peak_mb']:6.0f} MB" if r.get("peak_mb") else ""
        print(f"{'FAIL' if r['why'] else 'PASS'}  {name:8} {speed}  {memory}  "
              f"{'; '.join(r['why']) or summary(r, reference)}".rstrip(), flush=True)

    path("fp32", lambda: train_steps(lamb, batch, steps, contextlib.nullcontext(), False),
         dtype=torch.float32)
    path("bf16", lambda: train_steps(lamb, batch, steps, bf16, False),
         reference="fp32", tol=TOL_BF16)
    path("compile", lambda: train_steps(lamb, batch, steps, autocast, True),
         reference=trainer, tol=TOL_COMPILE, dtype=dtype)
    path("adamw", lambda: train_steps(adamw, batch, steps, autocast, True), optimizer="AdamW",
         dtype=dtype)

    def ddp():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
        try:
            return train_steps(lamb, batch, steps, autocast, True, ddp=True)
        finally:
            dist.destroy_process_group()
    path("ddp", ddp, reference="compile", tol=TOL_COMPILE, compared=2, dtype=dtype)

    def command():
        r = torchrun(cfg, device)
        if "record" in r:
            print(f"  torchrun: {r['seconds']:.0f} s for the command, compilation included; "
                  f"{r['record']['images_per_s']:.1f} img/s over its epoch")
        return r
    path("torchrun", command)

    def speed():
        r = step.benchmark(given, warmup=3, steps=2, repeats=5)
        numbers = [r["text_objective_share"], r["textteacher_images_per_s"]]
        return dict(r, why=[] if all(map(math.isfinite, numbers)) else ["non-finite timings"],
                    images_per_s=r["textteacher_images_per_s"],
                    peak_mb=r["peak_memory_mb"] if device.type == "cuda" else None)
    path("speed", speed)
    if "speed" in results and not results["speed"]["why"]:
        print(f"  the text objective takes {results['speed']['text_objective_share']:.1%} of "
              "the trainer's step (step.py, above)")

    def input_pipeline():
        import imagesets
        import loader  # benchmarks/loader.py: its JPEGs and decode
        # the trainer's own: on a GPU, the workers draw the colour steps, the device runs them
        data, augment = loader.jpegs(24, 500, 375), tt.augmentation(cfg, device)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what one DataLoader worker has
        try:
            loader.timed(lambda d: augment(loader.decode(d)), data[:4])  # warm-up
            per_worker = 1000 / loader.timed(lambda d: augment(loader.decode(d)), data)
            out = [augment(loader.decode(d)) for d in data[:cfg.batch_size]]
        finally:
            torch.set_num_threads(threads)
        gpus = max(torch.cuda.device_count(), 1) if device.type == "cuda" else 1
        workers = min(8, (os.cpu_count() or 2) // gpus)  # the trainer's default (--workers -1)
        r = dict(images_per_s=per_worker, why=[])
        if isinstance(out[0], tuple):  # the colour steps of a batch (of the JPEGs, repeated)
            out = (out * -(-cfg.batch_size // len(out)))[:cfg.batch_size]
            images, draws = (torch.stack([o[k] for o in out]) for k in (0, 1))
            times = []
            for _ in range(4):  # the first warms up
                step.synchronize(device)
                start = time.perf_counter()
                imagesets.on_device([images, draws], device)
                step.synchronize(device)
                times.append(time.perf_counter() - start)
            r["colour_ms_per_batch"] = 1000 * min(times[1:])
            print(f"  input: the colour steps of a batch of {cfg.batch_size} take "
                  f"{r['colour_ms_per_batch']:.2f} ms on {device}", flush=True)
        if "speed" in results and "textteacher_images_per_s" in results["speed"]:
            demand = results["speed"]["textteacher_images_per_s"]
            needed = math.ceil(demand / per_worker)
            print(f"  input: {per_worker:.0f} img/s per worker; the step takes {demand:.0f} img/s: "
                  f"{needed} workers per GPU, and the trainer starts {workers}", flush=True)
            if needed > workers:
                r["why"] = [f"{workers} workers per GPU feed {workers * per_worker:.0f} img/s, "
                            f"the step takes {demand:.0f}: the GPU waits for its input"]
            if "colour_ms_per_batch" in r:
                share = r["colour_ms_per_batch"] / 1000 * demand / cfg.batch_size
                print(f"  input: the colour steps add {share:.1%} to the step", flush=True)
        return r
    path("input", input_pipeline)
    return results


class Failed(UserError):
    """A path failed: one line after the paths' own, exit code 1."""
    code = 1


def main(argv=None):
    def run(argv):
        cfg, steps, paths = parse(argv)
        results = check(cfg, steps, paths)
        failed = [name for name, r in results.items() if r["why"]]
        if failed:
            raise Failed(f"{len(failed)} of {len(results)} paths failed: {', '.join(failed)}")
        print(f"all {len(results)} paths passed")
        return results
    return cli.run(run, argv)


if __name__ == "__main__":
    main()

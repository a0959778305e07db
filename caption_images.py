"""
caption_images.py: the paper's first stage, one caption per training image, written once.

TextTeacher (Nauen et al., 2026) pulls a linear projection of a ViT's CLS feature toward the
frozen text embedding of each training image's caption. The paper captioned every ImageNet
image with CoCa ViT-L/14 (beam search, no prompt); this script does the same for any data
textteacher.py trains on, under the same keys, so caption_embed.py and training can follow:

  # CPU, a folder of your own (PATH holds train/ and val/ with one sub-folder per class)
  python caption_images.py --data PATH --out captions_train.txt
  python caption_embed.py --captions captions_train.txt --out text.pt
  python textteacher.py --data PATH --text text.pt

  # one GPU (bf16): CIFAR-100's 50000 training images, then its 10000 test images
  python caption_images.py --data cifar100 --data-dir data --out c100_captions_train.txt
  python caption_images.py --data cifar100 --data-dir data --split val --out c100_captions_val.txt

  # 8 GPUs: rank r captions images r, r + 8, r + 16, ...; rank 0 merges them in key order
  torchrun --nproc_per_node=8 caption_images.py --data imagenet --data-dir /data/imagenet \\
      --out in1k_captions_train.txt

  # the paper's own captioner, where open_clip is installed (pip install open_clip_torch)
  python caption_images.py --model open_clip:coca_ViT-L-14 --data imagenet --out in1k_coca.txt

Each prints "captioning N images of DATA/SPLIT with MODEL on 1 x cuda (bfloat16), 0 done
before", a progress bar with images per second (on a terminal), and at the end "wrote OUT:
N captions of DATA/SPLIT in T s (R images/s)". OUT holds lines "key:<TAB>caption" in
textteacher.py's key order (the CIFAR-100 index, or the image file name), every key exactly
once: plain text, to read and edit before embedding. OUT.json beside it records the model,
its revision, the decoding settings and the library versions. A killed run, started again
with the same command, continues where it stopped: the captions written so far wait in
OUT.parts/ until the last one is done. A second run with the same OUT is refused while the
first is running, and --force replaces only a caption file this script wrote.

Measured here on 2 shared CPU cores: BLIP-L's architecture (random weights, 12-token captions,
3 beams) takes about 3 s per image, 5 minutes per 100 images; the tests' tiny model does 100
in about 2 s. Captioning CIFAR-100 or ImageNet is a GPU job (README.md has the estimates).
"""
import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from functools import partial

import cli  # first: Ctrl-C while the rest imports is one line

import torch
import torch.distributed as dist
from tqdm import tqdm

import textteacher
from cli import UserError, need

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
COCA_PRETRAINED = "mscoco_finetuned_laion2B-s13B-b90k"  # the paper's CoCa: fine-tuned on COCO
SOT, EOT = 49406, 49407  # CLIP's <start_of_text> and <end_of_text>, between which CoCa writes


def parse_args(argv=None):
    p = cli.Parser(description="Caption every image of a data set once, for caption_embed.py")
    p.add_argument("--data", required=True, help="cifar100, imagenet, shapes or PATH",
                   type=cli.path("folder", names=tuple(textteacher.PRESETS)))
    p.add_argument("--data-dir", type=cli.path("new folder"),  # CIFAR is downloaded into it
                   help="the CIFAR-100 or ImageNet root (default: textteacher.py's)")
    p.add_argument("--split", choices=("train", "val"), default="train", help="which images")
    p.add_argument("--out", required=True, type=cli.path("new file"),
                   help="the caption file; its settings go to OUT.json")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    # BLIP-L: one of the paper's captioners and a widely used one, loadable by transformers
    # alone; the paper's headline CoCa needs open_clip, which most installs do not have.
    p.add_argument("--model", default=DEFAULT_MODEL, help="a transformers image-to-text model "
                   "(name or folder), or open_clip:ARCH[:PRETRAINED], e.g. open_clip:coca_ViT-L-14",
                   type=cli.path("folder", names=lambda text: text.startswith("open_clip:"),
                                 hub=True))
    # Beam search, no sampling: the same image always gets the same caption, as in the paper.
    # The upper ends are far above any use and keep a batch within a machine's memory: 1024
    # images at BLIP-L's 384 px are 1.8 GB of float32 pixels before the beams multiply them.
    p.add_argument("--num-beams", type=cli.number(int, "[1, 64]"), default=3,
                   help="beam width (1 = greedy)")
    p.add_argument("--max-new-tokens", type=cli.number(int, "[1, 4096]"), default=30,
                   help="longest caption, in tokens")
    p.add_argument("--batch-size", type=cli.number(int, "[1, 1024]"), default=32,
                   help="images per generate, per process")
    p.add_argument("--workers", type=cli.number(int, "[0, 256]"), default=4,
                   help="processes that read and resize images")
    p.add_argument("--device", type=str, default="auto",
                   help="auto (cuda if available), cpu, cuda, ...")
    args = p.parse_args(argv)
    if args.model.startswith("open_clip:") and args.model.count(":") == 1:
        args.model += f":{COCA_PRETRAINED}"  # written out, so that OUT.json names the weights
    # The device checked before anything loads: an unknown one, or a GPU that is not there,
    # would otherwise end in a traceback, after the data has been read.
    try:
        device = torch.device(args.device if args.device != "auto" else "cpu")
    except RuntimeError:  # torch's own message lists every device type it knows
        p.error(f"--device {args.device} is not a device: auto, cpu, cuda, cuda:1, ...")
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a GPU, or without a CUDA build of torch
        need(count > (device.index or 0), f"--device {args.device}: this machine has "
             f"{count or 'no'} CUDA GPU{'s' * (count != 1)}; use --device cpu or auto")
    elif device.type == "mps":
        need(torch.backends.mps.is_available(), f"--device {args.device}: this machine has no "
             "mps device; use --device cpu or auto")
    elif device.type != "cpu":
        p.error(f"--device {args.device}: caption_images.py runs on cpu, cuda or mps")
    return args


def write_json(obj, path):
    """Atomically: a temporary file beside path, then a rename, so no reader sees half of it;
    a failed write (a full disk) is one line naming the path."""
    cli.save_atomic(lambda f: f.write(json.dumps(obj, indent=2).encode()), path)


# ----------------------------------------------------------------------------
# Captioners: a transformers image-to-text model, or open_clip's CoCa (the paper's). Each
# loader returns (model, prepare, caption, info): prepare turns PIL images into the model's
# inputs in a loader worker (so it must pickle: a partial, not a closure), caption turns
# those inputs into strings, info goes into OUT.json.

def transformers_prepare(processor, images):
    return processor(images=images, return_tensors="pt")  # no text: the paper used no prompt


def load_transformers(name, num_beams, max_new_tokens):
    import transformers as hf
    hf.utils.logging.disable_progress_bar()  # a weight-loading bar per rank is noise
    # transformers 5 calls these models ImageTextToText; 4.x called them Vision2Seq
    auto = getattr(hf, "AutoModelForImageTextToText", None) or hf.AutoModelForVision2Seq
    try:
        config = hf.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:  # what transformers raises for a name it cannot find
        if os.path.isabs(name) or name.startswith(".") or os.path.isdir(name):
            raise UserError(f"{name} is not a model folder ({type(e).__name__}): pass one holding "
                            "config.json, the processor files and the weights") from None
        raise UserError(f"model {name!r} is not available offline; download it once where there "
                        f"is network (hf download {name}), or pass a local folder") from None
    if type(config) not in auto._model_mapping:  # checked before gigabytes of weights load
        raise UserError(f"{name} is a {config.model_type} model, not an image-to-text model; "
                        f"pass a captioner such as {DEFAULT_MODEL}")
    # A caption's tokens must fit the text decoder's positions (the last one is never fed
    # back), or generate fails with an index error deep in the model, in the middle of the run
    text = getattr(config, "text_config", None) or getattr(config, "decoder", None) or config
    limit = getattr(text, "max_position_embeddings", None)
    need(not isinstance(limit, int) or max_new_tokens <= limit, f"--max-new-tokens "
         f"{max_new_tokens} is more than {name} can write: at most {limit}")
    processor = hf.AutoProcessor.from_pretrained(name)
    model = auto.from_pretrained(name)
    # Stated in full: a model's own generation_config may sample, and sampling is not repeatable.
    decoding = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)

    def caption(inputs):
        ids = model.generate(**inputs, **decoding)  # [B, T], padded after each caption's end
        return processor.batch_decode(ids, skip_special_tokens=True)

    info = {"model_path": os.path.abspath(name) if os.path.isdir(name) else name,
            "revision": getattr(config, "_commit_hash", None),  # set when loaded from the hub
            "model_generation_config": model.generation_config.to_diff_dict(),
            "transformers": hf.__version__}
    return model, partial(transformers_prepare, processor), caption, info


def open_clip_prepare(transform, images):
    # open_clip's evaluation transform: resize, centre crop (224 px for ViT-L/14), CLIP's mean/std
    return {"pixel_values": torch.stack([transform(im) for im in images])}  # [B, 3, H, W]


def coca_beam_search(model, images, num_beams, max_new_tokens):
    """Each image's caption of highest mean log-probability per token among num_beams beams.
    My own 20 lines because open_clip's CoCa.generate needs transformers' BeamSearchScorer,
    which transformers 5 removed; this one runs the same under any version."""
    B, K = len(images), num_beams
    embs = model._encode_image(images)[1].repeat_interleave(K, 0)  # shape = [B * K, L, W]
    seqs = torch.full((B * K, 1), SOT, device=images.device)  # shape = [B * K, 1]
    scores = torch.zeros(B, K, device=images.device)
    scores[:, 1:] = -torch.inf  # the beams start equal: one expands, or all K would be one caption
    done = torch.zeros(B * K, dtype=torch.bool, device=images.device)
    for _ in range(max_new_tokens):
        # No cache of past keys and values: the prefix is encoded again at every step, as in
        # open_clip's own generate; captions are short, and the image side runs only once.
        logits = model.text_decoder(embs, model.text(seqs)[1])[:, -1]  # shape = [B * K, V]
        logp = logits.float().log_softmax(-1)
        logp[done] = -torch.inf
        logp[done, EOT] = 0  # a finished caption only grows by EOT and keeps its score
        V = logp.shape[-1]
        scores, idx = (scores.view(-1, 1) + logp).view(B, K * V).topk(K, dim=1)  # [B, K]
        rows = (idx // V + K * torch.arange(B, device=idx.device)[:, None]).view(-1)  # [B * K]
        seqs = torch.cat([seqs[rows], (idx % V).view(-1, 1)], 1)  # shape = [B * K, t + 1]
        done = done[rows] | (seqs[:, -1] == EOT)
        if done.all():
            break
    # Ranked by the mean, not the sum: a sum prefers short captions, each token costing log-prob.
    ended = seqs == EOT
    length = torch.where(ended.any(1), ended.int().argmax(1), seqs.shape[1] - 1)  # with EOT
    best = (scores.view(-1) / length).view(B, K).argmax(1)  # shape = [B]
    return seqs.view(B, K, -1)[torch.arange(B), best]  # shape = [B, T]


def load_open_clip(spec, num_beams, max_new_tokens):
    try:
        import open_clip
    except ImportError:
        raise UserError(f"--model {spec} needs open_clip: pip install open_clip_torch") from None
    _, arch, pretrained = spec.split(":", 2)
    logging.disable(logging.ERROR)  # open_clip logs each failure before raising it: one line here
    try:
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except (OSError, RuntimeError, ValueError) as e:  # an unknown name, weights not downloaded
        raise UserError(f"open_clip cannot load {arch} with weights {pretrained} offline "
                        f"({type(e).__name__}); download them once where there is network, or "
                        "pass a checkpoint file as PRETRAINED") from None
    if not hasattr(model, "text_decoder"):
        raise UserError(f"open_clip's {arch} is not a captioner; use a CoCa, e.g. coca_ViT-L-14")
    if max_new_tokens >= model.context_length:  # else its position embedding runs out mid-caption
        raise UserError(f"--max-new-tokens must be below CoCa's context {model.context_length}")

    def caption(inputs):
        ids = coca_beam_search(model, inputs["pixel_values"], num_beams, max_new_tokens)
        return [open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "")
                for row in ids]

    info = {"model_path": pretrained, "revision": None, "open_clip": open_clip.__version__}
    return model, partial(open_clip_prepare, transform), caption, info


# ----------------------------------------------------------------------------
# Images in, captions out: this rank's share, and the file it is written to

class Share(torch.utils.data.Dataset):
    """Images indices[j] of a dataset as (index, PIL image), or (index, error message) for a
    file that cannot be read: raised in a loader worker, the message would reach the user
    inside a traceback."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        try:
            return i, self.dataset[i][0]
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... by file format
            name = self.dataset.samples[i][0] if hasattr(self.dataset, "samples") else f"image {i}"
            return i, (f"cannot read image {name} ({type(e).__name__}); delete or replace the "
                       "file, then run the same command again to continue")


def collate(prepare, items):
    """(indices, model inputs, None), or (indices, None, the first error) for a bad image."""
    bad = next((im for _, im in items if isinstance(im, str)), None)
    images = None if bad else prepare([im for _, im in items])
    return [i for i, _ in items], images, bad


def resume_part(path, keys, share, parts):
    """How many captions of this rank's share an earlier run left in its part file: the
    complete lines, each checked to be the next image of the share. A last line torn by a
    kill mid-write is cut off, and that image captioned again."""
    done = good = 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                if done == len(share) or line.partition(b":\t")[0].decode() != keys[share[done]]:
                    raise UserError(f"{path}, line {done + 1}: not the caption of the next image, "
                                    f"so the data changed since; delete {parts} to start over")
                done, good = done + 1, good + len(line)
        os.truncate(path, good)
    return done


def merge(parts, world, keys, path):
    """Rank 0: image i is line i // world of part i % world, so reading the parts in turn
    gives key order, streamed into path (memory stays flat over a million images), each key
    checked where it belongs. Returns the sha256 of the merged file."""
    sha = hashlib.sha256()
    with contextlib.ExitStack() as stack, open(path, "wb") as f:
        files = [stack.enter_context(open(f"{parts}/rank{r}.txt", "rb")) for r in range(world)]
        for i, key in enumerate(keys):
            line, want = files[i % world].readline(), key.encode() + b":\t"
            if not (line.startswith(want) and line.endswith(b"\n")):
                raise UserError(f"{parts}/rank{i % world}.txt has no caption of {key} where it "
                                f"belongs; delete {parts} and caption again")
            f.write(line)
            sha.update(line)
        if any(p.readline() for p in files):  # every key exactly once: no line left over
            raise UserError(f"{parts} holds more captions than there are images; delete it")
        f.flush()
        os.fsync(f.fileno())  # on disk before a rename makes it visible
    return sha.hexdigest()


# ----------------------------------------------------------------------------
# Main: every cheap check first, then the model, this rank's share, the merge

def written_here(path):
    """Whether the caption file path is this script's: OUT.json beside it says so."""
    try:
        with open(f"{path}.json", encoding="utf-8") as f:
            return json.load(f).get("format") == "textteacher-captions-v1"
    except (OSError, ValueError, AttributeError):  # none, not JSON, not a dict
        return False


@cli.releasing  # the claim on --out ends with main
def main(argv=None):
    args = parse_args(argv)
    # One distributed path: torchrun sets RANK and WORLD_SIZE, a plain run is rank 0 of 1.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    where = os.path.dirname(os.path.abspath(args.out))
    try:  # that --out can be written is checked now, not after the model has loaded
        os.makedirs(where, exist_ok=True)
    except OSError as e:  # a file where a folder should be, a read-only disk...
        raise UserError(f"cannot write {args.out}: no folder {where} ({e.strerror})") from None
    if not os.access(where, os.W_OK):  # e.g. a shared data folder; root may write anywhere
        raise UserError(f"cannot write {args.out}: the folder {where} is read-only for you")
    # One process per output, claimed before anything is read or written: a second run with
    # the same --out would append to the same part files, and both would fail at the merge
    # after all their work. Rank 0 claims OUT (and so the whole run), every other rank its
    # part file, so that a second torchrun job is refused by each of its ranks alike.
    cli.lock(args.out if rank == 0 else f"{args.out}.parts/rank{rank}.txt", "--out")
    t0 = time.time()
    # --force replaces what this script wrote, never a file of the user's (an image, a config)
    if os.path.exists(args.out):
        need(args.force, f"{args.out} already exists; pass --force to replace it")
        need(written_here(args.out), f"{args.out} was not written by caption_images.py (no "
             f"{args.out}.json of its own beside it), and --force replaces only its own caption "
             "files: choose another --out")
    need(not os.path.exists(f"{args.out}.json") or written_here(args.out), f"{args.out}.json "
         "was not written by caption_images.py: choose another --out")
    device = args.device if args.device != "auto" else \
        f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    if cuda:  # before anything touches the GPU: each rank on its own, NCCL's barrier included
        torch.cuda.set_device(device)
    # bf16 halves memory and time on GPUs that have it; on CPU it is slower, so fp32 there.
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if world > 1:  # the ranks wait for the slowest at the end: more than the default 30 min
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))

    # The images and keys exactly as textteacher.py sees them, so the captions line up (a
    # 16-bit PNG scaled to 8 bits by its loader). A missing or empty data set is its
    # UserError, reported in one line like every other here.
    dataset, keys, _ = textteacher.image_split(args.data, args.data_dir, args.split)
    # All a caption depends on: a run that continues another must match it exactly. The batch
    # size and the workers are not here, as they do not change a caption (tested).
    settings = dict(model=args.model, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                    do_sample=False, prompt=None, dtype=str(dtype)[6:], data=args.data,
                    data_dir=args.data_dir, split=args.split, images=len(keys), world_size=world)
    parts = f"{args.out}.parts"
    # Every rank reads settings.json itself (rank 0 writes it atomically), so all decide alike.
    if os.path.exists(f"{parts}/settings.json"):
        with open(f"{parts}/settings.json", encoding="utf-8") as f:
            old = json.load(f)
        diff = [f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise UserError(f"{parts} holds an unfinished run with other settings "
                            f"({', '.join(diff)}): rerun it as it was, or delete {parts}")
    # Interleaved shares: the next image of a rank is its part file's line count, and image i
    # is found in part i % world without an index, however many images there are.
    share = range(rank, len(keys), world)
    part = f"{parts}/rank{rank}.txt"
    done = resume_part(part, keys, share, parts)

    # ------------------------------------------------------------------------
    # The model, loaded only once every check above has passed
    load = load_open_clip if args.model.startswith("open_clip:") else load_transformers
    model, prepare, caption, info = load(args.model, args.num_beams, args.max_new_tokens)
    model.to(device=device, dtype=dtype).eval()  # eval: no dropout, a caption is its image's
    os.makedirs(parts, exist_ok=True)
    if rank == 0:
        write_json(settings, f"{parts}/settings.json")
        print(f"captioning {len(keys)} images of {args.data}/{args.split} with {args.model} on "
              f"{world} x {device.split(':')[0]} ({settings['dtype']}), {done * world} done before")
    if world > 1:  # no rank writes a caption before the settings it belongs to are on disk
        dist.barrier()
    loader = torch.utils.data.DataLoader(Share(dataset, share[done:]), args.batch_size,
                                         num_workers=args.workers,
                                         collate_fn=partial(collate, prepare))
    # Rank 0's bar stands for all: every rank captions about as many images at about its speed.
    # disable=None: a bar on a terminal only, so that a log file or a test sees no bar lines.
    bar = tqdm(total=len(keys), initial=done * world, unit="img", disable=rank > 0 or None)
    t1 = time.time()
    # Unbuffered: after a failed write (a full disk) nothing is left to write at close, which
    # would fail again, without the path in its message
    with open(part, "ab", buffering=0) as f, bar, torch.inference_mode():
        for indices, inputs, bad in loader:
            if bad:
                raise UserError(bad)
            # Pixels in the model's dtype (bf16 on a GPU); token ids, where any, stay integers.
            inputs = {k: v.to(device, dtype if v.is_floating_point() else None)
                      for k, v in inputs.items()}
            # One line per caption: whitespace (a newline, a tab) in a caption would break it.
            lines = "".join(f"{keys[i]}:\t{' '.join(c.split())}\n"
                            for i, c in zip(indices, caption(inputs))).encode()
            try:
                while lines:  # a raw write may take part of the bytes (a disk filling up)
                    lines = lines[f.write(lines):]
                os.fsync(f.fileno())  # on disk now: a kill loses at most the batch in flight
            except OSError as e:  # a full disk: the captions so far stay, a torn line is cut
                raise cli.os_error(e, part) from None
            bar.update(len(indices) * world)
    rate = (len(share) - done) * world / max(time.time() - t1, 1e-9)

    # ------------------------------------------------------------------------
    # The merge, on rank 0 once every share is complete, into a file in OUT.parts/ that a
    # rename puts in place: OUT appears whole or not at all. OUT.json is written just before,
    # so OUT never exists without it (a kill in between leaves an OUT.json whose
    # captions_sha256 matches no OUT, never captions without their settings).
    if world > 1:
        dist.barrier()
    if rank == 0:
        try:  # a full disk at the merge: every caption stays in the parts, for a rerun
            sha = merge(parts, world, keys, f"{parts}/merged.txt")
        except OSError as e:
            raise cli.os_error(e, f"{parts}/merged.txt") from None
        write_json({"format": "textteacher-captions-v1", **settings, **info,
                    "torch": torch.__version__, "captions_sha256": sha}, f"{args.out}.json")
        os.replace(f"{parts}/merged.txt", args.out)
        shutil.rmtree(parts)
        print(f"wrote {args.out}: {len(keys)} captions of {args.data}/{args.split} in "
              f"{time.time() - t0:.0f} s ({rate:.1f} images/s)")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli.run(main, interrupted="the captions written so far are kept: run the same command again "
            "to continue")

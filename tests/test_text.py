"""
Text as editors write it: every reader of text the user gives (a caption file in the paper's
format, caption tables as .tsv, .csv and .jsonl, a class-name file), against every encoding and
line ending editors save with. UTF-8 with or without a byte-order mark, UTF-16 with one, and
LF, CR LF or the old Mac's CR all read exactly as UTF-8 with LF; what cannot be read (Latin-1
bytes, UTF-16 without its mark) is one line naming the file. All through cli.read_text.
"""
import pytest

import caption_embed
from cli import UserError

CAPTIONS = [("train/cat/0001.jpg", "a café sign, \"open\": 24 h"),
            ("train/dog/0002.jpg", "a dog — on a sofa"),
            ("train/cat/0003.jpg", "ünïcödé ✓")]


def paper(rows):
    return "".join(f"{k}:\t{c}\n" for k, c in rows)


def tsv(rows):
    return "path\tcaption\textra\n" + "".join(f"{k}\t{c}\tx\n" for k, c in rows)


def csv(rows):
    return "path,caption\n" + "".join(f'{k},"{c.replace(chr(34), 2 * chr(34))}"\n'
                                      for k, c in rows)


def jsonl(rows):
    import json
    return "".join(json.dumps({"path": k, "caption": c}, ensure_ascii=False) + "\n"
                   for k, c in rows)


def names(rows):
    return "cat\tcat, domestic\ndog\tdog\n"


def read_names(path):
    keys, texts, _ = caption_embed.class_prompts(str(path.parent / "d"), "", str(path))
    return keys, texts


READERS = {  # name: (file name, its text from the rows, how it is read)
    "caption file": ("c.txt", paper, lambda p: caption_embed.read_captions(str(p))[:2]),
    "table .tsv": ("c.tsv", tsv, lambda p: caption_embed.read_captions(
        str(p), ("path", "caption"))[:2]),
    "table .csv": ("c.csv", csv, lambda p: caption_embed.read_captions(
        str(p), ("path", "caption"))[:2]),
    "table .jsonl": ("c.jsonl", jsonl, lambda p: caption_embed.read_captions(
        str(p), ("path", "caption"))[:2]),
    "class names": ("names.txt", names, read_names),
}
ENCODINGS = {"utf-8": "utf-8", "utf-8 with BOM": "utf-8-sig", "utf-16 with BOM": "utf-16",
             "utf-16-be with BOM": None}
ENDINGS = {"LF": "\n", "CR LF": "\r\n", "CR": "\r"}


def encode(text, encoding):
    if encoding is None:
        return b"\xfe\xff" + text.encode("utf-16-be")
    return text.encode(encoding)


@pytest.fixture
def classes(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_reads_every_encoding_and_line_ending_alike(reader, encoding, ending,
                                                                 classes):
    name, write, read = READERS[reader]
    text = write(CAPTIONS)
    reference = classes / ("ref-" + name)
    reference.write_bytes(text.encode("utf-8"))
    path = classes / name
    path.write_bytes(encode(text.replace("\n", ENDINGS[ending]), ENCODINGS[encoding]))
    want = read(reference)
    assert read(path) == want
    if reader != "class names":
        assert want == ([k for k, _ in CAPTIONS], [c for _, c in CAPTIONS])  # no line merged


ASCII = [("train/cat/0001.jpg", "a cat"), ("train/dog/0002.jpg", "a dog")]


@pytest.mark.parametrize("bad, rows, words", [
    (lambda t: t.encode("latin-1", errors="replace"), CAPTIONS, "is not UTF-8 text (byte 0xe9"),
    (lambda t: t.encode("utf-16-le"), ASCII, "holds NUL bytes (UTF-16 without a byte-order "
                                             "mark?)"),
], ids=["latin-1", "utf-16-without-bom"])
@pytest.mark.parametrize("reader", READERS)
def test_an_encoding_no_reader_can_read_is_one_line_naming_the_file(reader, bad, rows, words,
                                                                    classes):
    name, write, read = READERS[reader]
    path = classes / name
    text = write(rows) if reader != "class names" else (
        "cat\tcafé\n" if rows is CAPTIONS else "cat\tcat\n")
    path.write_bytes(bad(text))
    with pytest.raises(UserError, match=r".*" + words.replace("(", r"\(").replace(")", r"\)")
                       .replace("?", r"\?")) as e:
        read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)

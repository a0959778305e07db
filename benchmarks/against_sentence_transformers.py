"""caption_embed.py's encoder against sentence-transformers' encode, side by side in one process.

    pip install sentence-transformers    # for this script only; the project does not depend on it
    python benchmarks/against_sentence_transformers.py          # all-MiniLM-L6-v2, batch 32 and 64

Both encode the same captions (5-30 words, drawn from a fixed vocabulary with a fixed seed) with the
same model files, batch size and threads. The captions go in chunks of 500; for every chunk the two
take turns, in alternating order, so that a slow phase of the machine hits both. Reported:
captions/s (median over chunks), the median of per-chunk speed ratios, and the largest difference
between the two sets of vectors (all captions in one call each).
"""

import contextlib
import io
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402  (first: Ctrl-C while the rest imports is one line)

import torch

import caption_embed  # noqa: E402

WORDS = (
    "a the dog cat man woman child red blue large small old standing sitting running near on "
    "under beside "
    "field street table water sky tree car bus boat bird plate food with and of in two three "
    "people holding "
    "looking white black green wooden kitchen beach snow grass building train horse player ball"
).split()


def captions(n, seed=0):
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))).capitalize() + "."
        for _ in range(n)
    ]


def main(argv=None):
    p = caption_embed.Parser(description=__doc__.split("\n\n")[0])  # a bad flag: one line
    p.add_argument("--encoder", default=caption_embed.DEFAULT_ENCODER,
                   type=cli.path("folder", hub=True), help="Hugging Face name or folder")
    # the upper ends: a benchmark of minutes, and caption_embed.py's largest --batch-size
    p.add_argument("--captions", type=cli.number(int, "[1, 1000000]"), default=2000)
    p.add_argument("--chunk", type=cli.number(int, "[1, 1000000]"), default=500,
                   help="captions per timed call")
    p.add_argument("--rounds", type=cli.number(int, "[1, 1000]"), default=6,
                   help="passes over all captions")
    p.add_argument("--batch-size", type=cli.number(int, "[1, 4096]"), nargs="+",
                   default=[32, 64])
    args = p.parse_args(argv)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise cli.UserError("this comparison needs sentence-transformers: pip install "
                            "sentence-transformers") from None

    texts = captions(args.captions)
    ours = caption_embed.TextEncoder(args.encoder, device="cpu")
    theirs = SentenceTransformer(caption_embed.resolve_encoder(args.encoder), device="cpu")

    def run(name, chunk, batch_size):
        if name == "caption_embed":
            with contextlib.redirect_stderr(
                io.StringIO()
            ):  # its progress line is not what is timed
                return ours.encode(chunk, batch_size)
        return theirs.encode(
            chunk, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
        ).cpu()

    names = ["caption_embed", "sentence-transformers"]
    for name in names:
        run(name, texts[:64], 32)  # warm-up
    print(
        f"{args.encoder}, {args.captions} captions of 5-30 words, cpu, {torch.get_num_threads()} "
        "threads; "
        f"{args.rounds} rounds of chunks of {args.chunk}"
    )
    result = {}
    for batch_size in args.batch_size:
        times = {name: [] for name in names}
        for r in range(args.rounds):
            for j, start in enumerate(range(0, len(texts), args.chunk)):
                chunk = texts[start : start + args.chunk]
                for name in names if (r + j) % 2 == 0 else names[::-1]:
                    t = time.perf_counter()
                    run(name, chunk, batch_size)
                    times[name].append(
                        (time.perf_counter() - t) / len(chunk)
                    )  # seconds per caption
        gap = (
            (run(names[0], texts, batch_size) - run(names[1], texts, batch_size)).abs().max().item()
        )
        ratio = statistics.median(b / a for a, b in zip(times[names[0]], times[names[1]]))
        rate = {name: 1 / statistics.median(t) for name, t in times.items()}
        result[batch_size] = dict(
            speed_ratio=ratio, max_abs_difference=gap, **{f"{n}_per_s": v for n, v in rate.items()}
        )
        print(
            f"  batch {batch_size:3d}  caption_embed {rate[names[0]]:6.1f} captions/s, "
            "sentence-transformers "
            f"{rate[names[1]]:6.1f} captions/s: caption_embed is {ratio:.3f}x as fast; vectors "
            f"differ by at most {gap:.1e}"
        )
    return result


if __name__ == "__main__":
    cli.run(main, interrupted="nothing was written")

"""Sentence similarity with a kiln artifact, and its speed against PyTorch (transformers) on the same weights.

    python examples/similarity.py ARTIFACT_DIR [CHECKPOINT_DIR]

The artifact comes from `kiln export`; the checkpoint (default: the artifact's recorded source) is loaded with
transformers for the comparison, if transformers is installed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import kiln
from kiln.artifact import load_manifest

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]


def median_ms(fn, rounds: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def torch_embedder(checkpoint: str, threads: int):
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer, model = AutoTokenizer.from_pretrained(checkpoint), AutoModel.from_pretrained(checkpoint).eval()

    def embed(texts):
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()

    return embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    pipe = kiln.pipeline("feature-extraction", args.artifact, threads=args.threads)
    embeddings = np.array(pipe(SENTENCES, pooling="mean", normalize=True))  # (N, C), unit length
    sims = embeddings @ embeddings.T
    print(f"{len(SENTENCES)} sentences -> {embeddings.shape[1]}-dim embeddings; most similar pairs (cosine):")
    pairs = sorted(((sims[i, j], i, j) for i in range(len(SENTENCES)) for j in range(i + 1, len(SENTENCES))), reverse=True)
    for score, i, j in pairs[:4]:
        print(f"  {score:.4f}  {SENTENCES[i]!r} ~ {SENTENCES[j]!r}")

    checkpoint = args.checkpoint or load_manifest(args.artifact)["source"]["path"]
    try:
        embed = torch_embedder(checkpoint, args.threads)
    except ImportError:
        print("transformers/torch not installed: skipping the speed comparison")
        return
    reference = embed(SENTENCES)
    print(f"\nagreement with PyTorch: min cosine {float((reference * embeddings).sum(-1).min()):.6f}")
    print(f"speed, {args.threads} threads, median of 20 calls:")
    for label, texts in (("1 sentence", SENTENCES[:1]), (f"batch of {len(SENTENCES)}", SENTENCES)):
        ours = median_ms(lambda: pipe(texts, pooling="mean", normalize=True))
        theirs = median_ms(lambda: embed(texts))
        print(f"  {label:<12} kiln {ours:7.2f} ms   PyTorch (transformers) {theirs:7.2f} ms   -> {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()

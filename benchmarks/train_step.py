"""Where one aTLAS / DV-BASI training step spends its time: the fused merge or the model.

    python -m fastmerge.benchmarks.train_step [--model ViT-B-32] [--batch 16] [--tasks 1 8] [--reps 5]

A step is: merged = block_scale(base, vectors, Λ, blocks) (fused forward), the encoder's forward
and backward on a batch with the merged buffer bound as its parameters (functional_call), then the
fused backward of the merge for ∂L/∂Λ. The three parts are timed separately (medians over
``--reps`` steps after one warm-up step), for T = 1 vector (DV-BASI) and T = 8 (aTLAS), with one
coefficient block per parameter tensor (``--blocks row`` for one per row). The model is created from a random initialisation (the
layout and the arithmetic are what matter here), and the images are random.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def measure(model_name: str, batch: int, n_vectors: int, reps: int, image_size=None, blocks: str = "tensor") -> dict:
    import fastmerge
    from fastmerge import models
    from fastmerge.flat import FlatLayout

    clip, _, _ = models.load_clip(model_name)
    enc = clip.visual.requires_grad_(False)
    del clip
    layout = FlatLayout.from_module(enc)
    base = layout.flatten(enc)
    g = torch.Generator().manual_seed(0)
    vectors = [1e-3 * torch.randn(base.shape, generator=g) for _ in range(n_vectors)]
    offsets = layout.block_offsets(blocks)
    coefs = torch.full((n_vectors, offsets.numel() - 1), 0.3, requires_grad=True)
    size = image_size or (enc.image_size[0] if isinstance(getattr(enc, "image_size", None), tuple) else 224)
    images = torch.randn(batch, 3, size, size, generator=g)
    head = F.normalize(torch.randn(10, enc.output_dim, generator=g), dim=-1) * 100
    labels = torch.randint(0, 10, (batch,), generator=g)
    times = {"merge_forward": [], "model_forward_backward": [], "merge_backward": []}
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        merged = fastmerge.block_scale(base, vectors, coefs, offsets)
        t1 = time.perf_counter()
        leaf = merged.detach().requires_grad_(True)
        feats = torch.func.functional_call(enc, layout.unflatten(leaf), (images,))
        loss = F.cross_entropy(F.normalize(feats, dim=-1) @ head.t(), labels)
        loss.backward()
        t2 = time.perf_counter()
        coefs.grad = None
        merged.backward(leaf.grad)
        t3 = time.perf_counter()
        if rep:  # the first step warms up allocators and caches
            times["merge_forward"].append(t1 - t0)
            times["model_forward_backward"].append(t2 - t1)
            times["merge_backward"].append(t3 - t2)
        del merged, leaf, feats, loss
    med = {k: statistics.median(v) for k, v in times.items()}
    med["merge_total"] = med["merge_forward"] + med["merge_backward"]
    return dict(model=model_name, d=base.numel(), blocks=offsets.numel() - 1, vectors=n_vectors, batch=batch,
                image_size=size, threads=torch.get_num_threads(), reps=reps, median_s=med)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 8], help="numbers of vectors T (default 1 8)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--blocks", default="tensor", choices=["tensor", "row", "global"],
                   help="coefficient blocks (default: one per parameter tensor)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    rows = []
    print(f"{'T':>3} {'merge fwd':>10} {'merge bwd':>10} {'merge total':>12} {'model fwd+bwd':>14}  ratio")
    for T in args.tasks:
        r = measure(args.model, args.batch, T, args.reps, blocks=args.blocks)
        m = r["median_s"]
        print(f"{T:>3} {m['merge_forward'] * 1e3:>8.1f}ms {m['merge_backward'] * 1e3:>8.1f}ms "
              f"{m['merge_total'] * 1e3:>10.1f}ms {m['model_forward_backward'] * 1e3:>12.1f}ms  "
              f"{m['merge_total'] / m['model_forward_backward']:.3f}", flush=True)
        rows.append(r)
    print(f"model {args.model}, d = {rows[0]['d']:,}, {rows[0]['blocks']} blocks, batch {args.batch} of "
          f"{rows[0]['image_size']}x{rows[0]['image_size']}, {rows[0]['threads']} threads, medians of {args.reps}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

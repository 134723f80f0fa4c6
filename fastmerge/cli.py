"""Command-line interface: ``fastmerge <command> ...`` (also ``python -m fastmerge``).

Each command is one entry in ``COMMANDS``: a function that fills its argparse sub-parser and one
that runs it with the parsed arguments and returns the exit status. Heavy imports happen inside the
run functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Callable, NamedTuple, Optional, Sequence


PRETRAINED_HELP = ("builtin (fastmerge-vit-tiny pretrained on fastmerge's generated image-caption corpus, trained "
                   "and cached on first use), none (a seeded random initialisation), a checkpoint file written by "
                   "`fastmerge pretrain --out`, or an open_clip tag such as openai")


class Command(NamedTuple):
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------ bench

def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from fastmerge.benchmarks import runner

    runner.add_arguments(p)


def _bench_run(args: argparse.Namespace) -> int:
    from fastmerge.benchmarks import runner

    return runner.run(args)


# ------------------------------------------------------------------------------------ mima

def _mima_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", "-N", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N",
                   help="numbers of MIMA iterations to sweep under one budget (default: 1 2 4 8)")
    p.add_argument("--model", default=None,
                   help="open_clip model: ViT-B-32, ViT-B-16, ViT-L-14 or fastmerge-vit-tiny "
                        "(default: fastmerge-vit-tiny on the built-in suite, ViT-B-32 with --data-root)")
    p.add_argument("--pretrained", default=None,
                   help="the starting CLIP: " + PRETRAINED_HELP + ". Default: builtin on the built-in suite, none otherwise")
    p.add_argument("--data-root", default=None,
                   help="folder holding the paper's eight datasets (default: the built-in suite)")
    p.add_argument("--tasks", nargs="+", default=None, help="task names (default: all of the data source)")
    p.add_argument("--steps", "-S", type=int, default=None, help="fine-tuning budget S per task (default 480; 2000 with --data-root)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (128 with --data-root)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-4 from the built-in pretrained CLIP, 2e-3 with --pretrained none, "
                        "1e-5 with --data-root)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps of the cosine schedule (default S/10)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="run K seeds (seed, seed+1, ...) into OUT/seed-S and report mean ± std over them (default 1)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="test images per task for the per-iteration evaluations (default: all)")
    p.add_argument("--ties-density", type=float, default=0.2)
    p.add_argument("--out", default="runs/mima", help="output folder (default: runs/mima)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished iteration")
    p.add_argument("--no-checkpoints", action="store_true", help="do not write safetensors checkpoints")
    p.add_argument("--landscape", nargs=2, default=None, metavar=("TASK_A", "TASK_B"),
                   help="tasks of the error-landscape slice (default: the first two tasks)")
    p.add_argument("--no-landscape", action="store_true", help="skip the error landscape")
    p.add_argument("--landscape-grid", type=int, default=9, help="grid points per axis of the landscape")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader workers for folder datasets")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def _mima_run(args: argparse.Namespace) -> int:
    import os

    import torch

    from fastmerge.mima import MimaConfig, _Stopped, run_mima_seeds

    if args.threads:
        torch.set_num_threads(args.threads)
    elif "LOCAL_WORLD_SIZE" in os.environ and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    landscape = None if args.no_landscape else (tuple(args.landscape) if args.landscape else "auto")
    cfg = MimaConfig(iterations=args.iterations, model=args.model, pretrained=args.pretrained, data_root=args.data_root,
                     tasks=args.tasks, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed, eval_limit=args.eval_limit,
                     ties_density=args.ties_density, out=args.out, checkpoints=not args.no_checkpoints,
                     landscape=landscape, landscape_grid=args.landscape_grid, device=args.device,
                     num_workers=args.num_workers, progress=not args.no_progress)
    try:
        run_mima_seeds(cfg, args.seeds, resume=args.resume, stop_after=args.stop_after)
    except _Stopped as exc:
        print(f"{exc}; continue with --resume", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"fastmerge mima: error: {exc}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------ pretrain

def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000)")
    p.add_argument("--corpus-size", type=int, default=None, help="generated image-caption pairs (default 60000)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 256)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 150, at most steps / 10)")
    p.add_argument("--seed", type=int, default=None, help="seed of the initialisation, corpus and batches (default 0)")
    p.add_argument("--force", action="store_true", help="train again even when a valid cached checkpoint exists")
    p.add_argument("--out", default=None, metavar="FILE.pt",
                   help="also copy the checkpoint (and its .json record) here, for --pretrained FILE.pt")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _pretrain_run(args: argparse.Namespace) -> int:
    import json
    import shutil
    from dataclasses import replace
    from pathlib import Path

    import torch

    from fastmerge.pretrain import DEFAULT, ensure_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    given = dict(steps=args.steps, corpus_size=args.corpus_size, batch_size=args.batch_size, lr=args.lr,
                 seed=args.seed, warmup=args.warmup)
    if args.warmup is None and args.steps is not None:
        given["warmup"] = min(DEFAULT.warmup, args.steps // 10)
    try:
        cfg = replace(DEFAULT, **{k: v for k, v in given.items() if v is not None}).check()
        path = ensure_pretrained(cfg, progress=not args.no_progress, force=args.force)
    except ValueError as exc:
        print(f"fastmerge pretrain: error: {exc}", file=sys.stderr)
        return 2
    rec = json.loads(path.with_suffix(".json").read_text())
    print(f"checkpoint: {path} (sha256 {rec['sha256'][:16]}…), trained in {rec['seconds']:.0f} s on "
          f"{rec['threads']} threads")
    if "zero_shot" in rec:
        print("| task | zero-shot test accuracy (%) |\n|---|---|")
        for name, acc in rec["zero_shot"].items():
            print(f"| {name} | {acc:.1f} |")
        print(f"| **mean** | **{rec['zero_shot_mean']:.1f}** |")
        print(f"colour–shape pairs, classified among all {round(100 / rec['pairs_chance'])} captions: seen in the "
              f"corpus {rec['pairs_seen']:.1f} %, held out from it {rec['pairs_held_out']:.1f} % "
              f"(chance {rec['pairs_chance']:.1f} %)")
    if args.out:
        dest = Path(args.out)
        if dest.suffix != ".pt":
            print(f"fastmerge pretrain: error: --out must name a .pt file, got {dest}", file=sys.stderr)
            return 2
        if dest.resolve() != path.resolve():
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                shutil.copyfile(path.with_suffix(".json"), dest.with_suffix(".json"))
            except OSError as exc:
                print(f"fastmerge pretrain: error: cannot copy the checkpoint to {dest}: {exc}", file=sys.stderr)
                return 2
        print(f"copied to {dest}")
    return 0


# ------------------------------------------------------------------------------ atlas / dvbasi

def _edit_arguments(p: argparse.ArgumentParser, dv: bool) -> None:
    p.add_argument("--out", default="runs/dvbasi" if dv else "runs/atlas", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished iteration")
    p.add_argument("--objective", default="supervised", choices=["supervised", "unsupervised", "mgda"],
                   help="cross-entropy over the tasks, a label-free loss on unlabeled images, or MGDA over "
                        "per-task losses")
    p.add_argument("--unsupervised-loss", default="im", choices=["im", "entropy"],
                   help="label-free loss of the unsupervised objective: im (prediction entropy minus the entropy "
                        "of the batch's mean prediction, default) or entropy (prediction entropy alone, the paper's "
                        "surrogate, which can collapse onto one class)")
    p.add_argument("--unlabeled", default="train", choices=["train", "test"],
                   help="images of the unsupervised objective: the train split (default), or the unlabeled test "
                        "images (test-time adaptation, AdaMerging's protocol); selection always uses validation")
    p.add_argument("--blocks", default="tensor", choices=["tensor", "row", "global"],
                   help="coefficient blocks: one per parameter tensor (default), per row, or one in all")
    p.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate of the coefficients (default 0.01)")
    p.add_argument("--epochs", type=int, default=20, help="most epochs per coefficient search (default 20)")
    p.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (default 3)")
    p.add_argument("--steps-per-epoch", type=int, default=10, help="optimizer steps per epoch (default 10)")
    p.add_argument("--batch-size", type=int, default=64, help="images per task per step (default 64)")
    p.add_argument("--atlas-init", type=float, default=0.3, help="initial aTLAS coefficients (default 0.3)")
    p.add_argument("--atlas-objective", default=None, choices=["supervised", "unsupervised", "mgda"],
                   help="objective of the aTLAS θ_0 when it differs from --objective")
    if dv:
        p.add_argument("--atlas-blocks", default=None, choices=["tensor", "row", "global"],
                       help="blocks of the aTLAS θ_0 (default: the same as --blocks)")
    if dv:
        p.add_argument("--iterations", "-M", type=int, default=3, help="outer iterations M (default 3)")
        p.add_argument("--init-merge", default="atlas", choices=["task_arithmetic", "ties", "atlas"],
                       help="how θ_0 is made from the task models (default atlas)")
        p.add_argument("--alpha", type=float, default=0.1, help="initial Λ of each iteration (default 0.1)")
        p.add_argument("--ablations", nargs="*", default=[], choices=["isotropic", "random"],
                       help="also run these variants from the same θ_0 (the paper's Table 1)")
        p.add_argument("--single-task", default=None, metavar="TASK",
                       help="single-task mode: θ_0 = this task's fine-tuned model, trained on that task only")
        p.add_argument("--negate", default=None, metavar="TARGET", help="task negation: forget this task")
        p.add_argument("--control", default=None, metavar="TASK",
                       help="task negation: keep >= 95 %% of the pretrained accuracy on this task")
    p.add_argument("--task-models", default=None,
                   help="folder with task-<name>.safetensors fine-tuned models (default: fine-tune them first); "
                        "{seed} in it is replaced by the run's seed, e.g. runs/mima/seed-{seed}/N1/checkpoints")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps per task when fine-tuning")
    p.add_argument("--model", default=None, help="open_clip model (default: fastmerge-vit-tiny on the built-in suite)")
    p.add_argument("--pretrained", default=None,
                   help="the starting CLIP: " + PRETRAINED_HELP + ". Default: builtin on the built-in suite, none otherwise")
    p.add_argument("--data-root", default=None, help="folder of the paper's datasets (default: the built-in suite)")
    p.add_argument("--tasks", nargs="+", default=None, help="task names (default: all)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="run K seeds (seed, seed+1, ...) into OUT/seed-S and report mean ± std over them (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _edit_run(args: argparse.Namespace, dv: bool) -> int:
    import torch

    from fastmerge.dvbasi import CoefConfig, DVBasiConfig, run_dvbasi_seeds

    if args.threads:
        torch.set_num_threads(args.threads)
    coef = CoefConfig(lr=args.lr, epochs=args.epochs, patience=args.patience, steps_per_epoch=args.steps_per_epoch,
                      batch_size=args.batch_size, seed=args.seed, unlabeled_split=args.unlabeled,
                      unsupervised_loss=args.unsupervised_loss)
    extra = {}
    if dv:
        extra = dict(iterations=args.iterations, init_merge=args.init_merge, alpha=args.alpha,
                     ablations=tuple(args.ablations), single_task=args.single_task, negate=args.negate,
                     control=args.control)
    cfg = DVBasiConfig(out=args.out, objective=args.objective, blocks=args.blocks, atlas_only=not dv,
                       task_models=args.task_models, coef=coef, atlas_init=args.atlas_init, model=args.model,
                       atlas_objective=args.atlas_objective,
                       atlas_blocks=args.atlas_blocks if dv else args.blocks,
                       pretrained=args.pretrained, data_root=args.data_root, tasks=args.tasks,
                       finetune_steps=args.finetune_steps, seed=args.seed, progress=not args.no_progress, **extra)
    try:
        run_dvbasi_seeds(cfg, args.seeds, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"fastmerge {'dvbasi' if dv else 'atlas'}: error: {exc}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------ merge

def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="mergekit-style YAML config (merge_method, base_model, models or slices, ...)")
    p.add_argument("out_dir", help="output folder (appears only when the merge is complete)")
    p.add_argument("--out-shard-size", default="5B",
                   help="largest output shard, in bytes or with a suffix: 500M, 2G, 5B (= 5e9; default 5B)")
    p.add_argument("--random-seed", type=int, default=None, help="seed of DARE / DELLA's random stream (default 0)")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer files of tokenizer_source (default: the base model)")
    p.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md naming the inputs, the method and the config")
    p.add_argument("--device", default="cpu", help="cpu (fused C++ kernels) or cuda (PyTorch formulations on the GPU; under torchrun "
                        "cuda:LOCAL_RANK, with NCCL)")
    p.add_argument("--allow-crimes", action="store_true", help="merge models of different architectures")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the kernels (default: torch's choice)")
    p.add_argument("--max-memory", default="2G",
                   help="resident memory the merge aims at, mapped input pages counted (default 2G). A tensor whose "
                        "inputs fit what is left after the runtime and the buffers stays mapped through all its passes "
                        "(the magnitude selections then read it once); a larger one is read chunk by chunk")
    p.add_argument("--readers", type=int, default=4,
                   help="threads that read the inputs from disk ahead of the kernels, about 1 GB ahead (default 4; "
                        "0: none, the kernels' page faults read them)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (tensors, bytes in and out, memory needed) and stop; reads headers only")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary line")
    p.add_argument("--prefetch", type=int, default=2, help="tensors read ahead on a helper thread (default 2)")
    p.add_argument("--reference", action="store_true",
                   help="run the methods' pure-PyTorch twins instead of the fused kernels (slow; for verification)")
    p.add_argument("--resume", action="store_true",
                   help="finish the partial output (.OUT_DIR.partial) that an interrupted or failed attempt left: its "
                        "tensors are verified by checksum and skipped")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a rank waits for the others at a sync point before it reports a "
                        "timeout (default 1800)")
    p.add_argument("--stats-json", default=None, metavar="PATH",
                   help="write the result as JSON: tensors, bytes, seconds and, under torchrun, each rank's figures "
                        "(wall time, peak RSS, bytes all-reduced)")


def _terminate_as_interrupt() -> None:
    """SIGTERM (how torchrun stops the other ranks when one fails, or a scheduler cancels a job) stops the
    merge as cleanly as Ctrl-C does."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)


def _merge_run(args: argparse.Namespace) -> int:
    import os

    from fastmerge.merge import MergeOptions, dry_run, merge_checkpoints

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    who = f"fastmerge merge [rank {os.environ.get('RANK', '0')}/{world}]" if world > 1 else "fastmerge merge"
    _terminate_as_interrupt()
    try:
        from fastmerge.merge.io import parse_size

        opts = MergeOptions(out_shard_size=parse_size(args.out_shard_size), random_seed=args.random_seed,
                            copy_tokenizer=args.copy_tokenizer, write_model_card=args.write_model_card,
                            device=args.device, allow_crimes=args.allow_crimes, threads=args.threads,
                            overwrite=args.overwrite, quiet=args.quiet, prefetch=max(0, args.prefetch),
                            reference=args.reference, resume=args.resume, timeout=args.timeout,
                            max_memory=parse_size(args.max_memory), readers=args.readers)
        if args.dry_run:
            if os.environ.get("RANK", "0") == "0":
                print(dry_run(args.config, opts))
            return 0
        res = merge_checkpoints(args.config, args.out_dir, opts)
    except KeyboardInterrupt as exc:
        why = f"terminated by {exc}" if str(exc) else "interrupted"
        print(f"{who}: {why}; {args.out_dir} was not created", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback: every error names the model, tensor and fix
        from fastmerge.merge import MergeInterrupted

        if isinstance(exc, MergeInterrupted):
            print(f"{who}: {exc}", file=sys.stderr)
            return 130
        if not isinstance(exc, (ValueError, RuntimeError, OSError)):
            raise
        print(f"{who}: error: {exc}", file=sys.stderr)
        return 2
    if res.rank == 0:
        if not args.quiet:
            print(res.summary())
        if args.stats_json:
            import dataclasses
            import json

            with open(args.stats_json, "w") as f:
                json.dump(dataclasses.asdict(res), f, indent=2)
                f.write("\n")
    return 0


def _bench_merge_arguments(p: argparse.ArgumentParser) -> None:
    from fastmerge.benchmarks import merge_bench

    merge_bench.add_arguments(p)


def _bench_merge_run(args: argparse.Namespace) -> int:
    from fastmerge.benchmarks import merge_bench

    return merge_bench.run(args)


COMMANDS: dict[str, Command] = {
    "atlas": Command(
        help="aTLAS: learn per-block coefficients of the task vectors (supervised or unsupervised)",
        description=(
            "Merge the task models as θ_pre + Σ_t Λ_t τ_t with per-block coefficients Λ learned by AdamW on "
            "the fused block_scale op, with early stopping on validation accuracy. Runs on the built-in suite "
            "by default, fine-tuning its task models first unless --task-models is given."
        ),
        add_arguments=lambda p: _edit_arguments(p, False),
        run=lambda a: _edit_run(a, False),
    ),
    "dvbasi": Command(
        help="DV-BASI: iterated anisotropic scaling of difference vectors from a merged model",
        description=(
            "From θ_0 (task arithmetic, TIES or aTLAS), run M outer iterations of DV-BASI: δ = θ_{m-1} − θ_pre, "
            "learn per-block Λ (AdamW, early stopping on validation), θ_m = θ_{m-1} + Λ*·δ. Supervised, "
            "unsupervised or MGDA objectives, task negation, single-task mode and the isotropic / random "
            "ablations. Writes a report, results.json, a stepwise-accuracy plot and every θ_m as safetensors."
        ),
        add_arguments=lambda p: _edit_arguments(p, True),
        run=lambda a: _edit_run(a, True),
    ),
    "pretrain": Command(
        help="pretrain the built-in CLIP (fastmerge-vit-tiny) on a generated image-caption corpus",
        description=(
            "Contrastive (CLIP) pretraining of fastmerge-vit-tiny's image and text towers on generated 16x16 "
            "scenes (shapes, colours, places, dot counts, gratings, textures, digit glyphs) with captions that "
            "compose their attributes; some colour-shape pairs are held out. Deterministic from the seed, "
            "cached in FASTMERGE_CACHE (default ~/.cache/fastmerge) with its settings and a checksum, and "
            "used by --pretrained builtin, the default start of mima, atlas and dvbasi on the built-in suite "
            "(which train it on first use). Prints the zero-shot accuracy on every built-in task."
        ),
        add_arguments=_pretrain_arguments,
        run=_pretrain_run,
    ),
    "mima": Command(
        help="MIMA: iterated averaging and fine-tuning of CLIP task models, swept over N",
        description=(
            "Fine-tune one CLIP image encoder per task under a fixed budget of S steps split into N "
            "iterations of (uniform averaging, S/N fine-tuning steps), for every N given, then merge the "
            "task models by uniform averaging, task arithmetic and TIES (with validation-chosen λ and "
            "without). Writes a Table-1-style report, results.json, plots and safetensors checkpoints to "
            "--out. Runs on the built-in task suite by default; launch with torchrun to spread the tasks "
            "over processes."
        ),
        add_arguments=_mima_arguments,
        run=_mima_run,
    ),
    "bench": Command(
        help="benchmark the fused ops against the reference and the memory bandwidth",
        description=(
            "Time every op (average, task arithmetic, TIES global and per-tensor, cosine, block_scale "
            "forward/backward) on every CPU backend over a size sweep up to the size of open_clip "
            "ViT-B-32's visual tower (T = 8 synthetic task vectors), and report effective GB/s, the "
            "share of the memory bandwidth measured in the same run, the speedup over the reference, "
            "and the peak extra memory of each case measured in a fresh process. The table goes to "
            "stdout, progress to stderr."
        ),
        add_arguments=_bench_arguments,
        run=_bench_run,
    ),
    "merge": Command(
        help="merge safetensors checkpoints from a mergekit-style YAML config",
        description=(
            "Run a mergekit YAML config (linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, "
            "breadcrumbs_ties, della, della_linear, slerp, model_stock, passthrough) over folders of safetensors "
            "shards. Everything is checked from the headers before any weight is read; tensors are read "
            "memory-mapped and prefetched, merged by fused kernels, and written into shards as they fill. "
            "The output folder appears only when the merge is complete; an interrupted merge is finished with "
            "--resume. Under torchrun (torchrun --nproc_per_node=P -m fastmerge merge ...) the ranks share the "
            "tensors and write the same files as one process."
        ),
        add_arguments=_merge_arguments,
        run=_merge_run,
    ),
    "bench-merge": Command(
        help="benchmark fastmerge merge (and mergekit-yaml where installed) on generated checkpoints",
        description=(
            "Generate Llama-shaped checkpoints (default: a base and 4 fine-tunes of ~270M parameters, fp32 and "
            "bf16), then time fastmerge merge and, where mergekit is installed, mergekit-yaml on the same "
            "configs in the same run: wall time, peak RSS, GB/s of input read and the ratio to a plain read of "
            "the same files. Writes a JSON report."
        ),
        add_arguments=_bench_merge_arguments,
        run=_bench_merge_run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from fastmerge import __version__

    parser = argparse.ArgumentParser(prog="fastmerge", description="fastmerge: fused task-vector model merging.")
    parser.add_argument("--version", action="version", version=f"fastmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    # The objects of the imported modules (PyTorch's above all) live until the process ends: moved out
    # of the collector's reach, no collection scans them again, including the one at exit, which took a
    # third of a second after a merge.
    gc.freeze()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

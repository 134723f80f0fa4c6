"""Reports of a MIMA sweep: a Table-1-style table, ``results.json`` and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

METHODS = (  # key in results, label, whether λ was chosen on validation
    ("uniform", "Uniform Averaging", None),
    ("task_arithmetic", "Task Arithmetic (val. λ)", True),
    ("ties", "TIES-Merging (val. λ)", True),
    ("task_arithmetic_no_val", "Task Arithmetic (λ = 0.4)", False),
    ("ties_no_val", "TIES-Merging (λ = 1)", False),
)


def _upper(m):
    return [m[i][j] for i in range(len(m)) for j in range(i + 1, len(m))]


def table(results: dict) -> str:
    """Markdown table: absolute and relative accuracy per method and N, cosines and the gap."""
    runs = results["runs"]
    Ns = sorted(runs, key=int)
    T = len(results["tasks"])
    head = "| method | " + " | ".join(f"N = {n} abs. / rel." for n in Ns) + " |"
    lines = [head, "|---|" + "---|" * len(Ns)]
    pre = sum(results["pretrained"]) / T if "pretrained" in results else float("nan")
    lines.append("| Pretrained (zero-shot) | " + " | ".join(f"{pre:.1f} / –" for _ in Ns) + " |")
    lines.append("| Fine-tuned (own task) | "
                 + " | ".join(f"{runs[n]['final']['fine_tuned_abs']:.1f} / 100" for n in Ns) + " |")
    for key, label, _ in METHODS:
        cells = []
        for n in Ns:
            m = runs[n]["final"]["merges"][key]
            lam = f" (λ {m['lam']:g})" if m.get("lam") is not None and key in ("task_arithmetic", "ties") else ""
            cells.append(f"{m['abs']:.1f} / {m['rel']:.1f}{lam}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| single-task gap, uniform (points) | "
                 + " | ".join(f"{runs[n]['final']['merges']['uniform']['gap']:.1f}" for n in Ns) + " |")
    lines.append("| median pairwise cos τ (final) | "
                 + " | ".join(f"{runs[n]['final']['median_cos_tau']:.3f}" for n in Ns) + " |")
    lines.append("| median pairwise cos δ (last iteration) | "
                 + " | ".join(f"{runs[n]['final']['median_cos_delta']:.3f}" for n in Ns) + " |")
    lines.append("| wall time (s) | " + " | ".join(f"{runs[n].get('seconds', float('nan')):.0f}" for n in Ns) + " |")
    return "\n".join(lines)


def per_task_table(results: dict) -> str:
    runs = results["runs"]
    Ns = sorted(runs, key=int)
    lines = ["| task | pretrained | " + " | ".join(f"N = {n} fine-tuned / uniform" for n in Ns) + " |",
             "|---|---|" + "---|" * len(Ns)]
    for t, name in enumerate(results["tasks"]):
        cells = [f"{runs[n]['final']['fine_tuned'][t]:.1f} / {runs[n]['final']['merges']['uniform']['test_acc'][t]:.1f}"
                 for n in Ns]
        pre = results.get("pretrained", [float("nan")] * len(results["tasks"]))[t]
        lines.append(f"| {name} | {pre:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[Path]:
    """Box plots of pairwise cosines per N, accuracy vs N, per-iteration cosines, landscapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    Ns = sorted(runs, key=int)
    out.mkdir(parents=True, exist_ok=True)
    files = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "cos_tau", "task vectors τ"), (axes[1], "cos_delta", "last increments δ")):
        ax.boxplot([_upper(runs[n]["final"][key]) for n in Ns], tick_labels=[str(n) for n in Ns])
        ax.set_title(f"pairwise cosine of the {title}")
        ax.set_xlabel("iterations N")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("cosine similarity")
    fig.tight_layout()
    files.append(out / "cosine_boxplots.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [int(n) for n in Ns]
    ax.plot(xs, [runs[n]["final"]["fine_tuned_abs"] for n in Ns], "k--", marker="o", label="fine-tuned")
    for key, label, val in METHODS:
        ax.plot(xs, [runs[n]["final"]["merges"][key]["abs"] for n in Ns], marker="o",
                linestyle=":" if val is False else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("iterations N")
    ax.set_ylabel("average test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out / "accuracy_vs_N.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    big = max(Ns, key=int)
    its = runs[big]["iterations"]
    if len(its) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, key, title in ((axes[0], "cos_tau", "τ"), (axes[1], "cos_delta", "δ")):
            ax.boxplot([_upper(r[key]) for r in its], tick_labels=[str(r["step"]) for r in its])
            ax.set_title(f"N = {big}: pairwise cosine of {title} after each iteration")
            ax.set_xlabel("fine-tuning step")
        fig.tight_layout()
        files.append(out / f"cosine_per_iteration_N{big}.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)

    with_land = [n for n in Ns if "landscape" in runs[n]]
    if with_land:
        fig, axes = plt.subplots(len(with_land), 3, figsize=(12, 3.6 * len(with_land)), squeeze=False)
        for row, n in enumerate(with_land):
            L = runs[n]["landscape"]
            titles = [f"{L['tasks'][0]} error", f"{L['tasks'][1]} error", "mean error"]
            for col in range(3):
                ax = axes[row][col]
                cs = ax.contourf(L["x"], L["y"], L["error"][col], levels=12, cmap="viridis_r")
                fig.colorbar(cs, ax=ax, fraction=0.046)
                for (px, py), mk, lab in ((L["theta_a"], "o", L["tasks"][0]), (L["theta_b"], "s", L["tasks"][1]),
                                          (L["average"], "*", "(θ_a + θ_b) / 2"), ((0, 0), "x", "θ0")):
                    ax.plot(px, py, mk, color="white", mec="black", ms=8, label=lab)
                for p in (L["theta_a"], L["theta_b"]):
                    ax.annotate("", xy=p, xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="grey"))
                ax.set_title(f"N = {n}: {titles[col]} (%)")
            axes[row][0].legend(fontsize=6, loc="lower left")
        fig.tight_layout()
        files.append(out / "error_landscape.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def write_reports(results: dict, out: Path, say: Callable[[str], None] = print) -> None:
    out = Path(out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    tab = table(results)
    per_task = per_task_table(results)
    try:
        files = plots(results, out / "plots")
    except ImportError:
        files = []
        say("matplotlib is not installed: no plots (pip install matplotlib)")
    md = ["# MIMA results", "", f"tasks: {', '.join(results['tasks'])}; d = {results['d']:,}", "", tab, "",
          "Per task (test accuracy, %):", "", per_task, ""]
    md += [f"![{f.stem}](plots/{f.name})" for f in files]
    (out / "report.md").write_text("\n".join(md) + "\n")
    say("")
    say(tab)
    say("")
    say(f"results: {out / 'results.json'}, report: {out / 'report.md'}, plots: {out / 'plots'}")


# ----------------------------------------------------------------------------- several seeds

def seed_list(first: int, seeds: int) -> list[int]:
    """The seeds of a ``--seeds K`` run: ``first``, ``first + 1``, ..., ``first + K - 1``."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    return [first + k for k in range(seeds)]


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, sd


def pm(xs, digits: int = 1) -> str:
    """``mean ± std`` of ``xs`` as text."""
    m, sd = mean_std(xs)
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def seeds_table(all_results: list) -> str:
    """The Table-1-style table of :func:`table` with every number as mean ± std over seeds."""
    Ns = sorted(all_results[0]["runs"], key=int)
    T = len(all_results[0]["tasks"])
    finals = lambda n: [r["runs"][n]["final"] for r in all_results]
    lines = ["| method | " + " | ".join(f"N = {n} abs. / rel." for n in Ns) + " |", "|---|" + "---|" * len(Ns)]
    pre = pm([sum(r["pretrained"]) / T for r in all_results])
    lines.append("| Pretrained (zero-shot) | " + " | ".join(f"{pre} / –" for _ in Ns) + " |")
    lines.append("| Fine-tuned (own task) | " + " | ".join(f"{pm([f['fine_tuned_abs'] for f in finals(n)])} / 100"
                                                          for n in Ns) + " |")
    for key, label, _ in METHODS:
        cells = []
        for n in Ns:
            ms = [f["merges"][key] for f in finals(n)]
            lam = ""
            if key in ("task_arithmetic", "ties"):
                lam = " (λ " + ", ".join(f"{m['lam']:g}" for m in ms) + ")"
            cells.append(f"{pm([m['abs'] for m in ms])} / {pm([m['rel'] for m in ms])}{lam}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| single-task gap, uniform (points) | "
                 + " | ".join(pm([f["merges"]["uniform"]["gap"] for f in finals(n)]) for n in Ns) + " |")
    lines.append("| median pairwise cos τ (final) | "
                 + " | ".join(pm([f["median_cos_tau"] for f in finals(n)], 3) for n in Ns) + " |")
    lines.append("| median pairwise cos δ (last iteration) | "
                 + " | ".join(pm([f["median_cos_delta"] for f in finals(n)], 3) for n in Ns) + " |")
    lines.append("| wall time per seed (s) | "
                 + " | ".join(pm([r["runs"][n].get("seconds", float("nan")) for r in all_results], 0) for n in Ns) + " |")
    return "\n".join(lines)


def seeds_per_task_table(all_results: list) -> str:
    """Per-task zero-shot, fine-tuned and uniform-average accuracy, mean ± std over seeds."""
    Ns = sorted(all_results[0]["runs"], key=int)
    lines = ["| task | pretrained | " + " | ".join(f"N = {n} fine-tuned / uniform" for n in Ns) + " |",
             "|---|---|" + "---|" * len(Ns)]
    for t, name in enumerate(all_results[0]["tasks"]):
        cells = [f"{pm([r['runs'][n]['final']['fine_tuned'][t] for r in all_results])} / "
                 f"{pm([r['runs'][n]['final']['merges']['uniform']['test_acc'][t] for r in all_results])}" for n in Ns]
        lines.append(f"| {name} | {pm([r['pretrained'][t] for r in all_results])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_plot(all_results: list, out: Path) -> list[Path]:
    """Accuracy against N with error bars (one standard deviation over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ns = sorted(all_results[0]["runs"], key=int)
    xs = [int(n) for n in Ns]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("fine-tuned", lambda f: f["fine_tuned_abs"], "--")]
    series += [(label, (lambda f, k=key: f["merges"][k]["abs"]), ":" if val is False else "-")
               for key, label, val in METHODS]
    for label, get, style in series:
        stats = [mean_std([get(r["runs"][n]["final"]) for r in all_results]) for n in Ns]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", linestyle=style,
                    capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("iterations N")
    ax.set_ylabel(f"average test accuracy (%), mean ± std of {len(all_results)} seeds")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accuracy_vs_N_seeds.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def write_seed_reports(all_results: list, seeds: list, out: Path, say: Callable[[str], None] = print) -> dict:
    """``summary.json`` and ``report.md`` over the seeds' runs (each seed's own report is in ``seed-S/``)."""
    out = Path(out)
    tab, per_task = seeds_table(all_results), seeds_per_task_table(all_results)
    try:
        files = seeds_plot(all_results, out / "plots")
    except ImportError:
        files = []
    summary = dict(seeds=seeds, tasks=all_results[0]["tasks"], table=tab, per_task=per_task,
                   runs={str(s): f"seed-{s}/results.json" for s in seeds})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = ["# MIMA results over seeds", "", f"seeds: {', '.join(map(str, seeds))}; every cell is mean ± standard "
          "deviation over the seeds (λ: the value chosen for each seed)", "", tab, "",
          "Per task (test accuracy, %):", "", per_task, ""]
    md += [f"![{f.stem}](plots/{f.name})" for f in files]
    md += ["", "Each seed's own report, plots and checkpoints: " + ", ".join(f"`seed-{s}/`" for s in seeds)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    say("")
    say(f"over {len(seeds)} seeds (mean ± std):")
    say(tab)
    say(f"\nreport: {out / 'report.md'}")
    return summary

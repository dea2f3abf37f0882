"""The rate-distortion grid: one cell per kind of method and nominal bits, from bench/smollm2_rd.py rows
(the grid and its plot on the results page, docs/BENCHMARKS.md).

    python bench/rd_grid.py docs/smollm2_rd_*.jsonl [--png docs/smollm2_rd_grid.png]

Each row of every file is sorted into a kind (rtn; gptq; vq and pq with k-means only; vq and pq after
the calibrated block walk; pq + a whole-model EM round, next-token or distillation M-step), and each
cell shows the lowest pydoc perplexity measured for that kind at that nominal bit width, with its
all-in bits/weight over the compressed layers and its perplexity on the licence text when measured.
Calibrated rows written before the KV-cache fix (they have no ``asymmetric`` field) are left out.
A second table lists the same cells one per row, with size, the ratio to FP on both texts and the
compression time; every row's full settings are in the per-file tables of docs/LAB_LOG.md
(``bench/rd_table.py``).
"""
import json
import sys

KINDS = [
    ("rtn", "rtn"),
    ("gptq", "gptq (calibrated)"),
    ("vq-kmeans", "vq, k-means only"),
    ("pq-kmeans", "pq, k-means only"),
    ("vq-walk", "vq + walk"),
    ("pq-walk", "pq + walk"),
    ("pq-em-task", "pq + walk + EM (next-token)"),
    ("pq-em-distill", "pq + walk + EM (distill)"),
    ("pq-zero-data", "pq + zero-data walk + soft block M-step"),
]


def kind(r: dict) -> str | None:
    method, calib = r["method"], r.get("calib", "none")
    if method in ("rtn", "gptq"):
        return method
    if method not in ("vq", "pq"):
        return None
    if calib == "none":
        return f"{method}-kmeans"
    if "asymmetric" not in r:
        # written before the KV-cache fix (the rows then had no such field): every calibrated run then
        # attended to earlier runs' keys, so it measured a defect, not the method
        return None
    if calib == "zero-data":
        return f"{method}-zero-data" if method == "pq" and r.get("m_objective") == "block" and r.get("soft_candidates") else None
    if r.get("m_objective") == "block" and r.get("m_steps"):
        return None  # a data walk with a block M-step: no cell of its own
    if not r.get("em_rounds") or not r.get("m_steps"):
        return f"{method}-walk"
    return f"{method}-em-{r.get('m_objective', 'task')}" if method == "pq" else None


def main(paths: list[str]) -> None:
    png = None
    if "--png" in paths:
        i = paths.index("--png")
        png, paths = paths[i + 1], paths[:i] + paths[i + 2 :]
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    fp = next(r for r in rows if r["method"] == "fp")
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        k = kind(r)
        if k is None:
            continue
        key = (k, r["bits"])
        rank = (r["perplexity"], "perplexity_extra" not in r)  # a tie (the same run twice): the one with both texts
        if key not in best or rank < (best[key]["perplexity"], "perplexity_extra" not in best[key]):
            best[key] = r
    bits = sorted({b for _, b in best}, reverse=True)
    print(f"FP: {fp['perplexity']:.2f} on pydoc" + "".join(f", {v:.2f} on {n}" for n, v in fp.get("perplexity_extra", {}).items()))
    print()
    print("| method | " + " | ".join(f"{b} bits" for b in bits) + " |")
    print("|---|" + "---|" * len(bits))
    for k, name in KINDS:
        cells = []
        for b in bits:
            r = best.get((k, b))
            if r is None:
                cells.append("-")
                continue
            extra = "".join(f"; {v:.4g}" for v in r.get("perplexity_extra", {}).values())
            cells.append(f"{r['perplexity']:.4g} ({r['bits_per_weight_layers']:.2f} b{extra})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    _long_table(best, bits, fp)
    if png:
        _plot(best, fp, png)


def _plot(best: dict, fp: dict, png: str) -> None:
    """Perplexity against all-in bits/weight, one line per kind (its best cell at each nominal rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (k, name) in enumerate(KINDS):
        pts = sorted((r["bits_per_weight_layers"], r["perplexity"]) for (kk, _), r in best.items() if kk == k)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="os^Dv<>p"[i % 8], color=plt.cm.tab10.colors[i % 10], label=name)
    ax.axhline(fp["perplexity"], color="k", ls="--", lw=1, label=f"FP ({fp['perplexity']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight, compressed layers, all-in")
    ax.set_ylabel("perplexity (pydoc topics, 8192 tokens)")
    ax.set_title("SmolLM2-135M: the rate-distortion grid (best measured cell per method and rate)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def _long_table(best: dict, bits: list[int], fp: dict) -> None:
    """The same cells, one row each, with size, both perplexities and time (the issue's columns)."""
    extras = sorted(fp.get("perplexity_extra", {}))
    print("| method | bits | bits/weight (layers, all-in) | size MB (whole model) | perplexity | x FP | "
          + "".join(f"ppl {n} (x FP) | " for n in extras) + "compress s |")
    print("|---|---|---|---|---|---|" + "---|" * len(extras) + "---|")
    for k, name in KINDS:
        for b in bits:
            r = best.get((k, b))
            if r is None:
                continue
            other = ""
            for n in extras:
                v = r.get("perplexity_extra", {}).get(n)
                other += f"{v:.4g} ({v / fp['perplexity_extra'][n]:.3g}) | " if v is not None else "- | "
            seconds = f"{r['seconds_compress']:.0f}" if r.get("seconds_compress") else "-"
            print(
                f"| {name} | {b} | {r['bits_per_weight_layers']:.3f} | {r['size_mb']:.1f} | {r['perplexity']:.4g} | "
                f"{r['perplexity'] / fp['perplexity']:.3g} | {other}{seconds} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])

"""The rate-distortion grid: one cell per kind of method and nominal bits, from bench/smollm2_rd.py rows.

    python bench/rd_grid.py docs/smollm2_rd_*.jsonl

Each row of every file is sorted into a kind (rtn; gptq; vq and pq with k-means only; vq and pq after
the calibrated block walk; pq + a whole-model EM round, next-token or distillation M-step), and each
cell shows the lowest pydoc perplexity measured for that kind at that nominal bit width, with its
all-in bits/weight over the compressed layers and its perplexity on the licence text when measured.
Calibrated rows written before the KV-cache fix (they have no ``asymmetric`` field) are left out.
A second table lists the same cells one per row, with size, the ratio to FP on both texts and the
compression time; every row's full settings are in the per-file tables of docs/BENCHMARKS.md.
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
]


def kind(r: dict) -> str | None:
    method, calib = r["method"], r.get("calib", "none")
    if method in ("rtn", "gptq"):
        return method
    if method not in ("vq", "pq"):
        return None
    if calib == "none":
        return f"{method}-kmeans"
    if calib != "data":
        return None
    if "asymmetric" not in r:
        # written before the KV-cache fix (the rows then had no such field): every calibrated run then
        # attended to earlier runs' keys, so it measured a defect, not the method
        return None
    if not r.get("em_rounds") or not r.get("m_steps"):
        return f"{method}-walk"
    return f"{method}-em-{r.get('m_objective', 'task')}" if method == "pq" else None


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    fp = next(r for r in rows if r["method"] == "fp")
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        k = kind(r)
        if k is None:
            continue
        key = (k, r["bits"])
        if key not in best or r["perplexity"] < best[key]["perplexity"]:
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

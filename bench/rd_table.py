"""Markdown table from the JSON lines written by bench/smollm2_rd.py (the per-file tables of docs/LAB_LOG.md).

    python bench/rd_table.py docs/smollm2_rd_uncalibrated.jsonl
    python bench/rd_table.py docs/smollm2_rd_calibrated.jsonl --fp-from docs/smollm2_rd_uncalibrated.jsonl
"""
import json
import sys


def label(r: dict) -> str:
    name = r["method"] if r["method"] != "fp" else "FP (float32 weights; size at FP16)"
    if r.get("calib", "none") != "none" and r["method"] != "fp":
        name += f" + {r['calib']} calib" + (f" ({r['calib_samples']}x{r['seq_len']} tok)" if "seq_len" in r else "")
    if r.get("local_rounds") and r["method"] in ("pq", "vq"):
        name += f" + layer-wise EM x{r['local_rounds']}"
    if r.get("asymmetric"):
        name += f" + asym (ridge {r.get('asym_damp', 0.3):g})"
    if r.get("sequential"):
        name += " + stages"
    if r.get("e_sweeps") and r["method"] in ("pq", "vq"):
        name += f" [E-step x{r['e_sweeps']}, CG {r['cg_iters']}]"
    if r.get("m_objective") == "block" and r.get("m_steps"):
        soft = f", soft assignments over {r['soft_candidates']} candidates" if r.get("soft_candidates") else ""
        name += f" + block M-step ({r['m_steps']} steps{soft}, lr {r.get('lr', 1e-4):g})"
    if r.get("em_rounds"):
        batches = f" of {r['m_batch']} seq from {r['m_samples']}" if r.get("m_samples") else ""
        loss = ", KL to FP" if r.get("m_objective") == "distill" else ""
        name += f" + EM x{r['em_rounds']} ({r['m_steps']} M-steps{batches}{loss}, lr {r.get('lr', 1e-4):g})"
    extra = {k: v for k, v in (r.get("params") or {}).items()}
    return name + (f" {extra}" if extra else "") + (f" ({r['note']})" if r.get("note") else "")


def _s(r: dict, key: str) -> str:
    return f"{r[key]:.0f}" if r.get(key) else "-"


def main(paths: list[str]) -> None:
    """Rows of every file; ``--fp-from FILE`` takes the FP perplexity (the x FP column) from FILE."""
    fp_rows = []
    if "--fp-from" in paths:
        i = paths.index("--fp-from")
        fp_rows = [json.loads(line) for line in open(paths[i + 1]) if line.strip()]
        paths = paths[:i] + paths[i + 2 :]
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    fp = next((r["perplexity"] for r in rows + fp_rows if r["method"] == "fp"), None)
    extras = sorted({name for r in rows for name in r.get("perplexity_extra", {})})  # --eval-extra texts
    print("| method | bits | bits/weight (layers, all-in) | bits/weight (whole model) | size MB | perplexity | x FP | "
          + "".join(f"ppl {name} | " for name in extras) + "compress s | total s |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(extras) + "---|---|")
    for r in rows:
        ratio = "-" if not fp else f"{r['perplexity'] / fp:.2f}" if r["perplexity"] < 100 * fp else f"{r['perplexity'] / fp:.3g}"
        other = "".join(f"{r['perplexity_extra'][n]:.4g} | " if n in r.get("perplexity_extra", {}) else "- | " for n in extras)
        print(
            f"| {label(r)} | {r['bits'] or '-'} | {r['bits_per_weight_layers']:.3f} | {r['bits_per_weight_all_in']:.3f} | "
            f"{r['size_mb']:.1f} | {r['perplexity']:.4g} | {ratio} | {other}{_s(r, 'seconds_compress')} | {_s(r, 'seconds_total')} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

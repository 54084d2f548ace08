"""The study's results: five tables (Markdown + JSON) and their plots from the cards a study run wrote.

    write_results(config, work_dir, results_dir, stage_times) -> {name: path}

Reads only what the entries wrote under ``work_dir`` (eval_card.json, sampling.json, the sweep folders);
nothing is instantiated. Each table carries one line with what the paper reports for the same comparison
(spec section 9) and whether the small-scale trend here agrees; the verdicts are computed, not written.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import report

VARIANT_NAMES = {"g": "G", "gr": "G+R", "r": "R"}
ROUTES = (("samples_raster", "raster", "-"), ("samples_mergear_strict", "MergeAR", "strict"),
          ("samples_mergear_soft", "MergeAR", "soft"), ("samples_randar", "RandAR + recovery", "-"))
PAPER = {
    "reconstruction": "Paper (Table 4, short 128 px runs): rFID rises as K falls, G 1.41 -> 4.74 (K 256 -> 64), "
                      "G+R 2.15 -> 8.94 (K 256 -> 36).",
    "representation": "Paper (Table 4): fewer tokens probe better, G+R 48.6 -> 52.1 % (K 256 -> 36), "
                      "R 51.2 -> 54.3 % (K 196 -> 36).",
    "recovery": "Paper (Table 5): G+R at 144 tokens, rFID 1.48 with the true groups and 1.71 with the learned "
                "2-layer Source Recovery (+0.23).",
    "generation": "Paper (Table 3): G+R with LlamaGen-L (raster) 3.28, with MergeAR 3.25 (same quality, K-sparse "
                  "cache), with RandAR-L 2.63 gFID in 64 steps instead of 256.",
    "sweeps": "Paper (Table 4, Table 2): training K trades rFID against tokens; LFQ at 2^18 codes reaches 100 % "
              "usage on ImageNet.",
}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho (scipy; ties ranked by their mean); None for fewer than 3 points or a constant side."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    rho = float(spearmanr(xs, ys).statistic)
    return rho if math.isfinite(rho) else None


# --------------------------------------------------------------------------------------- tables


def per_k_rows(work: Path, variants: Sequence[str], card: str, fields: Mapping[str, str],
               required: str | None = None) -> list[dict[str, Any]]:
    """One row per (variant, K) of each variant's ``tok_<variant>/<card>`` metrics: column -> card metric
    name (``fields``); K values whose ``required`` metric is missing are left out."""
    rows = []
    for variant in variants:
        metrics = (_load(work / f"tok_{variant}" / card) or {}).get("metrics", {})
        for keep, m in metrics.items():
            if required is None or m.get(required) is not None:
                rows.append({"variant": VARIANT_NAMES[variant], "K": int(keep),
                             **{column: m.get(name) for column, name in fields.items()}})
    return rows


def reconstruction_rows(work: Path, variants: Sequence[str]) -> list[dict[str, Any]]:
    """The tokenizer evaluation cards (true groups)."""
    return per_k_rows(work, variants, "eval/eval_card.json", {k: k for k in ("rfid", "psnr", "ssim", "class_accuracy",
                                                                            "code_usage", "num_images")})


def probe_rows(work: Path, variants: Sequence[str]) -> list[dict[str, Any]]:
    return per_k_rows(work, variants, "probe/eval_card.json", {"cls_top1": "cls_top1", "mean_top1": "mean_top1"})


def recovery_rows(work: Path, variants: Sequence[str]) -> list[dict[str, Any]]:
    """The variants whose cards have predicted-group metrics (a Source Recovery module)."""
    fields = {"rfid_true_groups": "rfid", "rfid_recovered": "rfid_recovered", "psnr_true_groups": "psnr",
              "psnr_recovered": "psnr_recovered", "class_accuracy_true_groups": "class_accuracy",
              "class_accuracy_recovered": "class_accuracy_recovered", "recovery_accuracy": "recovery_accuracy"}
    return per_k_rows(work, variants, "eval/eval_card.json", fields, required="recovery_accuracy")


def generation_rows(work: Path) -> list[dict[str, Any]]:
    rows = []
    for folder, route, budget in ROUTES:
        stats, card = _load(work / folder / "sampling.json"), _load(work / folder / "eval_card.json")
        if stats is None:
            continue
        metrics = (card or {}).get("metrics", {})
        rows.append({"route": route, "budget": budget, "K": stats.get("keep") or stats.get("positions"),
                     "positions": stats.get("positions"), "steps": stats.get("steps"), "num_samples": stats.get("num_samples"),
                     "class_accuracy": metrics.get("class_accuracy"), "gfid": metrics.get("gfid"),
                     "precision": metrics.get("precision"), "recall": metrics.get("recall"),
                     "tokens_per_s": stats.get("tokens_per_s"), "images_per_s": stats.get("images_per_s"),
                     "groups_max": stats.get("groups_max"), "peak_kv_mean": stats.get("peak_kv_mean"),
                     "peak_kv_max": stats.get("peak_kv_max"),
                     "num_reference": (card or {}).get("reference", {}).get("num_images"),
                     "classifier_accuracy": (card or {}).get("classifier_accuracy")})
    return rows


# --------------------------------------------------------------------------------------- verdicts


def _by_variant(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if _finite(row.get(metric)):
            series.setdefault(row["variant"], []).append((row["K"], row[metric]))
    return {v: sorted(points) for v, points in series.items()}


def trend_verdict(rows: Sequence[Mapping[str, Any]], metric: str, falls_with_k: bool, what: str) -> str:
    """Per variant: the metric at the smallest and largest K and the rank correlation with K; 'agrees'
    when the sign of the correlation is the paper's and the end points are ordered the same way."""
    parts, verdicts = [], []
    for variant, points in _by_variant(rows, metric).items():
        rho = rank_correlation([k for k, _ in points], [v for _, v in points])
        (k0, v0), (k1, v1) = points[0], points[-1]
        agrees = rho is not None and (rho < 0) == falls_with_k and ((v0 > v1) == falls_with_k)
        verdicts.append(agrees)
        parts.append(f"{variant} {v0:.3g} -> {v1:.3g} (K {k0} -> {k1}, rho {rho:+.2f})" if rho is not None
                     else f"{variant} {v0:.3g} -> {v1:.3g} (K {k0} -> {k1})")
    if not parts:
        return "Here: no data."
    word = "agrees" if all(verdicts) else ("partly agrees" if any(verdicts) else "does not agree")
    return f"Here: {what} {'; '.join(parts)}. The trend {word}" + ("." if all(verdicts) else
                                                                      " (see the variants whose rho has the other sign).")


def recovery_verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    gaps = [(r["variant"], r["K"], r["rfid_recovered"] - r["rfid_true_groups"], r["recovery_accuracy"]) for r in rows
            if _finite(r.get("rfid_recovered")) and _finite(r.get("rfid_true_groups")) and r["recovery_accuracy"] < 1]
    if not gaps:
        return "Here: no merged K with a Source Recovery module was evaluated."
    worse = sum(1 for _, _, gap, _ in gaps if gap >= 0)
    text = "; ".join(f"{v} K {k}: {gap:+.2f} rFID at accuracy {acc:.3f}" for v, k, gap, acc in gaps)
    word = "agrees" if worse == len(gaps) else ("partly agrees" if worse else "does not agree")
    return (f"Here (predicted minus true groups): {text}. Predicted groups cost rFID in {worse} of {len(gaps)} "
            f"cases: the trend {word} (small-sample rFID moves by a few points between runs).")


def generation_verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """Each route against the raster baseline: gFID ratio, class-accuracy difference, peak KV entries and
    forward passes. 'Agrees' (the paper: the same quality from a K-sparse cache, or in fewer steps) when every
    route is within 1.2x of the raster gFID and 10 points of its class accuracy."""
    by = {(r["route"], r["budget"]): r for r in rows}
    raster = by.get(("raster", "-"))
    if raster is None or not _finite(raster.get("gfid")):
        return "Here: no raster baseline."
    parts, close = [], []
    for key in (("MergeAR", "strict"), ("MergeAR", "soft"), ("RandAR + recovery", "-")):
        row = by.get(key)
        if row is None or not _finite(row.get("gfid")):
            continue
        ratio = row["gfid"] / raster["gfid"]
        text = f"{key[0]}{' ' + key[1] if key[1] != '-' else ''} {ratio:.2f}x the raster gFID"
        within = ratio <= 1.2
        if _finite(row.get("class_accuracy")) and _finite(raster.get("class_accuracy")):
            gap = 100 * (row["class_accuracy"] - raster["class_accuracy"])
            text += f", class accuracy {gap:+.1f} points"
            within = within and gap >= -10
        close.append(within)
        parts.append(f"{text}, {row['peak_kv_max']}/{raster['peak_kv_max']} peak KV entries in "
                     f"{row['steps']}/{raster['steps']} steps")
    others = [r for r in rows if r is not raster and _finite(r.get("gfid"))]
    larger = [r["route"] for r in others if _finite(r.get("peak_kv_max")) and r["peak_kv_max"] >= raster["peak_kv_max"]]
    word = ("agrees on quality: every route is within 1.2x of the raster gFID and 10 points of its class accuracy"
            if all(close) else "does not fully agree: a route is more than 1.2x the raster gFID or 10 points below its "
            "class accuracy")
    word += (f"; {', '.join(larger)} holds no smaller cache than raster (K tokens plus K position instructions)" if larger
             else ", each with a smaller cache")
    return f"Here: {'; '.join(parts)}. The trend {word}."


def sweep_verdict(sweep: str, records: Sequence[Mapping[str, Any]]) -> str:
    """merge_ratio: at each evaluated K, which training keep list reconstructs best (PSNR; the paper: the
    one trained at that K). codebook: how PSNR and usage move with the LFQ bits at entropy weight 0.1.
    PSNR, not rFID: the sweeps evaluate few images, where rFID is mostly sampling noise."""
    rows = [r for r in records if r["kind"] == "tokenizer" and _finite(r["metrics"].get("psnr"))]
    if sweep == "merge_ratio":
        best = {}
        for r in rows:
            if r["K"] not in best or r["metrics"]["psnr"] > best[r["K"]][1]:
                best[r["K"]] = (r["overrides"].get("train.keep_candidates", "?"), r["metrics"]["psnr"])
        text = "; ".join(f"K {k}: {lst} ({v:.2f} dB)" for k, (lst, v) in sorted(best.items()))
        return f"Here, the training keep list with the best PSNR at each evaluated K: {text}."
    if sweep == "codebook":
        points = sorted((int(r["overrides"].get("tokenizer.z_channels", 0)), r["metrics"]["psnr"], r["metrics"].get("code_usage"))
                        for r in rows if str(r["overrides"].get("quantizer.entropy_weight")) in ("0.1", "0.10"))
        if len(points) < 2:
            return "Here: fewer than two codebook sizes evaluated."
        rho = rank_correlation([p[0] for p in points], [p[1] for p in points])
        text = "; ".join(f"{b} bits: PSNR {f:.2f} dB, usage {u:.3g}" for b, f, u in points)
        word = "agrees" if rho is not None and rho > 0 else "does not agree"
        usage_word = "falls" if points[-1][2] < points[0][2] else "does not fall"
        return (f"Here, entropy weight 0.1: {text}. Paper: more bits reconstruct better; here the rank correlation of "
                f"PSNR with bits is {'n/a' if rho is None else f'{rho:+.2f}'}, the trend {word}. The used fraction of the "
                f"2^bits codes {usage_word} with bits at this data size (ImageNet: 100 %).")
    return ""


# --------------------------------------------------------------------------------------- writing


def markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows: the stage did not run)\n"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(report.fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_by_variant(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path, ylabel: str, title: str,
                    scale: float = 1.0) -> Path | None:
    series = {}
    for metric in metrics:
        for variant, points in _by_variant(rows, metric).items():
            label = variant if len(metrics) == 1 else f"{variant} {metric.removesuffix('_top1')}"
            series[(label, label)] = [(k, v * scale) for k, v in points]
    return report.plot_lines(series, path, "kept tokens K", ylabel, title) if series else None


def plot_gfid_vs_kv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    points = [r for r in rows if _finite(r.get("gfid")) and _finite(r.get("peak_kv_max"))]
    if not points:
        return None
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in points:
        label = r["route"] + (f" ({r['budget']})" if r["budget"] != "-" else "")
        ax.scatter([r["peak_kv_max"]], [r["gfid"]], label=f"{label}, {r['steps']} steps")
    ax.set_xlabel("peak KV-cache entries per image")
    ax.set_ylabel("gFID (small sample)")
    ax.set_title("gFID vs KV cache")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def header(config: Mapping[str, Any], work: Path, times: Mapping[str, Any]) -> dict[str, Any]:
    from ..runs.provenance import environment_info, git_sha

    env = environment_info()
    scale = config["scale"]
    total = sum(t["seconds"] for t in times.values())
    return {
        "command": f"make study ARGS=\"scale={scale['name']} backend={config['backend']['name']}\"",
        "commit": git_sha(), "hardware": {k: env[k] for k in ("platform", "cpu_count", "torch", "cuda_devices")},
        "seed": config["seed"], "data": config["dataset"], "features": config.get("features", "inception"), "scale": scale,
        "stage_seconds": dict(times),
        "total_minutes": round(total / 60, 1), "work_dir": str(work),
    }


def write_results(config: Mapping[str, Any], work: Path, results_dir: Path, times: Mapping[str, Any]) -> dict[str, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    variants = config["variants"]
    tables = {
        "reconstruction": reconstruction_rows(work, variants),
        "representation": probe_rows(work, variants),
        "recovery": recovery_rows(work, variants),
        "generation": generation_rows(work),
    }
    meta = header(config, work, times)
    written: dict[str, Path] = {}
    for name, rows in tables.items():
        written[name] = results_dir / f"{name}.json"
        written[name].write_text(json.dumps({"header": meta, "rows": rows}, indent=2))
    plots = {
        "rfid_vs_k": plot_by_variant(tables["reconstruction"], ["rfid"], results_dir / "rfid_vs_k.png", "rFID (small sample)",
                                     "rFID vs K (true groups)"),
        "probe_vs_k": plot_by_variant(tables["representation"], ["cls_top1", "mean_top1"], results_dir / "probe_vs_k.png",
                                      "linear-probe top-1 (%)", "linear probe vs K", scale=100.0),
        "recovery_vs_k": plot_by_variant(tables["recovery"], ["rfid_true_groups", "rfid_recovered"],
                                         results_dir / "recovery_vs_k.png", "rFID (small sample)", "true vs predicted groups"),
        "gfid_vs_kv": plot_gfid_vs_kv(tables["generation"], results_dir / "gfid_vs_kv.png"),
    }
    written.update({k: v for k, v in plots.items() if v is not None})
    sweep_text = []
    for sweep in config["sweeps"]:
        source = work / f"sweep_{sweep}"
        records = report.collect(source) if source.is_dir() else []
        target = results_dir / f"sweep_{sweep}"
        if target.exists():
            shutil.rmtree(target)
        if records:
            files = report.write_report(records, target, source=f"sweep={sweep}")
            written[f"sweep_{sweep}"] = files["md"]
            images = "".join(f"![{n}](sweep_{sweep}/{p.name})\n" for n, p in files.items() if p.suffix == ".png")
            sweep_text.append(f"### sweep={sweep}\n\n{sweep_verdict(sweep, records)}\n\n{report.markdown_table(records)}{images}")
        else:
            sweep_text.append(f"### sweep={sweep}\n\n(no evaluation cards: the sweep did not run)\n")
    written["readme"] = results_dir / "README.md"
    written["readme"].write_text(readme_text(meta, tables, plots, sweep_text))
    return written


def _image(plots: Mapping[str, Path | None], name: str) -> str:
    return f"\n![{name}]({plots[name].name})\n" if plots.get(name) else ""


def readme_text(meta: Mapping[str, Any], tables: Mapping[str, list], plots: Mapping[str, Path | None],
                sweep_text: Sequence[str]) -> str:
    scale, gen = meta["scale"], tables["generation"]
    samples = gen[0]["num_samples"] if gen else 0
    reference = gen[0]["num_reference"] if gen else 0
    lines = [
        "# Small-scale reproduction study",
        "",
        f"Made by `{meta['command']}` at commit `{meta['commit']}` in {meta['total_minutes']} minutes "
        f"({meta['hardware']['platform']}, {meta['hardware']['cpu_count']} cores, torch {meta['hardware']['torch']}, "
        f"GPUs: {', '.join(meta['hardware']['cuda_devices']) or 'none'}). Seed {meta['seed']}, data `{meta['data']}` "
        f"(32 px Fashion-MNIST, 10 classes). Tiny models: every number is a small-scale trend, not comparable to the "
        f"paper's ImageNet figures. rFID and gFID use TF-InceptionV3 features on small samples "
        f"({scale['eval_images']} held-out images per K; {samples} generated samples against {reference} held-out "
        f"images), so they are large and move by a few points between runs. Each table's JSON (with this header: "
        f"commit, hardware, seed, scale, stage times) lies beside this file.",
        *([] if meta.get("features", "inception") == "inception" else [
            "", f"**features={meta['features']}: rFID and gFID here come from an untrained, randomly initialised network "
                "(a smoke run): they are not FIDs and say nothing about the method.**"]),
        "",
        f"Tokenizers: G, G+R and R at `tokenizer=tiny`, {scale['tokenizer_steps']} steps each (the `demo_tiny` "
        f"recipe with Source Recovery on). Generators: `ar=tiny` at batch {scale['ar_batch']}, raster and MergeAR "
        f"{scale['ar_steps']} steps, RandAR {scale['randar_steps']}, on the G+R code cache of "
        f"{scale['codes_images'] or 'all'} training images (raster on its K = {scale['keep_range'][1]} items, MergeAR "
        f"and RandAR on its K = {scale['generation_keep']} items); samples with CFG {scale['cfg_scale']}.",
        "",
        "## 1. Reconstruction vs K",
        "",
        PAPER["reconstruction"],
        trend_verdict(tables["reconstruction"], "rfid", True, "rFID from the smallest to the largest K:"),
        "",
        markdown(tables["reconstruction"]) + _image(plots, "rfid_vs_k"),
        "## 2. Representation: linear probe",
        "",
        PAPER["representation"],
        trend_verdict(tables["representation"], "mean_top1", True, "mean-token top-1 from the smallest to the largest K:"),
        trend_verdict(tables["representation"], "cls_top1", True, "CLS top-1 from the smallest to the largest K:"),
        "",
        markdown(tables["representation"]) + _image(plots, "probe_vs_k"),
        "## 3. Source Recovery: predicted vs true groups",
        "",
        PAPER["recovery"],
        recovery_verdict(tables["recovery"]),
        "",
        markdown(tables["recovery"]) + _image(plots, "recovery_vs_k"),
        "## 4. Generation routes (G+R tokenizer)",
        "",
        PAPER["generation"],
        generation_verdict(gen),
        "",
        markdown(gen) + _image(plots, "gfid_vs_kv"),
        "## 5. Merge-ratio and codebook sweeps",
        "",
        PAPER["sweeps"],
        f"Here: {scale['sweep_steps']} steps per job (Source Recovery off), {scale['sweep_eval_images']} held-out "
        "images per K, summarised by `mergevq.entries.report` (the per-sweep folders hold report.md / report.csv / plots).",
        "",
        *sweep_text,
        "## Stage times",
        "",
        markdown([{"stage": k, "group": v["group"], "seconds": v["seconds"]} for k, v in meta["stage_seconds"].items()]),
    ]
    return "\n".join(lines) + "\n"

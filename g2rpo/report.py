"""A run's report: one static ``report.html`` in the output folder (no server; open it from disk).

    python -m g2rpo.report outputs/tiny/train          # also written when a run ends

Sections: the held-out rewards as z-scores on one chart (in-domain solid, out-of-domain dashed: g2rpo.hacking's
scale, so rewards of any unit compare), each reward's own curves (training, held-out), the hacking flags, the
sample strips across evaluations (the same prompts and noise each time), the checkpoints with their held-out
scores and the best pointer, the config in force and its history. Every curve is inline SVG drawn from
``metrics.jsonl`` / ``heldout.jsonl``; every image is a link to the run's own PNG.
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

from g2rpo import hacking

REPORT = "report.html"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], dashed: set[str] = frozenset(),
              width: int = 560, height: int = 240) -> str:
    """A line chart: ``series`` name -> [(x, y)]; each polyline carries ``data-series`` and ``data-points``."""
    points = [p for values in series.values() for p in values]
    if not points:
        return f"<p>{html.escape(title)}: no data yet.</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 40

    def at(x, y):
        return (pad + (x - x0) / (x1 - x0) * (width - 2 * pad), height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad))

    parts = [f'<svg class="chart" width="{width}" height="{height + 20 * len(series)}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{pad}" y="16" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
             f'<text x="{pad}" y="{height - pad + 14}" font-size="10">{x0:g}</text>',
             f'<text x="{width - pad}" y="{height - pad + 14}" font-size="10" text-anchor="end">{x1:g} (step)</text>',
             f'<text x="2" y="{height - pad}" font-size="10">{y0:.3g}</text>',
             f'<text x="2" y="{pad}" font-size="10">{y1:.3g}</text>']
    for i, (name, values) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in (at(x, y) for x, y in values))
        dash = ' stroke-dasharray="6 4"' if name in dashed else ""
        parts.append(f'<polyline data-series="{html.escape(name)}" data-points="{len(values)}" points="{coords}" '
                     f'fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{pad}" y="{height + 14 + 20 * i}" font-size="11" fill="{color}">'
                     f'{"- - " if name in dashed else "—— "}{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def build_report(out_dir: str | Path) -> str:
    """The report's HTML for the run in ``out_dir``."""
    out = Path(out_dir)
    metrics, heldout = _jsonl(out / "metrics.jsonl"), _jsonl(out / "heldout.jsonl")
    config_text = (out / "config.yaml").read_text(encoding="utf-8") if (out / "config.yaml").is_file() else ""
    history = _jsonl(out / "config_history.jsonl")
    sections = [f"<h1>g2rpo run: {html.escape(str(out))}</h1>",
                f"<p>{len(metrics)} training steps logged, {len(heldout)} held-out evaluations.</p>"]

    # held-out rewards on one scale
    names = sorted({k for r in heldout for k in hacking._rewards(r)})
    z_series = {n: [(r["step"], hacking.z_scores(heldout, r)[n]) for r in heldout if n in hacking.z_scores(heldout, r)]
                for n in names}
    sections += ["<h2>Held-out rewards: in-domain and out-of-domain</h2>",
                 "<p>z-score: the change since the first evaluation in units of its spread across the held-out prompts "
                 "(g2rpo.hacking). Solid: trained on (in-domain); dashed: not trained on (out-of-domain).</p>",
                 svg_chart("held-out z-scores", z_series, {n for n in names if n.startswith("ood/")})]

    # each reward's own curves
    sections.append("<h2>Each reward</h2>")
    trained = sorted({k.removeprefix("reward/") for r in metrics for k in r if k.startswith("reward/")})
    for name in sorted(set(trained) | set(names)):
        series = {}
        if name in trained:
            series[f"reward/{name}"] = [(r["step"], r[f"reward/{name}"]) for r in metrics if f"reward/{name}" in r]
        if name in names:
            series[f"heldout/{name}"] = [(r["step"], r[f"heldout/{name}"]) for r in heldout if f"heldout/{name}" in r]
        sections.append(svg_chart(name, series, {k for k in series if "ood/" in k}))

    # hacking flags
    flagged = [r for r in heldout if r.get("hacking")]
    sections.append("<h2>Hacking flags</h2>")
    if flagged:
        sections.append("<table><tr><th>after step</th><th>out-of-domain rewards that fell</th></tr>" + "".join(
            f"<tr><td>{r['step']}</td><td>{html.escape(', '.join(r['hacking']))}</td></tr>" for r in flagged) + "</table>")
    else:
        sections.append("<p>none: no out-of-domain reward fell below its start while the trained ones rose.</p>")

    # sample strips
    sections.append("<h2>Sample strips</h2><p>The same held-out prompts and noise at every evaluation.</p>")
    strips = sorted((out / "samples" / "heldout").glob("step-*.png"))
    for path in strips:
        step = int(path.stem.removeprefix("step-"))
        rel = path.relative_to(out).as_posix()
        sections.append(f'<figure data-step="{step}"><img src="{html.escape(rel)}" alt="after {step} steps">'
                        f"<figcaption>after {step} steps</figcaption></figure>")
    if not strips:
        sections.append("<p>none (eval.strip = 0 or no evaluation yet).</p>")

    # checkpoints
    best = json.loads((out / "best.json").read_text()) if (out / "best.json").is_file() else None
    sections.append("<h2>Checkpoints</h2><table><tr><th>checkpoint</th><th>committed</th><th>held-out after it</th>"
                    "<th>best</th></tr>")
    for path in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(path.name.split("-")[1])
        record = next((r for r in heldout if r["step"] == step + 1), None)
        scores = ", ".join(f"{k}={v:.4g}" for k, v in hacking._rewards(record).items()) if record else "-"
        mark = "best" if best and best["checkpoint"] == path.name else ""
        sections.append(f"<tr><td>{path.name}</td><td>{'yes' if (path / 'COMMITTED').is_file() else 'no'}</td>"
                        f"<td>{html.escape(scores)}</td><td>{mark}</td></tr>")
    sections.append("</table>")
    if best:
        sections.append(f"<p>best by {html.escape(best['by'])}: {best['checkpoint']} ({best['value']:.4g}); "
                        f"give <code>{html.escape(str(out / 'best'))}</code> to inference or evaluation.</p>")

    # config
    sections += ["<h2>Config in force</h2>", f"<pre>{html.escape(config_text)}</pre>", "<h2>Config history</h2><ul>"]
    sections += [f"<li>step {h.get('step')}: {'resumed from ' + html.escape(str(h['resumed_from'])) if h.get('resumed_from') else 'started'}"
                 f"{' -- changed: ' + html.escape('; '.join(h['changes'])) if h.get('changes') else ''}</li>" for h in history]
    sections.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}figure{display:inline-block;margin:4px}"
             "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>g2rpo report</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(sections) + "\n</body></html>\n")


def write_report(out_dir: str | Path) -> Path:
    from g2rpo.io import atomic_write_text

    path = Path(out_dir) / REPORT
    atomic_write_text(path, build_report(out_dir))
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output_dir", type=Path)
    args = p.parse_args(argv)
    if not (args.output_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{args.output_dir}: no metrics.jsonl; expected a training run's output_dir")
    print(write_report(args.output_dir))


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

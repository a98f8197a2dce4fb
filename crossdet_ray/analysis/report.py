"""report.html: one self-contained page (pictures as PNG data URIs, no network) with the
summary table, the ranking by mAP, the Pareto choice, every picture and each failure."""

from __future__ import annotations

import base64
import html
from typing import Any

from crossdet_ray.engine.storage import RunStorage

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; } h3 { font-size: 14px; }
.meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
tr.failed td { background: #fdecea; }
.choice { background: #eef6ee; border: 1px solid #9c9; padding: 10px 14px; border-radius: 6px;
          font-size: 14px; display: inline-block; }
.failures { background: #fdecea; border: 1px solid #e99; padding: 10px 14px;
            border-radius: 6px; font-size: 13px; }
.pictures img { max-width: 100%; border: 1px solid #ddd; margin: 6px 6px 6px 0; }
.frames { display: flex; flex-wrap: wrap; gap: 8px; }
.frames figure { margin: 0; } .frames img { max-width: 660px; border: 1px solid #ddd; }
figcaption { font-size: 12px; color: #555; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}">'


def _format(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


SUMMARY_COLUMNS = (
    ("trial", "trial", None), ("backbone", "backbone", None), ("epoch", "epoch", None),
    ("params", "params", None), ("model_size_mb", "size MB", 1), ("map", "mAP", 4),
    ("map50", "mAP50", 4), ("map75", "mAP75", 4), ("map_small", "AP small", 4),
    ("map_medium", "AP medium", 4), ("map_large", "AP large", 4), ("ar100", "AR@100", 4),
    ("infer_ms_per_image", "ms / image", 1), ("fps", "FPS", 1),
    ("peak_memory_mb", "peak MB", 0), ("status", "status", None),
)


def _table(columns, rows, row_class=lambda row: "") -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{"text" if isinstance(row.get(key), str) else ""}">'
            f'{_format(row.get(key), digits if digits is not None else 4)}</td>'
            for key, _, digits in columns)
        body.append(f'<tr class="{row_class(row)}">{cells}</tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _choice(summary: dict[str, Any]) -> str:
    rows = {r["trial"]: r for r in summary["trials"]}
    choice = summary["choice"]
    if not choice["most_accurate"]:
        return '<p class="failures">No trial could be evaluated.</p>'

    def describe(name: str) -> str:
        row = rows[name]
        return (f"<b>{html.escape(name)}</b> ({html.escape(str(row['backbone']))}): mAP "
                f"{_format(row['map'])}, mAP50 {_format(row['map50'])}, "
                f"{_format(row['infer_ms_per_image'], 1)} ms per image")

    front = ", ".join(html.escape(n) for n in choice["pareto_front"]) or "&ndash;"
    return (f'<div class="choice">Most accurate: {describe(choice["most_accurate"])}<br>'
            f'Fastest within 1 mAP point of the best: '
            f'{describe(choice["fastest_close_to_best"])}<br>'
            f'Pareto front (mAP vs ms per image), fastest first: {front}</div>')


def render_report(summary: dict[str, Any], pictures: dict[str, bytes],
                  out: RunStorage) -> str:
    trials = summary["trials"]
    failed = [r for r in trials if r["status"] != "ok"]
    ranked = [{**row, "rank": rank} for rank, row in enumerate(sorted(
        (r for r in trials if r["status"] == "ok"),
        key=lambda r: (-r["map"], r["infer_ms_per_image"] or 0.0)), start=1)]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation: {html.escape(summary['source'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Evaluation report</h1>",
        f'<p class="meta">Source: {html.escape(summary["source"])}<br>'
        f'Frames: {html.escape(summary["data"])} '
        f'({"the run&#39;s test split" if summary["split"] == "test" else "every labelled frame"})'
        f'<br>Checkpoint: {html.escape(str(summary["checkpoint"]))}; resize '
        f'{_format(summary["min_size"])} / {_format(summary["max_size"])} '
        f'(min / max size; &ndash; = each checkpoint&#39;s own)<br>'
        "COCO metrics by pycocotools; inference time = the model alone on frames in memory, "
        "after a warm-up, each trial timed alone.</p>",
        "<h2>Choice</h2>", _choice(summary),
    ]
    if failed:
        items = "".join(f"<li><b>{html.escape(r['trial'])}</b>: {html.escape(str(r['error']))}"
                        "</li>" for r in failed)
        parts += ["<h2>Failed trials</h2>", f'<div class="failures"><ul>{items}</ul></div>']
    parts += ["<h2>Summary</h2>",
              _table(SUMMARY_COLUMNS, trials,
                     lambda r: "failed" if r["status"] != "ok" else "")]
    parts += ["<h2>Ranking by mAP</h2>",
              _table((("rank", "rank", None), ("trial", "trial", None), ("map", "mAP", 4),
                      ("map50", "mAP50", 4), ("infer_ms_per_image", "ms / image", 1)),
                     ranked)]
    parts.append('<h2>Pictures</h2><div class="pictures">')
    for file_name, title in (("curves.png", "Training curves"),
                             ("pr_curves.png", "Precision-recall at IoU 0.5"),
                             ("pareto.png", "mAP vs inference time")):
        if file_name in pictures:
            parts.append(f"<h3>{title} ({file_name})</h3>{_img(pictures[file_name], title)}")
    parts.append("</div>")
    if summary["per_class_ap"]:
        parts += ["<h2>Per-class AP</h2>",
                  _table((("trial", "trial", None), ("class_id", "class", None),
                          ("ap", "AP@[.5:.95]", 4), ("ap50", "AP50", 4)),
                         summary["per_class_ap"])]
    parts.append("<h2>Detections</h2><p class='meta'>A fixed sample of frames for every trial, "
                 "then each trial's worst frames (most missed objects + false detections at "
                 "score 0.5, IoU 0.5).</p>")
    for name, drawings in summary["detections"].items():
        parts.append(f"<h3>{html.escape(name)}</h3><div class='frames'>")
        for drawing in drawings:
            caption = f"{drawing['frame']} ({drawing['kind']}, {drawing['errors']} errors)"
            parts.append(f"<figure>{_img(out.read_bytes(drawing['path']), caption)}"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)

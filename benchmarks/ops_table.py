"""Markdown tables from a bench_ops.py JSON file: python benchmarks/ops_table.py results.json"""

import json
import sys


def table(path):
    d = json.load(open(path))
    info = d["info"]
    lines = [
        f"Device: {info['device']}" + (f", driver {info['driver']}" if info.get("driver") else "")
        + f"; torch {info['torch']}; {info['date']}; measured copy bandwidth {info['copy_bandwidth_GBps']:.0f} GB/s "
        "(bytes read + written). Median of torch.utils.benchmark blocked_autorange.",
        "",
    ]
    heads = {
        "grad_dot": "grad_dot, classifier stage (B, F, C, P, dtype); R = 1",
        "dii_scores": "dii_scores, end to end from features + logits + labels (B, F, C, h, dtype); labels at 4h x 4h",
        "foreground_paste": "foreground_paste (B, K, C, H, W, dtype)",
    }
    for op, head in heads.items():
        rows = [r for r in d["rows"] if r["op"] == op]
        if not rows:
            continue
        lines += [f"**{head}**", "", "| case | variant | median ms | peak extra MiB | GB/s | % of copy BW | x slower than ext |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {tuple(r['case'])} | {r['variant']} | {r['time_s'] * 1e3:.3f} | {r['peak_bytes'] / 2**20:.1f} | "
                f"{r['GBps']:.0f} | {100 * r['roofline_frac']:.0f}% | {r['ext_speedup']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))

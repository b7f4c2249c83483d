"""Issue 18's figures side by side over seeds: runs of ``benchmarks/noise_opt.py`` on the same test prompts with
different ``--seed`` (different noises), the headline judge (held-out strict) per method and seed, Δ vs base
(paired), and the three targets per seed.

    python benchmarks/noise_seeds.py runs/noise_opt runs/noise_opt_s1 [--out docs/noise_seeds.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from noise_opt import ALL, LABELS, paired

H = "heldout_strict"


def load(d: Path) -> dict:
    return {n: json.loads((d / f"{n}.json").read_text()) for n in ALL if (d / f"{n}.json").is_file()}


def diff(recs, x, y):
    if x not in recs or y not in recs:
        return None
    _, m, se = paired(recs[x]["tags"], [v[H] for v in recs[x]["verdicts"]], [v[H] for v in recs[y]["verdicts"]])
    return m, se


def fmt(d):
    return "–" if d is None else f"{d[0]:+.3f} ± {d[1]:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    runs = [(Path(d), load(Path(d))) for d in a.dirs]
    seeds = [json.loads((d / "results.json").read_text())["args"]["seed"] if (d / "results.json").is_file() else d.name
             for d, _ in runs]
    names = [n for n in ALL if all(n in r for _, r in runs)]
    lines = ["Held-out strict verdict (headline), mean of the six tasks ± SE; Δ vs base paired (same prompts and "
             "seeds).", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | " + " | ".join(f"Δ vs base, seed {s}"
                                                                               for s in seeds) + " |",
             "|---|" + "---|" * (2 * len(runs))]
    for n in names:
        cells = [f"{r[n]['judges'][H]['overall']:.3f} ± {r[n]['judges'][H]['se_overall']:.3f}" for _, r in runs]
        cells += ["–" if n == "base" else fmt(diff(r, n, "base")) for _, r in runs]
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    lines += ["", "Targets per seed (paired differences, held-out strict):", "",
              "| target | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(runs)]

    def row(label, f):
        lines.append(f"| {label} | " + " | ".join(f(r) for _, r in runs) + " |")

    def reno(r):
        d = diff(r, "reno_shapeclip", "base")
        return f"{fmt(d)}: {'met' if d and d[0] >= 0.10 else 'missed'}"

    def carinox(r):
        b, c = diff(r, "carinox", "bon_shapeclip"), diff(r, "carinox", "reno_shapeclip")
        if b is None or c is None:
            return "–"
        ok = b[0] >= 0 and c[0] >= 0
        return f"vs best-of-N {fmt(b)}, vs ReNO {fmt(c)}: {'met' if ok else 'missed'}"

    def fk(name, ref):
        def f(r):
            d = diff(r, name, ref)
            if d is None:
                return "–"
            verdict = "beats (> 2 SE)" if d[0] > 2 * d[1] else ("above, within 2 SE" if d[0] > 0 else "not above")
            return f"{fmt(d)}: {verdict}"
        return f

    row("ReNO − base ≥ +0.10", reno)
    row("CARINOX ≥ max(best-of-N, ReNO)", carinox)
    for name, ref in (("fk_shapeclip", "bon_shapeclip"), ("fk_shapeclip_tuned", "bon_shapeclip"),
                      ("fk_judge", "bon_judge"), ("fk_judge_tuned", "bon_judge"),
                      ("fk_shapevalue", "bon_shapevalue"), ("fk_shapevalue_tuned", "bon_shapevalue"),
                      ("fk_shapevalue", "bon_shapeclip")):
        if all(name in r for _, r in runs):
            row(f"{name} − {ref} > 0", fk(name, ref))
    md = "\n".join(lines)
    if a.out:
        Path(a.out).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

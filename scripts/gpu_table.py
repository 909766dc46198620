"""Turns the JSON of `bench_attention.py --device cuda` and `bench_topk.py --device cuda` runs into the rows of
minillm's CUDA dispatch table (minillm/ops/_backend.py: CUDA_KERNEL_TABLE) that the measured ratios justify,
and merges the runs into one JSON per benchmark. scripts/gpu_check.sh calls it last.

A row is printed only for a case where minillm's kernel ("kernel") beat both torch paths it would replace by
at least --margin in the same run: torch's own function ("sdpa" / "torch") and the path minillm takes without
the kernel ("minillm", timed with MINILLM_CUDA_KERNELS=off). A row covers only measured sizes: a run of
consecutive N (attention) or Q (top-k) values that all won, never beyond them.

    python scripts/gpu_table.py --attention a1.json a2.json --topk t.json [--margin 1.1] [--out-dir DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

# bench_attention's cases: (causal, padded). The padded row needs both padded cases to win.
CASES = {"bidir": (False, False), "causal": (True, False), "pad25%": (False, True), "varlen": (False, True)}


def _load(paths: Sequence[str]) -> List[dict]:
    runs = []
    for p in paths:
        try:
            runs.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as exc:  # a run killed before its first row, say
            print(f"skipping {p}: {type(exc).__name__}: {exc}")
    return runs


def _ratio(row: dict, kernel: str, bases: Sequence[str]) -> float:
    """Time of the faster torch path over the kernel's time (nan when any is missing)."""
    k = row.get(f"{kernel} ms", math.nan)
    base = min((row.get(f"{b} ms", math.nan) for b in bases), default=math.nan)
    return base / k if k and k > 0 else math.nan


def _runs_of_wins(points: List[Tuple[int, float]], margin: float) -> List[Tuple[int, int, float]]:
    """Maximal runs of consecutive measured sizes whose ratio >= margin: (lo, hi, smallest ratio)."""
    out, cur = [], None
    for size, r in sorted(points):
        if r >= margin:  # nan compares False
            cur = [cur[0], size, min(cur[2], r)] if cur else [size, size, r]
        elif cur:
            out.append(tuple(cur))
            cur = None
    if cur:
        out.append(tuple(cur))
    return out


def _measured(info: dict, date: str, command: str, ratio: float) -> str:
    return f"{info.get('gpu', 'GPU')}, {date}, {command}, >= {ratio:.2f}x torch"


def attention_rows(runs: List[dict], margin: float, date: str) -> List[str]:
    rows = []
    for run in runs:
        info = run["info"]
        arch = tuple(info.get("arch", (0, 0)))
        D, dtype = int(info["head_dim"]), info["dtype"]
        by = {}  # (causal, padded, pass) -> N -> worst ratio over the cases that map there
        for r in run["rows"]:
            causal, padded = CASES[r["case"]]
            ratio = _ratio(r, "kernel", ("sdpa", "minillm"))
            slot = by.setdefault((causal, padded, r["pass"]), {})
            slot[r["N"]] = min(slot.get(r["N"], math.inf), ratio) if not math.isnan(ratio) else math.nan
        command = f"bench_attention.py --device cuda --dtype {dtype} --d {D}"
        for (causal, padded, passes), points in sorted(by.items()):
            for lo, hi, worst in _runs_of_wins(list(points.items()), margin):
                rows.append(f'KernelRow("attention", "{dtype}", {arch}, dim=({D}, {D}), n=({lo}, {hi}), '
                            f'q=({lo}, {hi}), passes="{passes}", causal={causal}, padded={padded}, '
                            f'measured="{_measured(info, date, command, worst)}"),')
    return rows


def topk_rows(runs: List[dict], margin: float, date: str) -> List[str]:
    rows = []
    for run in runs:
        info = run["info"]
        arch = tuple(info.get("arch", (0, 0)))
        groups: Dict[tuple, List[Tuple[int, float]]] = {}
        for r in run["rows"]:
            groups.setdefault((r["dtype"], r["N"], r["d"]), []).append((r["Q"], _ratio(r, "kernel", ("torch", "minillm"))))
        for (dtype, N, d), points in sorted(groups.items()):
            command = f"bench_topk.py --device cuda --n {N} --d {d} --corpus-dtype {dtype}"
            for lo, hi, worst in _runs_of_wins(points, margin):
                rows.append(f'KernelRow("topk_search", "{dtype}", {arch}, dim=({d}, {d}), n=({N}, {N}), '
                            f'q=({lo}, {hi}), passes="search", measured="{_measured(info, date, command, worst)}"),')
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention", nargs="*", default=[])
    ap.add_argument("--topk", nargs="*", default=[])
    ap.add_argument("--margin", type=float, default=1.1, help="kernel must be this much faster (noise margin)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--out-dir", help="write attention.json, topk.json (the runs merged) and dispatch_rows.txt")
    args = ap.parse_args(argv)
    attn, topk = _load(args.attention), _load(args.topk)
    rows = attention_rows(attn, args.margin, args.date) + topk_rows(topk, args.margin, args.date)
    text = "\n".join(rows) if rows else "(none: minillm's CUDA kernels won no measured case by the margin)"
    print(f"dispatch-table rows the ratios justify (kernel >= {args.margin}x both torch paths):")
    print(text)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention.json").write_text(json.dumps(attn, indent=1, default=str) + "\n")
        (out / "topk.json").write_text(json.dumps(topk, indent=1, default=str) + "\n")
        (out / "dispatch_rows.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

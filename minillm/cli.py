"""The `minillm` command line (also `python -m minillm`).

    minillm quickstart                       train a small GPT on offline text for about a minute, then sample
    minillm train --data_path FILE ...       train a model (the seed's `--mode train` form works too)
    minillm generate --model_path DIR_OR_GGUF --prompt TEXT [--chat] [--quantize int8|int4 [--group_size 32|64]]
    minillm continue --model_path DIR --data_path FILE
    minillm extract --model_path DIR --output_path DIR [--dtype bfloat16]
    minillm rag index --docs PATH --store PATH       index .txt/.md/.rst files or folders (adds to the store)
    minillm rag query --store PATH "question" [--top-k K] [--search_mode hybrid] [--generate [--model_path DIR]]
    minillm demo                             check and time the kernels against torch
"""
from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

# torch, safetensors and the kernels are imported by the commands that use them, so that `minillm --help` and
# argument errors answer at once (importing torch alone takes seconds on a cold start).

log = logging.getLogger("minillm")

# Standard-library modules whose docstrings make the quick start's offline training text.
QUICKSTART_MODULES = (
    "argparse", "asyncio", "bisect", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "fractions", "functools", "glob", "heapq", "inspect", "io", "itertools", "json", "logging",
    "math", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tempfile", "textwrap", "threading", "time", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)


def _median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def demo(args: argparse.Namespace) -> int:
    """Runs each op once against its torch counterpart: the answer is checked, then both are timed."""
    import torch
    import torch.nn.functional as F

    from minillm import ops

    torch.manual_seed(0)
    print("minillm", __import__("minillm").__version__, "| torch", torch.__version__)
    print("backend:", json.dumps(ops.backend_info(), indent=2))

    B, H, N, D = 4, 8, args.seq_len, 64
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    lengths = torch.randint(N // 2, N + 1, (B,))
    keep = torch.arange(N)[None, :] < lengths[:, None]  # (B, N) key padding
    print(f"\nattention  B={B} H={H} N={N} D={D}, fp32, {torch.get_num_threads()} threads")
    print(f"{'case':<22}{'minillm ms':>12}{'torch ms':>10}{'ratio':>8}{'max |diff|':>12}")
    cases = [
        ("bidirectional", dict(causal=False), dict(is_causal=False)),
        ("causal", dict(causal=True), dict(is_causal=True)),
        ("key padding", dict(key_padding_mask=keep), dict(attn_mask=keep[:, None, None, :])),
    ]
    for name, ours_kw, torch_kw in cases:
        ours = lambda: ops.attention(q, k, v, **ours_kw)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, **torch_kw)  # noqa: E731
        diff = (ours() - theirs()).abs().max().item()
        t_ours, t_theirs = _median_ms(ours), _median_ms(theirs)
        print(f"{name:<22}{t_ours:>12.2f}{t_theirs:>10.2f}{t_theirs / t_ours:>7.2f}x{diff:>12.2e}")

    n, d, nq, topk = args.corpus_size, 384, 16, 10
    corpus = F.normalize(torch.randn(n, d), dim=1)
    queries = F.normalize(corpus[torch.randint(0, n, (nq,))] + 0.1 * torch.randn(nq, d), dim=1)
    print(f"\ntop-{topk} search  N={n} d={d} Q={nq}, inner product")
    ours = lambda: ops.topk_search(queries, corpus, topk, "ip")  # noqa: E731
    theirs = lambda: torch.topk(queries @ corpus.T, topk, dim=1)  # noqa: E731
    same = (ours()[1] == theirs().indices).float().mean().item()
    t_ours, t_theirs = _median_ms(ours), _median_ms(theirs)
    print(f"{'minillm ms':>12}{'torch ms':>10}{'ratio':>8}{'same ids':>10}")
    print(f"{t_ours:>12.2f}{t_theirs:>10.2f}{t_theirs / t_ours:>7.2f}x{same:>10.1%}")
    return 0


def _model_config(args: argparse.Namespace, vocab_size: int) -> dict:
    return {"model_type": args.model_type, "vocab_size": vocab_size, "d_model": args.d_model,
            "num_heads": args.num_heads, "num_layers": args.num_layers, "d_ff": args.d_ff,
            "max_seq_len": args.max_seq_len, "dropout": args.dropout}


def _make_tokenizer(kind: str, vocab_size: int, texts: List[str]):
    from minillm.tokenizers import BPETokenizer, CharTokenizer

    if kind == "char":
        return CharTokenizer.from_texts(texts)
    return BPETokenizer(vocab_size=vocab_size).train(texts)


def train(args: argparse.Namespace) -> int:
    from minillm.models import build_model
    from minillm.training import Trainer, create_dataloaders, load_and_split_data

    if args.model_type == "transformer":
        raise ValueError("--model_type transformer needs paired data; use the Python API with task='seq2seq'")
    train_texts, val_texts, _ = load_and_split_data(args.data_path, args.split_method, args.val_split, 0.0, args.seed)
    tokenizer = _make_tokenizer(args.tokenizer, args.vocab_size, train_texts)
    max_length = min(args.max_length, args.max_seq_len)
    train_loader, val_loader = create_dataloaders(train_texts, val_texts, tokenizer, args.batch_size, max_length,
                                                  seed=args.seed, streaming=args.streaming, token_dir=args.token_dir)
    model = build_model(_model_config(args, tokenizer.vocab_size))
    log.info("%s with %.2fM parameters, %s tokenizer (%d tokens)", type(model).__name__,
             model.num_parameters() / 1e6, args.tokenizer, tokenizer.vocab_size)
    trainer = Trainer(model, train_loader, val_loader, learning_rate=args.learning_rate,
                      checkpoint_dir=args.checkpoint_dir, device=args.device,
                      early_stopping_patience=args.early_stopping_patience,
                      early_stopping_min_delta=args.early_stopping_min_delta, tokenizer=tokenizer,
                      eval_interval=args.eval_interval, max_steps=args.max_steps, seed=args.seed,
                      bf16="auto" if args.bf16 else False, save_total_limit=args.save_total_limit,
                      gradient_checkpointing=args.gradient_checkpointing, compute_metrics=args.compute_metrics,
                      metric_for_best_model=args.metric_for_best_model)
    results = trainer.train(args.epochs, resume=args.resume, resume_from=args.resume_from)
    if trainer.is_main:  # under torchrun, one process speaks
        print(json.dumps({k: v for k, v in results.items() if k != "history"}))
        print(f"best model: {Path(args.checkpoint_dir) / 'best_model'}")
    return 0


def generate(args: argparse.Namespace) -> int:
    from minillm.models import DecoderOnlyModel
    from minillm.training import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model_path, device=args.device)
    if not isinstance(model, DecoderOnlyModel):
        raise ValueError(f"generate needs a decoder-only model; {args.model_path} holds a {type(model).__name__}")
    if args.quantize:  # weights as int8 / 4-bit codes: faster decoding (docs/models.md, "Quantized weights")
        model.quantize(args.quantize, args.group_size)
    prompt = args.prompt
    if args.chat:  # the model's chat format around one user turn; only the reply is printed
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat needs a model with a chat template; {args.model_path} has none")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    if not tokenizer.encode(prompt):
        raise ValueError("--prompt is empty after tokenization")
    if not args.chat:
        print(args.prompt, end="", flush=True)
    # Streamed: each piece is printed as soon as its tokens are sampled.
    for piece in model.stream(prompt, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or (),
                              repetition_penalty=args.repetition_penalty):
        print(piece, end="", flush=True)
    print()
    return 0


def continue_(args: argparse.Namespace) -> int:
    from minillm.tokenizers import load_tokenizer
    from minillm.training import continue_training, create_dataloaders, load_and_split_data

    from minillm.models.base import CONFIG_NAME
    from minillm.training.extraction import _model_dir

    tokenizer = load_tokenizer(Path(args.model_path))
    # As train does: examples no longer than the model takes (the quick start's model has 128 positions)
    window = json.loads((_model_dir(args.model_path) / CONFIG_NAME).read_text(encoding="utf-8")).get("max_seq_len")
    max_length = min(args.max_length, window) if window else args.max_length
    if max_length < args.max_length:
        log.info("--max_length %d clamped to the model's max_seq_len %d", args.max_length, max_length)
    train_texts, val_texts, _ = load_and_split_data(args.data_path, args.split_method, args.val_split, 0.0, args.seed)
    train_loader, val_loader = create_dataloaders(train_texts, val_texts, tokenizer, args.batch_size, max_length,
                                                  seed=args.seed)
    results = continue_training(args.model_path, train_loader, val_loader, learning_rate=args.learning_rate,
                                epochs=args.epochs, checkpoint_dir=args.checkpoint_dir,
                                early_stopping_patience=args.early_stopping_patience, device=args.device,
                                early_stopping_min_delta=args.early_stopping_min_delta)
    print(json.dumps({k: v for k, v in results.items() if k != "history"}))
    return 0


def extract(args: argparse.Namespace) -> int:
    import torch

    from minillm.training import extract_model_for_inference

    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    print(extract_model_for_inference(args.model_path, args.output_path, device="cpu", dtype=dtype))
    return 0


def stdlib_text() -> str:
    """Docstrings of standard-library modules: English prose and code, on every machine, offline."""
    import importlib
    import inspect

    parts = []
    for name in QUICKSTART_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)
                                          or inspect.isbuiltin(obj)) else None
            if doc and len(doc) > 80 and doc not in parts:
                parts.append(doc)
    return "\n\n".join(parts)


def quickstart(args: argparse.Namespace) -> int:
    """Trains a character-level GPT on standard-library docstrings for about a minute, with early
    stopping and a progress bar, then samples from the best model."""
    import torch

    from minillm.models import DecoderOnlyModel
    from minillm.tokenizers import CharTokenizer
    from minillm.training import Trainer, create_dataloaders, load_and_split_data

    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "stdlib_docstrings.txt"
    data.write_text(stdlib_text(), encoding="utf-8")
    train_texts, val_texts, _ = load_and_split_data(data, "paragraph", 0.1, 0.0, seed=0)
    tokenizer = CharTokenizer.from_texts(train_texts)
    train_loader, val_loader = create_dataloaders(train_texts, val_texts, tokenizer, batch_size=16, max_length=128)
    print(f"quick start: {data} ({data.stat().st_size / 1e3:.0f} kB of docstrings), {len(train_texts)} training "
          f"paragraphs, {tokenizer.vocab_size} characters")
    model = DecoderOnlyModel({"model_type": "decoder_only", "vocab_size": tokenizer.vocab_size, "d_model": 128,
                              "num_heads": 4, "num_layers": 4, "max_seq_len": 128, "dropout": 0.0})
    trainer = Trainer(model, train_loader, val_loader, learning_rate=2e-3, checkpoint_dir=out / "checkpoints",
                      early_stopping_patience=3, eval_interval=50, eval_batches=20, max_steps=args.steps,
                      tokenizer=tokenizer, warmup_steps=20)
    t0 = time.perf_counter()
    results = trainer.train(epochs=100)
    print(f"trained {results['steps']} steps in {time.perf_counter() - t0:.0f} s; best validation loss "
          f"{results['best_val_loss']:.3f} at step {results['best_step']}"
          + (" (stopped early)" if results["early_stopped"] else ""))
    prompt = "Return the"
    ids = torch.tensor([tokenizer.encode(prompt)])
    sample = model.generate(ids, max_new_tokens=300, temperature=0.8, top_k=20, seed=0)
    print(f"\nsample from the best model (prompt {prompt!r}):\n{tokenizer.decode(sample[0].tolist())}\n")
    print(f"model, tokenizer and metrics: {out / 'checkpoints' / 'best_model'}")

    # Retrieval over the same text: split, embed, store, ask.
    from minillm.rag import DocumentProcessor, SimpleDocumentStore
    from minillm.rag.embedders import minilm_available

    store = SimpleDocumentStore(embedding_dim=384 if minilm_available() else 256)
    chunks = list(dict.fromkeys(DocumentProcessor.split_text(data.read_text(encoding="utf-8"), "paragraph",
                                                             min_length=80, max_length=600)))  # no duplicates
    store.add_documents(chunks)
    print(f"\nRAG: embedding {len(chunks)} passages with {store.embedder.name}")
    store.compute_embeddings()
    store.save(out / "document_store")
    question = args.question
    print(f"question: {question} (hybrid search: words and meaning, fused by rank)")
    for rank, hit in enumerate(store.search(question, top_k=3, mode="hybrid"), 1):
        print(f"[{rank}] score {hit['score']:.3f}: " + hit["text"][:240].replace("\n", " ")
              + ("..." if len(hit["text"]) > 240 else ""))
    print(f"document store: {out / 'document_store'} (query it: minillm rag query --store {out / 'document_store'} "
          f"\"your question\")")
    return 0


DOC_SUFFIXES = (".txt", ".md", ".rst")
SPLIT_METHODS = ("paragraph", "sentence", "chunk", "semantic", "regex", "recursive")


def _doc_files(paths: List[str]) -> List[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(DOC_SUFFIXES)))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no file or folder at {p}")
    if not files:
        raise ValueError(f"no .txt, .md or .rst files under {', '.join(paths)}")
    return files


def rag_index(args: argparse.Namespace) -> int:
    from minillm.rag import DocumentProcessor, SimpleDocumentStore
    from minillm.utils import find_dir, progress_bar

    existing = not args.rebuild and find_dir(Path(args.store), "store.sqlite") is not None
    store = SimpleDocumentStore.load(args.store) if existing else SimpleDocumentStore(embedding_dim=args.embedding_dim)
    before = len(store)
    files = _doc_files(args.docs)
    removed = 0
    for f in progress_bar(files, desc="splitting", unit="file"):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            log.warning("skipping %s: not UTF-8 text", f)
            continue
        chunks = DocumentProcessor.split_chunks(text, method=args.method, min_length=args.min_length,
                                                max_length=args.max_length, overlap=args.overlap,
                                                pattern=args.pattern)
        # Stable ids (path and span): indexing a file again updates its chunks in place, re-embeds only changed
        # text, and removes the chunks its new version no longer has.
        ids = [f"{f}:{c.start}-{c.end}" for c in chunks]
        if existing:
            keep = set(ids)
            removed += store.delete([d["id"] for d in store.get(where={"source": str(f)}) if d["id"] not in keep])
        store.add_documents([c.text for c in chunks],
                            metadatas=[{"source": str(f), "start": c.start, "end": c.end,
                                        "headings": c.headings or []} for c in chunks], ids=ids)
    embedded = store.compute_embeddings(batch_size=32)
    store.save(args.store)
    print(f"{'updated' if existing else 'indexed'} {args.store}: {len(store)} chunks ({len(store) - before:+d}, "
          f"{embedded} embedded, {removed} removed) from {len(files)} files with {store.embedder.name}")
    return 0


def rag_query(args: argparse.Namespace) -> int:
    from minillm.rag import RAGModel, SimpleDocumentStore

    store = SimpleDocumentStore.load(args.store)
    hits = store.search(args.question, top_k=args.top_k, mode=args.search_mode)
    for rank, h in enumerate(hits, 1):
        where = h["metadata"].get("source", h["id"])
        print(f"[{rank}] score {h['score']:.3f}  {where}")
        print("    " + h["text"][:300].replace("\n", "\n    ") + ("..." if len(h["text"]) > 300 else ""))
    if args.generate:
        from minillm.training import load_model_and_tokenizer

        model_path = args.model_path
        if model_path is None:  # the chat model users install for this: SmolLM2-135M-Instruct
            from minillm.models import smollm2_path

            try:
                model_path = smollm2_path()
            except FileNotFoundError as e:
                raise ValueError(f"--generate needs --model_path, or SmolLM2 installed as the default ({e})") from None
        model, tokenizer = load_model_and_tokenizer(model_path)
        rag = RAGModel(store, model, tokenizer, search_mode=args.search_mode)
        print("\nanswer: ", end="", flush=True)
        for piece in rag.stream(args.question, top_k=args.top_k, max_length=args.max_length,
                                temperature=args.temperature, seed=args.seed):
            print(piece, end="", flush=True)
        print()
        for p in rag.last_sources:
            print(f"  [{p['number']}] {p['metadata'].get('source', p['id'])}{' (cut)' if p.get('truncated') else ''}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model_type", choices=["decoder_only", "encoder_only", "transformer"], default="decoder_only",
                   help="architecture (default decoder_only; encoder_only trains with masked LM)")
    g.add_argument("--tokenizer", choices=["char", "bpe"], default="bpe", help="tokenizer to train (default bpe)")
    g.add_argument("--vocab_size", type=int, default=8000, help="BPE vocabulary size (default 8000)")
    g.add_argument("--d_model", type=int, default=256, help="model width (default 256)")
    g.add_argument("--num_heads", type=int, default=4, help="attention heads (default 4)")
    g.add_argument("--num_layers", type=int, default=4, help="layers (default 4)")
    g.add_argument("--d_ff", type=int, default=None, help="MLP width (default 4 * d_model)")
    g.add_argument("--max_seq_len", type=int, default=256, help="longest sequence the model takes (default 256)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout (default 0.1)")


def _add_data_args(p: argparse.ArgumentParser, training: bool = True) -> None:
    g = p.add_argument_group("data and training")
    g.add_argument("--data_path", required=True, help="a UTF-8 text file")
    g.add_argument("--split_method", choices=["paragraph", "line", "sentence", "chunk"], default="paragraph",
                   help="how the file is cut into examples (default paragraph)")
    g.add_argument("--val_split", type=float, default=0.1, help="fraction held out for validation (default 0.1)")
    g.add_argument("--batch_size", type=int, default=16, help="batch size (default 16)")
    g.add_argument("--max_length", type=int, default=256, help="tokens per example (default 256)")
    g.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    g.add_argument("--learning_rate", type=float, default=1e-3 if training else 1e-4,
                   help=f"peak learning rate (default {1e-3 if training else 1e-4})")
    g.add_argument("--early_stopping_patience", type=int, default=None,
                   help="stop after this many evaluations without improvement (default: never)")
    g.add_argument("--early_stopping_min_delta", type=float, default=0.0, help="smallest improvement (default 0)")
    g.add_argument("--checkpoint_dir", default="./checkpoints" if training else "./checkpoints/continued",
                   help="where best_model/ and last/ go")
    g.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="MODE")

    p = sub.add_parser("quickstart", help="train a small GPT on offline text, then sample from it")
    p.add_argument("--output_dir", default="minillm-quickstart", help="where data and checkpoints go")
    p.add_argument("--steps", type=int, default=600, help="most optimizer steps (default 600, about a minute)")
    p.add_argument("--question", default="How do I sort a list with a key function?",
                   help="the question the RAG step answers with passages")
    p.set_defaults(func=quickstart)

    p = sub.add_parser("train", help="train a model on a text file")
    _add_data_args(p)
    _add_model_args(p)
    t = p.add_argument_group("schedule")
    t.add_argument("--eval_interval", type=int, default=None, help="evaluate every N steps (default: each epoch)")
    t.add_argument("--max_steps", type=int, default=None, help="stop after N optimizer steps")
    t.add_argument("--resume", action="store_true", help="continue from checkpoint_dir/last")
    t.add_argument("--resume_from", default=None, help="continue from this checkpoint folder (e.g. checkpoint-500)")
    t.add_argument("--save_total_limit", type=int, default=None,
                   help="also save checkpoint-STEP/ at each evaluation, keeping the newest N")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast where the CPU supports it")
    t.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each block's activations in the backward (less memory, ~1/3 more compute)")
    t.add_argument("--compute_metrics", nargs="+", choices=["perplexity", "accuracy"], default=None,
                   help="metrics computed at each evaluation besides the loss")
    t.add_argument("--metric_for_best_model", default="loss",
                   help="what best_model/ and early stopping follow: loss (default) or a --compute_metrics name")
    t.add_argument("--streaming", action="store_true",
                   help="tokenize once into token files (--token_dir) and train on windows read from disk")
    t.add_argument("--token_dir", default=None,
                   help="where --streaming writes train.bin / val.bin (required under torchrun: one writer a node)")
    p.set_defaults(func=train)

    p = sub.add_parser("generate", help="sample text from a decoder (trained here, a Llama-family folder or a .gguf)")
    p.add_argument("--model_path", required=True, help="a model or checkpoint folder, or a llama .gguf file")
    p.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template; print the reply")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    p.add_argument("--stop", action="append", help="end the text before this string (repeatable)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="store the linear layers' weights as int8 or 4-bit codes (faster CPU decoding)")
    p.add_argument("--group_size", type=int, choices=[32, 64], default=None,
                   help="input channels per scale with --quantize (default: int4 32, int8 one scale per channel)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps")
    p.set_defaults(func=generate)

    p = sub.add_parser("continue", help="continue training a saved model on a text file")
    p.add_argument("--model_path", required=True, help="a model or checkpoint folder")
    _add_data_args(p, training=False)
    p.set_defaults(func=continue_)

    p = sub.add_parser("extract", help="write a weights-only copy of a model for inference")
    p.add_argument("--model_path", required=True, help="a model or checkpoint folder")
    p.add_argument("--output_path", required=True, help="output folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype")
    p.set_defaults(func=extract)

    rag = sub.add_parser("rag", help="retrieval: index documents, query them, answer with a model")
    rag_sub = rag.add_subparsers(dest="rag_command", required=True, metavar="ACTION")
    p = rag_sub.add_parser("index", help="split, embed and store .txt/.md/.rst files")
    p.add_argument("--docs", nargs="+", required=True, help="files or folders")
    p.add_argument("--store", required=True,
                   help="the document store folder: added to (upserts by file and span) unless --rebuild")
    p.add_argument("--rebuild", action="store_true", help="write a new store instead of adding to the one there")
    p.add_argument("--embedding_dim", type=int, default=384,
                   help="384 = all-MiniLM-L6-v2 when installed (minillm[pretrained]), else hashing (default 384)")
    p.add_argument("--method", choices=list(SPLIT_METHODS), default="semantic",
                   help="splitting method (default semantic: Markdown / reST sections, code kept whole)")
    p.add_argument("--pattern", default=None, help="the separator regex of --method regex")
    p.add_argument("--overlap", type=int, default=0, help="characters each chunk repeats of the one before (default 0)")
    p.add_argument("--min_length", type=int, default=50, help="shortest chunk in characters (default 50)")
    p.add_argument("--max_length", type=int, default=800, help="longest chunk in characters (default 800)")
    p.set_defaults(func=rag_index)
    p = rag_sub.add_parser("query", help="search a document store (and optionally generate an answer)")
    p.add_argument("--store", required=True, help="a folder written by `minillm rag index`")
    p.add_argument("question", help="the question")
    p.add_argument("--top-k", dest="top_k", type=int, default=5, help="passages to show (default 5)")
    p.add_argument("--search_mode", choices=["dense", "lexical", "hybrid"], default="hybrid",
                   help="search by meaning, by words, or both fused (default hybrid)")
    p.add_argument("--generate", action="store_true",
                   help="answer from the passages (with --model_path, or SmolLM2-Instruct when installed)")
    p.add_argument("--model_path", default=None, help="a decoder-only model folder or .gguf (default: SmolLM2)")
    p.add_argument("--max_length", type=int, default=100, help="answer tokens (default 100)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=rag_query)

    p = sub.add_parser("demo", help="check and time the kernels against torch on random data")
    p.add_argument("--seq-len", type=int, default=512, help="attention sequence length N (default 512)")
    p.add_argument("--corpus-size", type=int, default=200_000, help="top-k corpus rows (default 200000)")
    p.set_defaults(func=demo)
    return parser


def _mode_to_command(argv: List[str]) -> List[str]:
    """The seed's `--mode train ...` form becomes `train ...`."""
    for i, a in enumerate(argv):
        if a == "--mode" and i + 1 < len(argv):
            return [argv[i + 1]] + argv[:i] + argv[i + 2:]
        if a.startswith("--mode="):
            return [a.split("=", 1)[1]] + argv[:i] + argv[i + 1:]
    return argv


def _safetensor_error() -> type:
    """safetensors' error type once a command has loaded it (a command that never read a weights file raises
    none of them)."""
    mod = sys.modules.get("safetensors")
    return getattr(mod, "SafetensorError", ValueError) if mod else ValueError


def main(argv: Optional[List[str]] = None) -> int:
    argv = _mode_to_command(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.command in ("train", "continue", "quickstart"):
        logging.getLogger("minillm.training").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError, sqlite3.DatabaseError,
            _safetensor_error()) as exc:
        # Errors a user's files or arguments cause: one line, exit 2 (sqlite3: a corrupt store.sqlite;
        # SafetensorError: a corrupt weights file).
        print(f"minillm: error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # a config, tokenizer or store file without a field minillm needs
        print(f"minillm: error: a file lacks the field {exc}; it was not written by this minillm, or is damaged",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minillm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

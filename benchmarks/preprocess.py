"""Preprocessing throughput: ``lrpath data preprocess`` (exact and fast backends) vs Megatron-LM's
``tools/preprocess_data.py`` and raw sentencepiece.

Builds a >= 100 MB (``--size-mb``) JSONL corpus of real Python source (this interpreter's standard library, then the
virtualenv's site-packages; one file per document, never committed), trains a 32k BPE SentencePiece
model on a sample of it, measures raw ``SentencePieceProcessor.encode(list, num_threads=1)`` on it, then
tokenizes the corpus with each backend (``--backends``) and 1 and 2 workers, recording wall time,
tokens/s, tokens per CPU-second and peak memory (PSS summed over the process tree, so pages shared by
forked workers are counted once). With ``--megatron-lm DIR`` (a Megatron-LM checkout at the tag that
matches the installed megatron-core, plus its import-time dependencies on PYTHONPATH) the same runs
are made with its tool and the outputs compared byte for byte. The fast backend's mismatch rate is
measured with ``--verify`` over every document of the corpus and of the shipped corpora (data/corpora).
Finally one 50 MB document is tokenized to measure the long-document policy.

    python benchmarks/preprocess.py --megatron-lm /path/to/Megatron-LM [--extra-pythonpath DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_corpus(path: Path, min_bytes: int) -> dict:
    """Sorted .py files of the stdlib, then site-packages, as JSONL documents until ``min_bytes``."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    written = docs = 0
    with open(path, "w", encoding="utf-8") as out:
        for root in roots:
            for f in sorted(root.rglob("*.py")):
                try:
                    text = f.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= min_bytes:
                    return {"bytes": written, "documents": docs, "sources": [str(r) for r in roots]}
    raise SystemExit(f"only {written} bytes of Python source found; lower --size-mb")


class PeakMemory:
    """Polls the PSS (fallback RSS) of a process and its children; ``peak_mb`` after ``stop()``."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for p in [self.proc] + self.proc.children(recursive=True):
                    try:
                        info = p.memory_full_info()
                        total += getattr(info, "pss", info.rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped descendant, workers included
    return usage.ru_utime + usage.ru_stime


def timed_run(cmd: list[str], env: dict, log: Path, tokens_of: Callable[[], int]) -> dict:
    """Wall and CPU seconds of the whole process tree (imports included), peak memory, token rates.

    CPU seconds are the robust per-core measure on a shared machine; wall time also counts waiting.
    """
    cpu0, start = _children_cpu(), time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        mem = PeakMemory(proc.pid)
        rc = proc.wait()
    wall, cpu = time.monotonic() - start, _children_cpu() - cpu0
    peak = mem.stop()
    if rc:
        raise SystemExit(f"{cmd[:3]} failed (rc {rc}); see {log}")
    tokens = tokens_of()
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_pss_mb": round(peak, 1), "tokens": tokens,
            "tokens_per_s": round(tokens / wall), "tokens_per_cpu_s": round(tokens / cpu)}


def count_tokens(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # must outlive the sum: its memory map closes when it is collected
    return int(dataset.sequence_lengths.sum())


def same_files(prefix_a: str, prefix_b: str) -> bool:
    return all(Path(prefix_a + e).read_bytes() == Path(prefix_b + e).read_bytes() for e in (".bin", ".idx"))


def raw_sentencepiece(corpus_path: Path, model: Path) -> dict:
    """The reference rate: sentencepiece alone, one thread, on the corpus's texts (CPU time of encoding only)."""
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in open(corpus_path, encoding="utf-8")]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    cpu0, start = time.process_time(), time.monotonic()
    tokens = sum(len(ids) + 1 for ids in sp.encode(texts, num_threads=1))  # + EOD, as the tools count
    cpu, wall = time.process_time() - cpu0, time.monotonic() - start
    return {"tokens": tokens, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "tokens_per_cpu_s": round(tokens / cpu)}


def lrpath_cmd(inputs: Path | list, prefix: str, model: Path, workers: int, backend: str, *extra: str) -> list:
    return [sys.executable, "-m", "lrpath_megatron.cli", "data", "preprocess", "--input",
            *([str(inputs)] if isinstance(inputs, Path) else inputs), "--output-prefix", prefix, "--tokenizer-model",
            str(model), "--workers", str(workers), "--backend", backend, "--no-progress", "--overwrite", *extra]


def verify_fast(inputs: list, prefix: Path, model: Path, env: dict) -> dict:
    """The fast backend's mismatch rate over every document (``--verify`` with a count above the total)."""
    summary = prefix.with_suffix(".summary.json")
    cmd = lrpath_cmd(inputs, str(prefix), model, 2, "fast", "--verify", str(10 ** 9), "--summary-json", str(summary))
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    v = json.loads(summary.read_text())["verification"]
    return {"inputs": [Path(i).name for i in inputs], "documents": v["documents"], "differing": v["differing"],
            "rate": v["rate"], "examples": v["examples"][:5]}


def targets(runs: list, raw: dict) -> dict:
    """The throughput targets (docs/data.md), computed from this run's numbers."""
    def run(tool: str, workers: int) -> dict:
        return next((r for r in runs if r["tool"].startswith(tool) and r["workers"] == workers), {})

    out = {}
    exact1, fast1, mlm1 = run("lrpath data preprocess --backend exact", 1), \
        run("lrpath data preprocess --backend fast", 1), run("Megatron-LM", 1)
    if fast1 and mlm1:
        out["fast_vs_megatron_per_cpu_s"] = round(fast1["tokens_per_cpu_s"] / mlm1["tokens_per_cpu_s"], 2)
    if exact1:
        out["exact_vs_raw_sentencepiece_per_cpu_s"] = round(exact1["tokens_per_cpu_s"] / raw["tokens_per_cpu_s"], 2)
    for backend in ("exact", "fast"):
        one, two = run(f"lrpath data preprocess --backend {backend}", 1), \
            run(f"lrpath data preprocess --backend {backend}", 2)
        if one and two:
            out[f"{backend}_2_workers_vs_1_wall"] = round(two["tokens_per_s"] / one["tokens_per_s"], 2)
    out["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/lrpath_preprocess_bench")
    ap.add_argument("--size-mb", type=float, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--megatron-lm", help="Megatron-LM checkout (tools/preprocess_data.py, megatron/)")
    ap.add_argument("--extra-pythonpath", default="", help="where its extra imports live (six, regex, ...)")
    ap.add_argument("--long-doc-mb", type=float, default=50, help="0 = skip the long-document run")
    ap.add_argument("--backends", nargs="+", default=["exact", "fast"], choices=["exact", "fast"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess.json"))
    args = ap.parse_args()

    from lrpath_megatron.data_tools.inputs import iter_texts
    from lrpath_megatron.data_tools.tokenizer import TokenizerSpec, train_tokenizer

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus_path, meta_path = work / "corpus.jsonl", work / "setup.json"
    # Corpus and tokenizer are reused from an earlier run with the same settings (they are not measured).
    settings = {"size_mb": args.size_mb, "vocab_size": args.vocab_size}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("settings") != settings or not (work / "bench_tokenizer.model").is_file():
        t0 = time.monotonic()
        corpus = build_corpus(corpus_path, int(args.size_mb * 1e6))
        corpus["build_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        spec = TokenizerSpec(vocab_size=args.vocab_size, sample_sentences=100_000)
        train_tokenizer(iter_texts([str(corpus_path)], max_docs=2000), work / "bench_tokenizer", spec)
        tokenizer = {"vocab_size": args.vocab_size, "model_type": "bpe", "trained_on_first_docs": 2000,
                     "sample_sentences": 100_000, "train_s": round(time.monotonic() - t0, 1)}
        meta = {"settings": settings, "corpus": corpus, "tokenizer": tokenizer}
        meta_path.write_text(json.dumps(meta, indent=2))
    model = work / "bench_tokenizer.model"
    print(f"corpus: {meta['corpus']}\ntokenizer: {meta['tokenizer']}", flush=True)
    raw = raw_sentencepiece(corpus_path, model)
    print(f"raw sentencepiece: {raw}", flush=True)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "note": "shared development machine: other jobs ran at the same time, so wall times include "
                            "waiting for a core; tokens_per_cpu_s (CPU seconds of the whole process tree) is the "
                            "per-core comparison"},
        "corpus": meta["corpus"], "tokenizer": meta["tokenizer"], "raw_sentencepiece": raw, "runs": [],
        "megatron_lm": "not run",
        "megatron_lm_fast": "not run: tools/preprocess_data_fast.py is not in Megatron-LM core_v0.16.1; its later "
                            "version needs a newer megatron-core (megatron.core.tokenizers.utils.build_tokenizer, "
                            "tokenize_files, IndexedDatasetBuilder.add_documents)",
        "verification": {}, "targets": {}, "long_document": {},
    }
    runs = result["runs"]

    def save() -> None:  # after every run, so an interrupted benchmark keeps what it measured
        result["machine"]["load_average_at_save"] = [round(x, 2) for x in os.getloadavg()]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    mlm = Path(args.megatron_lm) if args.megatron_lm else None
    menv = dict(env, PYTHONPATH=os.pathsep.join(p for p in [str(mlm), args.extra_pythonpath] if p))
    if mlm is not None:
        result["megatron_lm"] = (
            f"Megatron-LM tools/preprocess_data.py at the tag matching megatron-core (checkout {mlm}), run with the "
            f"same interpreter, tokenizer (--tokenizer-type GPTSentencePieceTokenizer --append-eod) and input")
    for w in args.workers:  # the tools alternate, so all see the same machine load
        for backend in args.backends:
            ours = str(work / f"{backend}_w{w}")
            r = timed_run(lrpath_cmd(corpus_path, ours, model, w, backend), env, work / f"{backend}_w{w}.log",
                          lambda: count_tokens(ours + "_text_document"))
            runs.append({"tool": f"lrpath data preprocess --backend {backend}", "workers": w, **r,
                         "identical_to_1_worker": same_files(
                             ours + "_text_document", str(work / f"{backend}_w{args.workers[0]}_text_document")),
                         "identical_to_exact": same_files(ours + "_text_document",
                                                          str(work / f"exact_w{w}_text_document"))})
            print(runs[-1], flush=True)
            save()
        if mlm is None:
            continue
        ours = str(work / f"exact_w{w}")
        theirs = str(work / f"megatron_w{w}")
        cmd = [sys.executable, str(mlm / "tools" / "preprocess_data.py"), "--input", str(corpus_path),
               "--output-prefix", theirs, "--tokenizer-type", "GPTSentencePieceTokenizer",
               "--tokenizer-model", str(model), "--workers", str(w), "--append-eod", "--log-interval", "100000"]
        r = timed_run(cmd, menv, work / f"megatron_w{w}.log", lambda: count_tokens(theirs + "_text_document"))
        runs.append({"tool": "Megatron-LM tools/preprocess_data.py", "workers": w, **r,
                     "identical_to_ours": same_files(theirs + "_text_document", ours + "_text_document")})
        print(runs[-1], flush=True)
        save()
    if "fast" in args.backends:
        shipped = sorted(str(p) for p in (REPO / "data" / "corpora").glob("*.jsonl.gz"))
        for name, inputs in (("benchmark_corpus", [str(corpus_path)]), ("shipped_corpora", shipped)):
            result["verification"][name] = verify_fast(inputs, work / f"verify_{name}", model, env)
            print(f"verification {name}: {result['verification'][name]}", flush=True)
            save()
    result["targets"] = targets(runs, raw)
    print(f"targets: {result['targets']}", flush=True)
    save()
    if args.long_doc_mb:
        texts, size = [], 0
        with open(corpus_path, encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size >= args.long_doc_mb * 1e6:
                    break
        path = work / "long_doc.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"text": "short document before"}) + "\n")
            f.write(json.dumps({"text": "".join(texts)}) + "\n")
            f.write(json.dumps({"text": "short document after"}) + "\n")
        del texts
        prefix = str(work / "long_doc")
        r = timed_run(lrpath_cmd(path, prefix, model, 2, "exact"), env, work / "long_doc.log",
                      lambda: count_tokens(prefix + "_text_document"))
        result["long_document"] = {
            "document_chars": size, "workers": 2, "backend": "exact", **r,
            "policy": "encoded in ~64K-character pieces cut after newlines (ids equal to encoding the whole "
                      "text); --max-doc-chars can refuse such documents instead"}
        print(f"long document: {result['long_document']}", flush=True)
        save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

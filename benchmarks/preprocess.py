"""Preprocessing throughput per backend and tokenizer kind: ``lrpath data preprocess`` (exact, auto, and the
fast paths without the verification sample) vs raw sentencepiece and Megatron-LM's ``tools/preprocess_data.py``.

Builds a JSONL corpus of real Python source (``--size-mb``; this interpreter's standard library, then the
virtualenv's site-packages; one file per document, never committed) after a few documents with combining
marks, fullwidth letters, ligatures, Hangul, emoji and literal ``<s>``. Trains two BPE SentencePiece models
(``--vocab-size``) on a sample of it: ``identity`` (this project's conventions, ``train-tokenizer``) and
``nmt_nfkc`` (SentencePiece's default settings: nmt_nfkc normalisation, dummy prefix, whitespace removal,
plus byte fallback). For each model it measures raw ``SentencePieceProcessor.encode(list, num_threads=1)``,
then tokenizes the corpus with each variant (``--variants``) and worker count, recording wall time,
tokens/s, tokens per CPU-second (the whole process tree: imports and the verification sample included),
peak memory (PSS summed over the process tree, so pages shared by forked workers count once), the
backend that ran and how many documents differ from the exact backend's output. With ``--megatron-lm
DIR`` (a Megatron-LM checkout at the tag that matches the installed megatron-core, plus its import-time
dependencies on PYTHONPATH) the same runs are made with its tool and the outputs compared byte for byte.
gigatoken's mismatch rate as it reads each model is measured with ``--verify`` over every document of the
shipped corpora (data/corpora). Finally (``--long-doc-mb``) one long document is tokenized to measure the
long-document policy.

    python benchmarks/preprocess.py --size-mb 20 --workers 1 --long-doc-mb 0 [--megatron-lm DIR]
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


# The documents a new user adds (issue 33): where a normaliser, whitespace handling or byte fallback matter.
ADVERSARIAL = [
    "Combining marks: A\u030a \u1e9b\u0323 q\u0307\u0323 e\u0301\u0301, precomposed \u00c5 and \u212b",
    "Fullwidth ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３！ and halfwidth ｶﾀｶﾅ",
    "Ligatures ﬁ ﬂ ﬀ ﬃ ﬆ and compatibility characters Ω K ㎏ ½ ① ™",
    "Hangul 한국어 한글 각, conjoining jamo \u1100\u1161\u11a8",
    "Emoji 😀 👍🏽 🇩🇪 👩‍👩‍👧 and rare CJK \U0002a6d6",
    "Literal special tokens <s> </s> <unk> <pad> are text: <s>def f(): pass</s>",
]


def build_corpus(path: Path, min_bytes: int) -> dict:
    """The adversarial documents, then sorted .py files of the stdlib and site-packages until ``min_bytes``."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    written = docs = 0
    with open(path, "w", encoding="utf-8") as out:
        for text in ADVERSARIAL:
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            docs += 1
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
                    return {"bytes": written, "documents": docs, "adversarial_documents": len(ADVERSARIAL),
                            "sources": [str(r) for r in roots]}
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


def differing_documents(prefix: str, exact: str) -> int:
    """Documents whose ids differ from the exact backend's (both made from the same input)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ours, theirs = IndexedDataset(prefix), IndexedDataset(exact)
    if len(ours) != len(theirs):
        return max(len(ours), len(theirs))
    return sum(not (ours[i].size == theirs[i].size and (ours[i] == theirs[i]).all()) for i in range(len(ours)))


def train_models(corpus_path: Path, work: Path, vocab_size: int, sample: int) -> dict:
    """The two tokenizers, trained on the lines of the first 2,000 documents (``sample`` of them sampled)."""
    import io

    import sentencepiece as spm

    from lrpath_megatron.data_tools.inputs import iter_texts
    from lrpath_megatron.data_tools.tokenizer import TokenizerSpec, train_tokenizer, training_lines

    out = {}
    t0 = time.monotonic()
    spec = TokenizerSpec(vocab_size=vocab_size, sample_sentences=sample)
    train_tokenizer(iter_texts([str(corpus_path)], max_docs=2000), work / "identity", spec)
    out["identity"] = {"settings": "train-tokenizer: identity normalisation, no dummy prefix, byte fallback",
                       "train_s": round(time.monotonic() - t0, 1)}
    t0 = time.monotonic()
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_lines(iter_texts([str(corpus_path)], max_docs=2000), 8192), model_writer=proto,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, input_sentence_size=sample,
        shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
    (work / "nmt_nfkc.model").write_bytes(proto.getvalue())
    out["nmt_nfkc"] = {"settings": "SentencePiece's defaults (nmt_nfkc, dummy prefix, whitespace removal) + "
                                   "byte fallback", "train_s": round(time.monotonic() - t0, 1)}
    for model in out.values():
        model.update(vocab_size=vocab_size, model_type="bpe", trained_on_first_docs=2000, sample_sentences=sample)
    return out


def raw_sentencepiece(corpus_path: Path, model: Path) -> dict:
    """The reference rate: sentencepiece alone, one thread, on the corpus's texts (CPU time of encoding only)."""
    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in open(corpus_path, encoding="utf-8")]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    cpu0, start = time.process_time(), time.monotonic()
    tokens = sum(len(ids) + 1 for ids in sp.encode(texts, num_threads=1))  # + EOD, as the tools count
    cpu, wall = time.process_time() - cpu0, time.monotonic() - start
    return {"tokens": tokens, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "tokens_per_cpu_s": round(tokens / cpu)}


def lrpath_cmd(inputs: Path | list, prefix: str, model: Path, workers: int, *extra: str) -> list:
    return [sys.executable, "-m", "lrpath_megatron.cli", "data", "preprocess", "--input",
            *([str(inputs)] if isinstance(inputs, Path) else inputs), "--output-prefix", prefix, "--tokenizer-model",
            str(model), "--workers", str(workers), "--no-progress", "--overwrite", *extra]


# What is timed: the default (auto: its class rule and the verification sample), the path auto takes without the
# sample, gigatoken as it reads the model (unchecked: it differs on nmt_nfkc), and the reference.
VARIANTS = {"exact": ["--backend", "exact"], "auto": ["--backend", "auto"],
            "auto --verify 0": ["--backend", "auto", "--verify", "0"],
            "fast --verify 0": ["--backend", "fast", "--verify", "0"]}


def verify_fast(inputs: list, prefix: Path, model: Path, env: dict) -> dict:
    """gigatoken's mismatch rate as it reads the model, over every document (``--verify`` above the total)."""
    summary = prefix.with_suffix(".summary.json")
    cmd = lrpath_cmd(inputs, str(prefix), model, 2, "--backend", "fast", "--verify", str(10 ** 9),
                     "--summary-json", str(summary))
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    v = json.loads(summary.read_text())["verification"]
    return {"inputs": [Path(i).name for i in inputs], "documents": v["documents"], "differing": v["differing"],
            "rate": v["rate"], "examples": v["examples"][:3]}


def targets(runs: list, raw: dict) -> dict:
    """Ratios per CPU-second (one worker) per model, and 2 vs 1 workers in wall time, from this run."""
    def run(model: str, tool: str, workers: int = 1) -> dict:
        return next((r for r in runs if r["model"] == model and r["tool"] == tool and r["workers"] == workers), {})

    out = {}
    for model, reference in raw.items():
        exact, auto = run(model, "lrpath exact"), run(model, "lrpath auto")
        path, fast, mlm = run(model, "lrpath auto --verify 0"), run(model, "lrpath fast --verify 0"), \
            run(model, "Megatron-LM")
        ratios = {"exact_vs_raw_sentencepiece": (exact, reference), "auto_vs_raw_sentencepiece": (auto, reference),
                  "auto_vs_exact": (auto, exact), "auto_path_vs_gigatoken_alone": (path, fast),
                  "fast_vs_megatron": (fast, mlm), "exact_vs_megatron": (exact, mlm)}
        out[model] = {name: round(a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"], 2)
                      for name, (a, b) in ratios.items() if a and b}
        for tool in {r["tool"] for r in runs if r["model"] == model and r["tool"].startswith("lrpath")}:
            one, two = run(model, tool, 1), run(model, tool, 2)
            if one and two:
                out[model][f"{tool.removeprefix('lrpath ')}: 2 workers vs 1, wall"] = \
                    round(two["tokens_per_s"] / one["tokens_per_s"], 2)
    out["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    return out


def megatron_run(mlm: Path, corpus_path: Path, work: Path, model: str, w: int, menv: dict) -> dict:
    theirs, ours = str(work / f"{model}_megatron_w{w}"), str(work / f"{model}_exact_w{w}")
    cmd = [sys.executable, str(mlm / "tools" / "preprocess_data.py"), "--input", str(corpus_path),
           "--output-prefix", theirs, "--tokenizer-type", "GPTSentencePieceTokenizer",
           "--tokenizer-model", str(work / f"{model}.model"), "--workers", str(w), "--append-eod",
           "--log-interval", "100000"]
    r = timed_run(cmd, menv, work / f"{model}_megatron_w{w}.log", lambda: count_tokens(theirs + "_text_document"))
    return {"tool": "Megatron-LM", "model": model, "workers": w, **r,
            "identical_to_exact": same_files(theirs + "_text_document", ours + "_text_document")}


def lrpath_run(corpus_path: Path, work: Path, model: str, w: int, variant: str, env: dict) -> dict:
    name = f"{model}_{variant.replace(' --verify 0', '_unverified')}_w{w}"
    prefix, summary = str(work / name), work / f"{name}.summary.json"
    cmd = lrpath_cmd(corpus_path, prefix, work / f"{model}.model", w, *VARIANTS[variant], "--summary-json",
                     str(summary))
    r = timed_run(cmd, env, work / f"{name}.log", lambda: count_tokens(prefix + "_text_document"))
    s = json.loads(summary.read_text())
    exact = str(work / f"{model}_exact_w{w}_text_document")
    return {"tool": f"lrpath {variant}", "model": model, "workers": w, **r, "backend": s["backend"],
            "backend_reason": s["backend_reason"], "sample": s["sample"],
            "identical_to_exact": same_files(prefix + "_text_document", exact),
            "documents_differing_from_exact": differing_documents(prefix + "_text_document", exact)}


def long_document(corpus_path: Path, work: Path, mb: float, env: dict) -> dict:
    texts, size = [], 0
    with open(corpus_path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size >= mb * 1e6:
                break
    path = work / "long_doc.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "short document before"}) + "\n")
        f.write(json.dumps({"text": "".join(texts)}) + "\n")
        f.write(json.dumps({"text": "short document after"}) + "\n")
    prefix = str(work / "long_doc")
    r = timed_run(lrpath_cmd(path, prefix, work / "identity.model", 2, "--backend", "exact"), env,
                  work / "long_doc.log", lambda: count_tokens(prefix + "_text_document"))
    return {"document_chars": size, "workers": 2, "backend": "exact", "model": "identity", **r,
            "policy": "encoded in ~64K-character pieces cut after newlines (ids equal to encoding the whole text); "
                      "--max-doc-chars can refuse such documents instead"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/lrpath_preprocess_bench")
    ap.add_argument("--size-mb", type=float, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--sample-sentences", type=int, default=30_000, help="lines the tokenizers are trained on")
    ap.add_argument("--models", nargs="+", default=["identity", "nmt_nfkc"], choices=["identity", "nmt_nfkc"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--megatron-lm", help="Megatron-LM checkout (tools/preprocess_data.py, megatron/)")
    ap.add_argument("--extra-pythonpath", default="", help="where its extra imports live (six, regex, ...)")
    ap.add_argument("--long-doc-mb", type=float, default=50, help="0 = skip the long-document run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess.json"))
    args = ap.parse_args()
    variants = ["exact"] + [v for v in args.variants if v != "exact"]  # the others are compared with it

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus_path, meta_path = work / "corpus.jsonl", work / "setup.json"
    # Corpus and tokenizers are reused from an earlier run with the same settings (they are not measured).
    settings = {"size_mb": args.size_mb, "vocab_size": args.vocab_size, "sample_sentences": args.sample_sentences}
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("settings") != settings or not all((work / f"{m}.model").is_file() for m in ("identity", "nmt_nfkc")):
        t0 = time.monotonic()
        corpus = build_corpus(corpus_path, int(args.size_mb * 1e6))
        corpus["build_s"] = round(time.monotonic() - t0, 1)
        meta = {"settings": settings, "corpus": corpus,
                "tokenizers": train_models(corpus_path, work, args.vocab_size, args.sample_sentences)}
        meta_path.write_text(json.dumps(meta, indent=2))
    print(f"corpus: {meta['corpus']}\ntokenizers: {meta['tokenizers']}", flush=True)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "note": "shared development machine: other jobs ran at the same time, so wall times include "
                            "waiting for a core; tokens_per_cpu_s (CPU seconds of the whole process tree) is the "
                            "per-core comparison"},
        "corpus": meta["corpus"], "tokenizers": meta["tokenizers"], "raw_sentencepiece": {}, "runs": [],
        "megatron_lm": "not run (no --megatron-lm checkout)",
        "megatron_lm_fast": "not run: tools/preprocess_data_fast.py is not in Megatron-LM core_v0.16.1; its later "
                            "version needs a newer megatron-core (megatron.core.tokenizers.utils.build_tokenizer, "
                            "tokenize_files, IndexedDatasetBuilder.add_documents)",
        "verification": {}, "targets": {}, "long_document": {},
    }
    runs = result["runs"]

    def save() -> None:  # after every run, so an interrupted benchmark keeps what it measured
        result["machine"]["load_average_at_save"] = [round(x, 2) for x in os.getloadavg()]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    mlm = Path(args.megatron_lm) if args.megatron_lm else None
    menv = dict(env, PYTHONPATH=os.pathsep.join(p for p in [str(mlm), args.extra_pythonpath] if p))
    if mlm is not None:
        result["megatron_lm"] = (
            f"Megatron-LM tools/preprocess_data.py at the tag matching megatron-core (checkout {mlm}), run with the "
            f"same interpreter, tokenizer (--tokenizer-type GPTSentencePieceTokenizer --append-eod) and input")
    shipped = sorted(str(p) for p in (REPO / "data" / "corpora").glob("*.jsonl.gz"))
    for model in args.models:
        result["raw_sentencepiece"][model] = raw_sentencepiece(corpus_path, work / f"{model}.model")
        print(f"raw sentencepiece, {model}: {result['raw_sentencepiece'][model]}", flush=True)
        for w in args.workers:  # the tools alternate, so all see the same machine load
            for variant in variants:
                runs.append(lrpath_run(corpus_path, work, model, w, variant, env))
                print(runs[-1], flush=True)
                save()
            if mlm is not None:
                runs.append(megatron_run(mlm, corpus_path, work, model, w, menv))
                print(runs[-1], flush=True)
                save()
        result["verification"][model] = verify_fast(shipped, work / f"verify_{model}", work / f"{model}.model", env)
        print(f"gigatoken as it reads {model}, shipped corpora: {result['verification'][model]}", flush=True)
        save()
    result["targets"] = targets(runs, result["raw_sentencepiece"])
    print(f"targets: {json.dumps(result['targets'], indent=1)}", flush=True)
    save()
    if args.long_doc_mb and "identity" in args.models:
        result["long_document"] = long_document(corpus_path, work, args.long_doc_mb, env)
        print(f"long document: {result['long_document']}", flush=True)
        save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The four data increments of the benchmark, tokenized into Megatron .bin/.idx.

Three sources:

- ``demo``: the corpora shipped in ``data/corpora`` (Python 3.11 standard library: prose docs, two groups
  of packages, C API headers), tokenized by ``lrpath_megatron.data_tools.demo.prepare_demo_data``. Used on CPU:
  each increment is a new domain (a strong shift at every version).
- ``demo-mixed``: the same corpora cut into four increments of the same sources: each holds about a quarter of
  every corpus (whole documents), so consecutive versions bring new documents, not a new domain - the update a
  team gets from a new crawl of the sources it already trains on.
- ``machine``: four domains of source text found on the machine that runs the benchmark, so a GPU
  machine with no network and no carried data can build them (with the interpreter and packages of the
  machine the text differs, so the exact token counts are written to ``increments.json``):

  1. ``stdlib``  - the interpreter's standard library ``.py`` files, its tests included;
  2. ``numeric`` - the ``.py`` files of numpy, matplotlib and sympy (those installed; numpy required -
     sympy comes with every pip install of torch);
  3. ``torch``   - the ``.py`` files of torch;
  4. ``cxx``     - the C/C++ headers under ``torch/include`` (a strong shift: another language).

  Files are read in sorted order, each file is one document, files under 200 characters are left out,
  and each increment stops at ``max_chars`` characters. One SentencePiece BPE model (``lrpath_megatron.data_tools``) is
  trained on a sample of all four and every increment is tokenized with it.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterator

MIN_CHARS = 200
# Caches, and the installed packages under the stdlib directory (they belong to other domains).
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "lib-dynload"}
NUMERIC = ("numpy", "matplotlib", "sympy")
DOMAINS = ("stdlib", "numeric", "torch", "cxx")


def _package_dir(name: str, required: bool = True) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        if not required:
            return None
        raise SystemExit(f"package {name!r} is not installed here; the 'machine' increments need it "
                         f"(or use --data demo)")
    return Path(list(spec.submodule_search_locations)[0])


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern)
                  if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def domain_files(domain: str) -> list[Path]:
    if domain == "stdlib":
        return _files(Path(sysconfig.get_paths()["stdlib"]), "*.py")
    if domain == "numeric":
        roots = [_package_dir("numpy")] + [_package_dir(n, required=False) for n in NUMERIC[1:]]
        return [f for root in roots if root is not None for f in _files(root, "*.py")]
    if domain == "torch":
        return [p for p in _files(_package_dir("torch"), "*.py") if "include" not in p.parts]
    if domain == "cxx":
        root = _package_dir("torch") / "include"
        return sorted(set(_files(root, "*.h")) | set(_files(root, "*.hpp")) | set(_files(root, "*.cuh")))
    raise ValueError(domain)


def documents(domain: str, max_chars: int) -> Iterator[str]:
    total = 0
    for path in domain_files(domain):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable files are not text of the domain
        if len(text.strip()) < MIN_CHARS:
            continue
        yield text
        total += len(text)
        if total >= max_chars:
            return


def build_machine_increments(out_dir: Path, max_chars: int, vocab_size: int, workers: int) -> dict:
    """Write ``out_dir/{domain}.jsonl``, the tokenizer and ``{domain}_text_document.bin/.idx``; returns
    ``{"prefixes", "tokens", "documents", "vocab_size", "source"}`` (also saved as increments.json).
    Reuses a finished build in ``out_dir``."""
    from lrpath_megatron.data_tools.tokenizer import TokenizerSpec, train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "increments.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    for domain in DOMAINS:
        _write_jsonl(out_dir / f"{domain}.jsonl", documents(domain, max_chars))

    def all_texts() -> Iterator[str]:
        for domain in DOMAINS:
            with (out_dir / f"{domain}.jsonl").open(encoding="utf-8") as f:
                yield from (json.loads(line)["text"] for line in f)

    spec = TokenizerSpec(vocab_size=vocab_size, model_type="bpe", character_coverage=0.9995,
                         sample_sentences=1_000_000, threads=workers)
    model = train_tokenizer(all_texts(), out_dir / "tokenizer", spec)
    result = {**_tokenize(out_dir, DOMAINS, model, workers, progress=True), "vocab_size": vocab_size,
              "source": "machine", "max_chars": max_chars,
              "numeric_packages": [n for n in NUMERIC if _package_dir(n, required=False) is not None]}
    manifest.write_text(json.dumps(result, indent=1))
    return result


def _write_jsonl(path: Path, texts) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def _tokenize(out_dir: Path, names, tokenizer_model, workers: int, progress: bool) -> dict:
    """``out_dir/{name}.jsonl`` -> ``{name}_text_document.bin/.idx`` for each name; returns
    ``{"prefixes", "tokens", "documents"}`` by name."""
    from lrpath_megatron.data_tools.preprocess import preprocess
    from lrpath_megatron.data_tools.preprocess_config import PreprocessConfig, output_prefix

    out = {"prefixes": {}, "tokens": {}, "documents": {}}
    for name in names:
        summary = preprocess(PreprocessConfig(inputs=[str(out_dir / f"{name}.jsonl")], output_prefix=str(out_dir / name),
                                              tokenizer_model=str(tokenizer_model), workers=workers,
                                              progress=progress, overwrite=True))  # an unfinished build
        out["prefixes"][name] = output_prefix(out_dir / name, "text")
        out["tokens"][name] = summary.tokens["text"]
        out["documents"][name] = summary.documents
    return out


def demo_increments(out_dir: Path, vocab_size: int) -> dict:
    from lrpath_megatron.data_tools.demo import prepare_demo_data

    data = prepare_demo_data(out_dir, vocab_size)
    return {"prefixes": data["prefixes"], "tokens": data["tokens"], "documents": data["documents"],
            "vocab_size": data["vocab_size"], "source": "demo"}


def mixed_demo_increments(out_dir: Path, vocab_size: int, parts: int = 4) -> dict:
    """``part1..part<parts>``: every shipped corpus dealt out over the parts by characters (each document, in the
    corpus' order, to the part that holds the fewest characters of that corpus so far), tokenized with the demo
    tokenizer. Within a part the corpora are interleaved from the end, so that the held-out split (a part's last
    documents) samples every corpus. Reuses a finished build in ``out_dir``."""
    from lrpath_megatron.data_tools.demo import CORPORA, iter_corpus, prepare_demo_data

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "increments.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    demo = prepare_demo_data(out_dir / "demo", vocab_size)
    dealt = [[[] for _ in CORPORA] for _ in range(parts)]  # part -> corpus -> texts
    for c, name in enumerate(CORPORA):
        chars = [0] * parts
        for text in iter_corpus(name):
            k = min(range(parts), key=chars.__getitem__)
            dealt[k][c].append(text)
            chars[k] += len(text)
    names = [f"part{k + 1}" for k in range(parts)]
    for name, by_corpus in zip(names, dealt):
        longest = max(map(len, by_corpus))
        # position i from the end takes each corpus' i-th document from the end: the tail cycles the corpora
        _write_jsonl(out_dir / f"{name}.jsonl", [texts[len(texts) - longest + i] for i in range(longest)
                                                 for texts in by_corpus if len(texts) - longest + i >= 0])
    result = {**_tokenize(out_dir, names, demo["tokenizer_model"], 1, progress=False), "vocab_size": demo["vocab_size"],
              "source": "demo-mixed"}
    manifest.write_text(json.dumps(result, indent=1))  # written last: its presence means the build is complete
    return result

"""Package boundaries: only ``lrpath_megatron`` is importable; ``launch/`` and ``data_tools/`` hold scripts."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from lrpath_megatron import cli
from lrpath_megatron.data_tools import demo
from lrpath_megatron.data_tools.tokenizer import TokenizerSpec, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["data_tools/preprocess_data.py", "data_tools/train_tokenizer.py", "data_tools/make_corpora.py",
           "launch/submit.py"]
# No PYTHONPATH: what is importable is what the install provides, not the test runner's environment.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONWARNINGS": "ignore"}


def _script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


@pytest.mark.parametrize("name", ["launch", "data_tools"])
def test_script_directories_are_not_packages(name, tmp_path):
    proc = _script(["-c", f"import {name}"], tmp_path)
    assert proc.returncode == 1 and f"ModuleNotFoundError: No module named '{name}'" in proc.stderr, proc.stderr
    assert not (REPO / name / "__init__.py").exists()


def _imported(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_library_never_imports_the_script_directories():
    for path in (REPO / "lrpath_megatron").rglob("*.py"):
        wrong = [name for name in _imported(path) if name.split(".")[0] in ("launch", "data_tools")]
        assert not wrong, f"{path} imports {wrong}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_run_from_any_directory(script, tmp_path):
    text = (REPO / script).read_text()
    assert text.startswith("#!/usr/bin/env python3\n") and 'sys.exit(main())' in text
    proc = _script([str(REPO / script), "--help"], tmp_path)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_preprocess_data_takes_megatron_lm_flags_and_matches_lrpath(tmp_path):
    texts = [t for _, t in zip(range(40), demo.iter_corpus("docs"))]
    model = train_tokenizer(texts, tmp_path / "tok", TokenizerSpec(vocab_size=600, sample_sentences=0, threads=1))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    megatron_lm_flags = ["--input", str(src), "--output-prefix", str(tmp_path / "script"), "--tokenizer-type",
                         "GPTSentencePieceTokenizer", "--tokenizer-model", str(model), "--workers", "2",
                         "--append-eod", "--partitions", "1", "--log-interval", "100"]
    proc = _script([str(REPO / "data_tools/preprocess_data.py"), *megatron_lm_flags], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert cli.main(["data", "preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "lrpath"),
                     "--tokenizer-model", str(model), "--workers", "1", "--no-progress"]) == 0
    for ext in (".bin", ".idx"):
        script_out = (tmp_path / f"script_text_document{ext}").read_bytes()
        assert script_out == (tmp_path / f"lrpath_text_document{ext}").read_bytes(), ext
    for refused, message in [(["--split-sentences"], "sentence splitting (NLTK) is not supported"),
                             (["--partitions", "4"], "--partitions 4: drop it")]:
        proc = _script([str(REPO / "data_tools/preprocess_data.py"), *megatron_lm_flags, *refused], tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr

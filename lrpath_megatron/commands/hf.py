"""``lrpath hf import HF_DIR --out CKPT`` and ``lrpath hf export CKPT --out HF_DIR``: open models in and out."""
from __future__ import annotations

import re

from lrpath_megatron.errors import LrpathError


def register(sub) -> None:
    p = sub.add_parser("hf", help="import a Hugging Face model as an lrpath checkpoint, or export one to it",
                       description="Llama, Mistral, Qwen2 and Qwen3 causal LMs (safetensors), both ways, exactly. "
                                   "See docs/open_models.md.")
    hf_sub = p.add_subparsers(dest="hf_command", metavar="{import,export}", required=True)

    imp = hf_sub.add_parser("import", help="a local HF model directory to a weights-only lrpath checkpoint (step 0)",
                            description="Reads config.json and the safetensors weights (one file, or shards with "
                                        "model.safetensors.index.json) tensor by tensor and writes a megatron-core "
                                        "dist checkpoint, loadable at any TP/PP, with the derived model section in "
                                        "CKPT/model.yaml. Refuses what it cannot represent exactly.")
    imp.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and *.safetensors")
    imp.add_argument("--out", required=True, metavar="CKPT", help="checkpoint directory to write (must not exist)")
    imp.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                     help="parallel.tensor_parallel of the recorded config (checked against the model; default 1)")
    imp.add_argument("--pipeline-parallel", type=int, default=1, metavar="M",
                     help="parallel.pipeline_parallel of the recorded config (default 1)")
    imp.add_argument("--seq-length", type=int, metavar="S",
                     help="model.seq_length to train at (default: the model's max_position_embeddings)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.set_defaults(func=run_import)

    exp = hf_sub.add_parser("export", help="an lrpath checkpoint (any TP/PP, merge, import) or LoRA update to an "
                                           "HF directory",
                            description="Writes config.json, generation_config.json, safetensors weights (sharded "
                                        "past --max-shard-size, with an index) and the tokenizer files of an "
                                        "imported model, for transformers, lm-evaluation-harness or vLLM. A LoRA "
                                        "update is merged into its base.")
    exp.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory with manifest.json and model/, or a "
                                                        "LoRA update (RUN/adapt/<method>/<version> or its adapter/)")
    exp.add_argument("--out", required=True, metavar="HF_DIR", help="directory to write")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace HF_DIR if it exists (once the new one is complete)")
    exp.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                     help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    exp.add_argument("--tokenizer-model", metavar="TOKENIZER",
                     help="the tokenizer the data was tokenized with: a SentencePiece .model (shipped as "
                          "tokenizer.model + tokenizer_config.json) or a Hugging Face tokenizer.json or a "
                          "directory holding one (shipped with its tokenizer_config.json)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    exp.add_argument("--unless-held", metavar="RELEASE_DIR",
                     help="export nothing (exit 0) when the release gate held this release (RELEASE_DIR/downstream.json)")
    exp.set_defaults(func=run_export)


def run_import(args) -> int:
    from lrpath_megatron.hf.importer import MODEL_YAML, import_hf

    _one_process("import")
    result = import_hf(args.hf_dir, args.out, args.tensor_parallel, args.pipeline_parallel, args.seq_length,
                       progress=not args.no_progress)
    print(f"imported {result.architecture} from {args.hf_dir} to {result.output}: {result.parameters:,} parameters, "
          f"{str(result.dtype).removeprefix('torch.')}; model section in {result.output / MODEL_YAML}")
    return 0


def run_export(args) -> int:
    from lrpath_megatron.hf.exporter import export_hf

    _one_process("export")
    if args.unless_held:
        from lrpath_megatron.downstream.gate import is_held

        if is_held(args.unless_held):
            print(f"not exported: the release gate held {args.unless_held} (see its downstream.json)")
            return 0
    result = export_hf(args.checkpoint, args.out, args.overwrite, parse_size(args.max_shard_size),
                       args.tokenizer_model, progress=not args.no_progress)
    tokenizer = (f"tokenizer ({', '.join(result.tokenizer_files)}) from {result.tokenizer_from}"
                 if result.tokenizer_files else "no tokenizer known (pass --tokenizer-model)")
    print(f"exported {args.checkpoint} as {result.architecture} to {result.output}: {len(result.files)} files, "
          f"{tokenizer}")
    return 0


def _one_process(what: str) -> None:
    """Conversions read and write files only: several ranks would each write the same output."""
    from lrpath_megatron.distributed import read_env

    if read_env().world_size != 1:
        raise LrpathError(f"{what} runs as one process: start it without torchrun/srun")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes of ``5GB``, ``500MB``, ``2GiB`` or a plain number (transformers' max_shard_size spellings)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS or float(match.group(1)) <= 0:
        raise LrpathError(f"--max-shard-size {text!r} is not a size; give e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])

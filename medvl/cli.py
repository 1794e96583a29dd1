"""``medvl``: one entry point; each subcommand is a thin wrapper over a plain function.

Config-backed subcommands take ``--config RECIPE.yaml`` (optionally a ``--section`` of it),
then ``--flags`` generated from the config dataclass, then free ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any


def _add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    p.add_argument("--config", help="YAML recipe to start from")
    p.add_argument("--section", help="top-level key of the recipe holding this config")
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
        if tp is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                           action=argparse.BooleanOptionalAction, help=f.metadata.get("help", ""))
            continue
        if not choices and tp not in (int, float, str):
            continue  # lists and mappings: YAML or key=value overrides
        kind = type(choices[0]) if choices else tp
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, choices=choices,
                       default=None, help=f"{f.metadata.get('help', '')} (default: {f.default!r})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides")


def _config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Recipe section, then ``key=value`` overrides, then the typed ``--flags`` (already parsed:
    ``--output 2024`` is the string "2024", not YAML's integer)."""
    from medvl import config

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    return config.load(cls, args.config, list(args.overrides), section=args.section, values=flags)


def _placement(args: argparse.Namespace):
    """The recipe's ``placement:`` section (defaults: cluster/aws.yaml's node types)."""
    from medvl import config
    from medvl.placement import Placement

    return config.load(Placement, args.config, section="placement") if args.config else Placement()


def cmd_preprocess(args: argparse.Namespace) -> None:
    from medvl.data.preprocess import PreprocessConfig, preprocess

    manifest = preprocess(_config_from_args(PreprocessConfig, args), _placement(args))
    summary = {k: manifest[k] for k in ("records_in", "records_kept", "records_rejected",
                                        "rejects_by_reason", "tokens")}
    print(json.dumps(summary, ensure_ascii=False, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from medvl.train.config import TrainConfig
    from medvl.train.trainer import train

    if args.section is None and args.stage is not None:
        args.section = f"stage{args.stage}"  # recipes hold one section per stage
    cfg = _config_from_args(TrainConfig, args)
    if args.probe:
        _probe(cfg, args)
        return
    print(json.dumps(train(cfg, _placement(args), resume=args.resume, overwrite=args.overwrite), indent=2))


def _probe(cfg: Any, args: argparse.Namespace) -> None:
    """``train --probe``: the per-rank figures, then one line; exit code 2 if it will not fit."""
    from medvl.train.probe import probe, verdict

    report = probe(cfg, _placement(args), args.probe_capacity_gib)
    print(json.dumps(report, indent=2))
    if not report["fits"]:
        print(f"medvl train --probe: {verdict(report)}", file=sys.stderr)
        raise SystemExit(2)
    print(verdict(report))


def cmd_eval(args: argparse.Namespace) -> None:
    from medvl.eval.evaluate import EvalConfig, evaluate

    metrics = evaluate(_config_from_args(EvalConfig, args), _placement(args))
    print(json.dumps({k: metrics[k] for k in ("n", "errors", "closed_chance", "overall", "control_notes", "bilingual")},
                     indent=2, ensure_ascii=False))


def eval_compare(argv: list[str]) -> None:
    """``medvl eval compare RUN_A RUN_B``: paired tests of two eval runs on the same questions."""
    from medvl.eval.compare import compare_markdown, compare_runs

    p = argparse.ArgumentParser(prog="medvl eval compare", description=eval_compare.__doc__)
    p.add_argument("run_a", help="eval output directory A (holds predictions.jsonl)")
    p.add_argument("run_b", help="eval output directory B, the same questions")
    p.add_argument("--json", action="store_true", help="print the tests as JSON instead of a table")
    args = p.parse_args(argv)
    tests = compare_runs(args.run_a, args.run_b)
    print(json.dumps(tests, indent=2) if args.json else compare_markdown(args.run_a, args.run_b, tests))


def cmd_import_vqa(args: argparse.Namespace) -> None:
    from medvl.eval.importers import import_vqa

    n = import_vqa(args.format, args.src, args.output, args.split, args.lang)
    print(f"wrote {n} records to {args.output}; evaluate with --data {args.output} --image-root {args.src}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from medvl.pipeline import run_pipeline

    run_pipeline(args.config, args.output, args.only, args.start, args.until, args.keep_serving, args.force,
                 resume=args.resume, overwrite=args.overwrite)


def cmd_demo_data(args: argparse.Namespace) -> None:
    from medvl.data.demo import build_demo_data

    print(json.dumps(build_demo_data(args.output, args.variants, args.seed), indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    from medvl.serving.api import ServeConfig
    from medvl.serving.app import run_local
    from medvl.serving.chat import check_model_dir

    cfg = _config_from_args(ServeConfig, args)
    if not cfg.model:
        raise ValueError("serve: --model is required")
    check_model_dir(cfg.model)
    base = f"http://{args.host}:{args.port}"
    print(f"serving {cfg.model} as {cfg.model_name!r} at {base}/v1, web page {base}/ (Ctrl-C stops)")
    run_local(cfg, args.host, args.port, blocking=True)


def cmd_chat(args: argparse.Namespace) -> None:
    from medvl.serving.chat import chat

    for delta in chat(args.model, args.question, args.image, args.max_tokens, args.temperature):
        print(delta, end="", flush=True)
    print()


def cmd_convert(args: argparse.Namespace) -> None:
    from medvl.model.convert import convert_llava

    convert_llava(args.src, args.vision_tower, args.dst)
    print(f"wrote {args.dst}: LlavaForConditionalGeneration (safetensors), tokenizer, processor")


def cmd_export_projector(args: argparse.Namespace) -> None:
    from medvl.model.build import load_hf
    from medvl.model.convert import export_projector

    export_projector(load_hf(args.model), args.output)
    print(f"wrote {args.output} (LLaVA pretrain_mm_mlp_adapter format)")


def _args_demo_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="directory to write the corpus to")
    p.add_argument("--variants", type=int, default=10, help="augmented copies per training image")
    p.add_argument("--seed", type=int, default=0, help="augmentation seed")


def _args_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", required=True, help="original LLaVA-layout directory (path or s3://)")
    p.add_argument("--vision-tower", required=True, help="CLIP vision tower directory (path or s3://)")
    p.add_argument("--dst", required=True, help="output HF directory (path or s3://)")


def _args_export_projector(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (path or s3://)")
    p.add_argument("--output", required=True, help="file to write, e.g. mm_projector.bin")


def _args_rerun(p: argparse.ArgumentParser) -> None:
    """What to do with an output that already holds a run of a different config."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="an output holding a run of another config: continue that run as saved")
    mode.add_argument("--overwrite", action="store_true",
                      help="an output holding a run of another config: delete it and start over")


def _args_train(p: argparse.ArgumentParser) -> None:
    _args_rerun(p)
    p.add_argument("--probe", action="store_true",
                   help="run one worst-case step (batch_size x max_length, an image per row) on the recipe's "
                        "workers and report peak memory against capacity; exit 2 if it will not fit")
    p.add_argument("--probe-capacity-gib", type=float, metavar="GIB",
                   help="with --probe: judge against this many GiB per worker instead of the measured "
                        "GPU (or host) memory, e.g. to size for a smaller GPU")


def _args_pipeline(p: argparse.ArgumentParser) -> None:
    from medvl.pipeline import STEPS

    p.add_argument("--config", required=True, help="YAML recipe (workflows/configs/*.yaml)")
    p.add_argument("--output", help="run URI; replaces the recipe's `run` (and every ${run} in it)")
    p.add_argument("--only", choices=STEPS, help="run just this step")
    p.add_argument("--from", dest="start", choices=STEPS, help="start at this step")
    p.add_argument("--until", choices=STEPS, help="stop after this step")
    p.add_argument("--keep-serving", action="store_true",
                   help="local Ray: keep the endpoint up after the check request (Ctrl-C stops)")
    p.add_argument("--force", action="store_true", help="redo selected steps even if complete")
    _args_rerun(p)


def _args_import_vqa(p: argparse.ArgumentParser) -> None:
    from medvl.eval.importers import IMPORTERS

    p.add_argument("--format", required=True, choices=sorted(IMPORTERS), help="the release's layout")
    p.add_argument("--src", required=True, help="unpacked release directory (path or s3://)")
    p.add_argument("--output", required=True, help="records file to write (.jsonl)")
    p.add_argument("--split", default="test", help="split to import (vqa-rad: test|train|all)")
    p.add_argument("--lang", default="all", choices=["all", "en", "zh"],
                   help="SLAKE: question language; all: both, the translated questions paired for the "
                        "cross-language agreement")


def _args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")


def _args_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported HF model directory (RUN/model, or s3://)")
    p.add_argument("--image", help="DICOM, PNG or JPEG file the question is about")
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic)")
    p.add_argument("question", help="the question, e.g. \"这是什么检查？\"")


# name -> (help, "module:ConfigClass" whose fields become flags, or None). Modules are
# imported only for the command being run, so `medvl --help` starts no torch, Ray or HF.
COMMANDS: dict[str, tuple[str, str | None]] = {
    "pipeline": ("the whole job: preprocess -> stage 1 -> stage 2 -> evaluate -> export -> deploy", None),
    "preprocess": ("LLaVA/ChiMed-VL records + images -> Parquet shards (Ray Data)",
                   "medvl.data.preprocess:PreprocessConfig"),
    "train": ("one curriculum stage on Ray Train + DeepSpeed (--stage 1|2)", "medvl.train.config:TrainConfig"),
    "eval": ("medical VQA evaluation with Ray Data batch inference -> metrics + report "
             "(`medvl eval compare RUN_A RUN_B`: paired tests of two runs)",
             "medvl.eval.evaluate:EvalConfig"),
    "serve": ("serve an exported model behind an OpenAI-compatible endpoint (Ray Serve)",
              "medvl.serving.api:ServeConfig"),
    "chat": ("ask an exported model one question about one image, streamed (no Ray)", None),
    "demo-data": ("build the demo corpus from real DICOM files that install offline", None),
    "import-vqa": ("VQA-RAD / SLAKE / PathVQA / PMC-VQA release files -> eval records", None),
    "convert": ("original LLaVA / Qilin-Med-VL checkpoint -> HF LlavaForConditionalGeneration", None),
    "export-projector": ("HF model's projector -> LLaVA's mm_projector.bin", None),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medvl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s flags are built (they need its config class)."""
    import importlib

    parser = argparse.ArgumentParser(prog="medvl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"medvl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, cls_path) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        ident = name.replace("-", "_")
        p.set_defaults(fn=globals()[f"cmd_{ident}"])
        if name != command:
            continue
        if cls_path:
            module, cls = cls_path.split(":")
            _add_config_flags(p, getattr(importlib.import_module(module), cls))
        if f"_args_{ident}" in globals():
            globals()[f"_args_{ident}"](p)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["eval", "compare"]:  # a sub-subcommand: eval's own flags do not apply
        try:
            return eval_compare(argv[2:])
        except ValueError as e:
            print(f"medvl eval compare: error: {e}", file=sys.stderr)
            raise SystemExit(2) from e
    args = build_parser(next((a for a in argv if a in COMMANDS), None)).parse_args(argv)
    try:
        args.fn(args)
    except ValueError as e:  # config and input errors: a clear message, not a traceback
        print(f"medvl {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()

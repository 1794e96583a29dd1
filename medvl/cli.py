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
from collections.abc import Callable
from typing import Any

from medvl import config


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
    flags = [f"{f.name}={getattr(args, f.name)}" for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None]
    return config.load(cls, args.config, flags + list(args.overrides), section=args.section)


def _placement(args: argparse.Namespace):
    """The recipe's ``placement:`` section (defaults: cluster/aws.yaml's node types)."""
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
    print(json.dumps(train(_config_from_args(TrainConfig, args), _placement(args)), indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from medvl.eval.evaluate import EvalConfig, evaluate

    metrics = evaluate(_config_from_args(EvalConfig, args), _placement(args))
    print(json.dumps({k: metrics[k] for k in ("n", "errors", "closed_chance", "overall")}, indent=2))


def cmd_import_vqa(args: argparse.Namespace) -> None:
    from medvl.eval.importers import import_vqa

    n = import_vqa(args.format, args.src, args.output, args.split, args.lang)
    print(f"wrote {n} records to {args.output}; evaluate with --data {args.output} --image-root {args.src}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from medvl.pipeline import run_pipeline

    run_pipeline(args.config, args.output, args.only, args.start, args.until, args.keep_serving, args.force)


def cmd_demo_data(args: argparse.Namespace) -> None:
    from medvl.data.demo import build_demo_data

    print(json.dumps(build_demo_data(args.output, args.variants, args.seed), indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    from medvl.serving.api import ServeConfig
    from medvl.serving.app import run_local

    cfg = _config_from_args(ServeConfig, args)
    if not cfg.model:
        raise ValueError("serve: --model is required")
    print(f"serving {cfg.model} as {cfg.model_name!r} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
    run_local(cfg, args.host, args.port, blocking=True)


def cmd_convert(args: argparse.Namespace) -> None:
    from medvl.model.convert import convert_llava

    convert_llava(args.src, args.vision_tower, args.dst)
    print(f"wrote {args.dst}: LlavaForConditionalGeneration (safetensors), tokenizer, processor")


def cmd_export_projector(args: argparse.Namespace) -> None:
    from medvl.model.build import load_hf
    from medvl.model.convert import export_projector

    export_projector(load_hf(args.model), args.output)
    print(f"wrote {args.output} (LLaVA pretrain_mm_mlp_adapter format)")


def build_parser() -> argparse.ArgumentParser:
    from medvl.data.preprocess import PreprocessConfig
    from medvl.eval.evaluate import EvalConfig
    from medvl.eval.importers import IMPORTERS
    from medvl.serving.api import ServeConfig
    from medvl.train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="medvl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands: list[tuple[str, str, Callable, type | None]] = [
        ("preprocess", "LLaVA/ChiMed-VL records + images -> Parquet shards (Ray Data)",
         cmd_preprocess, PreprocessConfig),
        ("train", "one curriculum stage on Ray Train + DeepSpeed (--stage 1|2)", cmd_train, TrainConfig),
        ("eval", "medical VQA evaluation with Ray Data batch inference -> metrics + report",
         cmd_eval, EvalConfig),
        ("import-vqa", "VQA-RAD / SLAKE / PathVQA / PMC-VQA release files -> eval records",
         cmd_import_vqa, None),
        ("pipeline", "the whole job: preprocess -> stage 1 -> stage 2 -> evaluate -> export -> deploy",
         cmd_pipeline, None),
        ("demo-data", "build the demo corpus from real DICOM files that install offline",
         cmd_demo_data, None),
        ("serve", "serve an exported model behind an OpenAI-compatible endpoint (Ray Serve)",
         cmd_serve, ServeConfig),
        ("convert", "original LLaVA / Qilin-Med-VL checkpoint -> HF LlavaForConditionalGeneration",
         cmd_convert, None),
        ("export-projector", "HF model's projector -> LLaVA's mm_projector.bin", cmd_export_projector, None),
    ]
    for name, help_, fn, cls in commands:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        if cls is not None:
            _add_config_flags(p, cls)
    demo = sub.choices["demo-data"]
    demo.add_argument("--output", required=True, help="directory to write the corpus to")
    demo.add_argument("--variants", type=int, default=10, help="augmented copies per training image")
    demo.add_argument("--seed", type=int, default=0, help="augmentation seed")
    conv = sub.choices["convert"]
    conv.add_argument("--src", required=True, help="original LLaVA-layout directory (path or s3://)")
    conv.add_argument("--vision-tower", required=True, help="CLIP vision tower directory (path or s3://)")
    conv.add_argument("--dst", required=True, help="output HF directory (path or s3://)")
    exp = sub.choices["export-projector"]
    exp.add_argument("--model", required=True, help="HF model directory (path or s3://)")
    exp.add_argument("--output", required=True, help="file to write, e.g. mm_projector.bin")
    from medvl.pipeline import STEPS

    pipe = sub.choices["pipeline"]
    pipe.add_argument("--config", required=True, help="YAML recipe (workflows/configs/*.yaml)")
    pipe.add_argument("--output", help="run URI; replaces the recipe's `run` (and every ${run} in it)")
    pipe.add_argument("--only", choices=STEPS, help="run just this step")
    pipe.add_argument("--from", dest="start", choices=STEPS, help="start at this step")
    pipe.add_argument("--until", choices=STEPS, help="stop after this step")
    pipe.add_argument("--keep-serving", action="store_true",
                      help="local Ray: keep the endpoint up after the check request (Ctrl-C stops)")
    pipe.add_argument("--force", action="store_true", help="redo selected steps even if complete")
    imp = sub.choices["import-vqa"]
    imp.add_argument("--format", required=True, choices=sorted(IMPORTERS), help="the release's layout")
    imp.add_argument("--src", required=True, help="unpacked release directory (path or s3://)")
    imp.add_argument("--output", required=True, help="records file to write (.jsonl)")
    imp.add_argument("--split", default="test", help="split to import (vqa-rad: test|train|all)")
    imp.add_argument("--lang", default="all", choices=["all", "en", "zh"], help="SLAKE: question language")
    srv = sub.choices["serve"]
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except ValueError as e:  # config and input errors: a clear message, not a traceback
        print(f"medvl {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()

"""The `fastgen` command: generate images and evaluate models. Training goes through `accelerate launch`."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from . import assets
from .pipelines.auto import FastPipeline, read_fastgen_metadata, resolve_model_location
from .pipelines.negative_attention import METHOD_DEFAULTS
from .utils.safe_loading import check_weight_files


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help=f"An embedded model ({', '.join(assets.pipeline_names())}), a local folder or a Hub id.",
    )
    grid = parser.add_mutually_exclusive_group()  # a grid of noise levels sets the number of steps
    grid.add_argument("--steps", type=_positive_int, default=None, help="Inference steps (default: the model's).")
    grid.add_argument(
        "--sigmas",
        type=_finite_float,
        nargs="+",
        default=None,
        help="A custom grid of noise levels, strictly decreasing in (0, 1] with 1 pure noise (e.g. 1 0.9 0.75 0.5), "
        "for models whose scheduler takes one (the rectified-flow models); replaces --steps.",
    )
    parser.add_argument("--guidance-scale", type=_finite_float, default=None, help="CFG scale (default: the model's).")
    parser.add_argument(
        "--negative-scale",
        type=_non_negative_float,
        default=None,
        help="Strength of negative prompts at guidance <= 1: NASA's alpha or NAG's phi (default: the model's).",
    )
    parser.add_argument(
        "--negative-method",
        choices=sorted(METHOD_DEFAULTS),
        default=None,
        help="How negative prompts steer cross-attention at guidance <= 1 (default: the model's, else nasa).",
    )
    parser.add_argument(
        "--oms",
        default=None,
        help="A One More Step module (embedded name such as shapes-oms, folder or Hub id) to run in front of the model.",
    )
    parser.add_argument(
        "--oms-prompt", default=None, help="What the OMS module reads instead of the prompt (needs --oms)."
    )
    parser.add_argument(
        "--oms-guidance-scale", type=_non_negative_float, default=None, help="CFG on the OMS module (needs --oms)."
    )
    parser.add_argument(
        "--oms-noise-mean",
        choices=("keep", "remove"),
        default=None,
        help="Keep the base noise's spatial mean (the original OMS) or remove it so that brightness and background"
        " are the OMS module's alone (default: the module's stored choice; needs --oms).",
    )
    parser.add_argument(
        "--ppap",
        default=None,
        help="PPAP guidance (embedded shapes-ppap, or a folder): a saved PPAPGuidance, or a collection with "
        "classifier/ and regressor/ subfolders.",
    )
    parser.add_argument(
        "--guide-class", default=None, help="The class a PPAP classifier guides toward (needs --ppap)."
    )
    parser.add_argument(
        "--guide-target",
        type=_finite_float,
        nargs="+",
        default=None,
        help="The values a PPAP regressor guides toward.",
    )
    parser.add_argument("--ppap-scale", type=_non_negative_float, default=None, help="PPAP scale (default: stored).")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument(
        "--decoder",
        default=None,
        help="An AutoencoderTiny (embedded name, folder or Hub id) to decode with instead of the model's VAE,"
        " e.g. shapes-tiny-decoder.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="Write images for prompts to a folder.")
    _add_model_args(generate)
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="One prompt.")
    prompts.add_argument("--prompts", type=Path, help="A text file with one prompt per line.")
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--num-images", type=_positive_int, default=1, help="Images per prompt.")
    generate.add_argument("--out", type=Path, required=True, help="Output folder (created if missing).")

    evaluate = commands.add_parser("eval", help="Score a model on ShapesWorld evaluation prompts.")
    _add_model_args(evaluate)
    evaluate.add_argument("--n", type=_positive_int, default=1000, help="Number of evaluation prompts.")
    evaluate.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    evaluate.add_argument(
        "--negative",
        action="store_true",
        help="Measure negative prompts instead: colour-free prompts with each colour as negative prompt in turn"
        " ((1 + 8) x --n images; see fastgen_diffusers.shapes.negative_eval).",
    )
    evaluate.add_argument(
        "--open",
        action="store_true",
        help="Measure open prompts instead: --n partial prompts of several kinds, stated-attribute adherence per kind"
        " and each open attribute's distance from the data's distribution (see fastgen_diffusers.shapes.open_prompts).",
    )
    return parser


def load_decoder(decoder: str, parser: argparse.ArgumentParser):
    """The `AutoencoderTiny` named by `--decoder`, which takes the VAE's place (the standard Diffusers swap).

    Safetensors only, as `--model`: a pickled decoder is refused and a damaged one is named before loading."""
    import torch
    from diffusers import AutoencoderTiny

    location = resolve_model_location(decoder)
    if not Path(location).exists() and location.count("/") != 1:
        parser.error(
            f"--decoder {decoder!r} is not an embedded model ({', '.join(assets.names())}), a folder or a Hub id."
        )
    try:
        check_weight_files(location)
        # Shipped in fp16; the CPU wants fp32.
        return AutoencoderTiny.from_pretrained(location, torch_dtype=torch.float32, use_safetensors=True)
    except (ValueError, OSError) as error:
        parser.error(f"--decoder {decoder!r} could not be loaded as an AutoencoderTiny: {error}")


def load_pipeline(model: str, parser: argparse.ArgumentParser, decoder: str | None = None):
    location = resolve_model_location(model)
    if not Path(location).exists() and location.count("/") != 1:
        parser.error(
            f"--model {model!r} is not an embedded model ({', '.join(assets.pipeline_names())}), a folder or a Hub id."
        )
    components = {"vae": load_decoder(decoder, parser)} if decoder is not None else {}
    try:
        pipe = FastPipeline.from_pretrained(location, **components)
    except (ValueError, OSError) as error:
        parser.error(f"--model {model!r} could not be loaded: {error}")
    pipe.set_progress_bar_config(disable=True)
    return pipe, read_fastgen_metadata(location)


def attach_oms(pipe, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """`pipe` itself, or with `--oms` an `OMSPipeline` running that module in front of it."""
    if args.oms is None:
        if args.oms_prompt is not None or args.oms_guidance_scale is not None or args.oms_noise_mean is not None:
            parser.error("--oms-prompt, --oms-guidance-scale and --oms-noise-mean need --oms.")
        return pipe
    from .pipelines.oms import OMSPipeline

    location = resolve_model_location(args.oms)
    if not Path(location).exists() and location.count("/") != 1:
        parser.error(
            f"--oms {args.oms!r} is not an embedded model ({', '.join(assets.names())}), a folder or a Hub id."
        )
    try:
        check_weight_files(location)  # safetensors only, a damaged file named, as for --model
    except ValueError as error:
        parser.error(f"--oms {args.oms!r} could not be loaded: {error}")
    try:
        oms_pipe = OMSPipeline.from_pretrained(location, base_pipeline=pipe, use_safetensors=True)
    except (ValueError, TypeError, OSError) as error:
        parser.error(f"--oms {args.oms!r} cannot run in front of --model {args.model!r}: {error}")
    oms_pipe.set_progress_bar_config(disable=True)
    return oms_pipe


def load_ppap(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The `PPAPGuidance` named by `--ppap`: a collection's classifier/ (with `--guide-class`, and in eval by default)
    or regressor/ (with `--guide-target`), a member named outright (`shapes-ppap/regressor`), or a saved
    PPAPGuidance folder, or a Hub id: the names `FastPipeline.from_pretrained(..., ppap=...)` reads."""
    from .pipelines.ppap import load_ppap_guidance

    if args.guide_class is not None and args.guide_target is not None:
        parser.error("Give --guide-class (a classifier guide) or --guide-target (a regressor guide), not both.")
    try:
        return load_ppap_guidance(args.ppap, member="regressor" if args.guide_target is not None else None)
    except (ValueError, OSError) as error:
        parser.error(f"--ppap {args.ppap!r} could not be loaded: {error}")


def guided(pipe):
    """`pipe` as a pipeline whose loop takes `guidance_fn` (the teacher's folder names StableDiffusionPipeline)."""
    from .pipelines.ppap import with_guidance_loop

    guided_pipe = with_guidance_loop(pipe)
    guided_pipe.set_progress_bar_config(disable=True)
    return guided_pipe


def ppap_kwargs(args: argparse.Namespace, pipe, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """`guidance_fn` for `fastgen generate --ppap`, bound to `--guide-class` or `--guide-target`."""
    if args.ppap is None:
        if args.guide_class is not None or args.guide_target is not None or args.ppap_scale is not None:
            parser.error("--guide-class, --guide-target and --ppap-scale need --ppap.")
        return {}
    guidance = load_ppap(args, parser)
    if args.guide_class is None and args.guide_target is None:
        parser.error(f"--ppap needs --guide-class (one of {guidance.labels}) or --guide-target.")
    if guidance.task == "classification" and args.guide_target is not None:
        parser.error(f"--guide-target: --ppap {args.ppap!r} is a classifier; give --guide-class ({guidance.labels}).")
    if guidance.task == "regression" and args.guide_class is not None:
        parser.error(f"--guide-class: --ppap {args.ppap!r} is a regressor; give --guide-target ({guidance.labels}).")
    try:
        return {
            "guidance_fn": guidance.bind(class_label=args.guide_class, target=args.guide_target, scale=args.ppap_scale)
        }
    except (ValueError, TypeError) as error:
        parser.error(f"{flag_named_in(str(error), '--ppap')}: {error}")


def oms_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`--oms-prompt`, `--oms-guidance-scale` and `--oms-noise-mean` (None: the module's stored default)."""
    if not args.oms:
        return {}
    remove_noise_mean = None if args.oms_noise_mean is None else args.oms_noise_mean == "remove"
    return {"oms_prompt": args.oms_prompt, "oms_guidance_scale": args.oms_guidance_scale,
            "remove_noise_mean": remove_noise_mean}


def sampling_kwargs(args: argparse.Namespace, metadata: dict[str, Any]) -> dict[str, Any]:
    """Steps and guidance from the command line, else from the checkpoint's fastgen.json, else the pipeline's."""
    defaults = metadata.get("default_inference", {})
    if args.sigmas is not None:
        grid = {"sigmas": args.sigmas}
    else:
        grid = {"num_inference_steps": args.steps if args.steps is not None else defaults.get("num_inference_steps")}
    return {
        **grid,
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else defaults.get("guidance_scale"),
        "negative_attention": negative_attention_settings(args),
    }


def default_sampling_kwargs(model: str) -> dict[str, Any]:
    """What `fastgen generate --model MODEL` samples with when no flag overrides it (the model's fastgen.json)."""
    no_overrides = build_parser().parse_args(["eval", "--model", model])  # every flag at its default
    return sampling_kwargs(no_overrides, read_fastgen_metadata(resolve_model_location(model)))


def negative_attention_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """`--negative-method` and `--negative-scale` as the pipelines' `negative_attention` override, or None."""
    settings = {"method": args.negative_method, "scale": args.negative_scale}
    return {key: value for key, value in settings.items() if value is not None} or None


# Pipeline call argument -> the flag that sets it.
CALL_ARGUMENT_FLAGS = {
    "num_inference_steps": "--steps",
    "sigmas": "--sigmas",
    "guidance_scale": "--guidance-scale",
    "negative_attention": "--negative-scale/--negative-method",
    "negative_prompt": "--negative-prompt",
    "oms_prompt": "--oms-prompt",
    "oms_guidance_scale": "--oms-guidance-scale",
    "remove_noise_mean": "--oms-noise-mean",
}
# Further arguments an error from a pipeline or a guide may name, and their flags.
ARGUMENT_FLAGS = {
    **CALL_ARGUMENT_FLAGS,
    "prompt": "--prompt/--prompts",
    "class_label": "--guide-class",
    "target": "--guide-target",
    "scale": "--ppap-scale",
    "height": "--model",
    "width": "--model",
}


def flag_named_in(message: str, fallback: str | None) -> str | None:
    """The flag behind the first `argument` an error message names, or `fallback`."""
    found = [(message.find(f"`{name}"), flag) for name, flag in ARGUMENT_FLAGS.items() if f"`{name}" in message]
    return min(found)[1] if found else fallback


def check_call_arguments(pipe, settings: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """Stop with an error naming the flag when the pipeline's call does not take a setting that is given."""
    accepted = dict(inspect.signature(pipe.__call__).parameters)
    if getattr(pipe, "base_pipeline", None) is not None:  # an OMSPipeline hands the rest to its base
        accepted.update(inspect.signature(pipe.base_pipeline.__call__).parameters)
    for name, value in settings.items():
        if value is not None and name not in accepted:
            parser.error(f"{CALL_ARGUMENT_FLAGS[name]}: {type(pipe).__name__} takes no `{name}`.")
    scheduler = getattr(getattr(pipe, "base_pipeline", None) or pipe, "scheduler", None)
    if settings.get("sigmas") is not None and "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        parser.error(f"--sigmas: {type(scheduler).__name__} takes no custom grid of noise levels; give --steps.")
    guidance = settings.get("guidance_scale")
    if settings.get("negative_attention") is not None and guidance is not None and guidance > 1:
        parser.error(
            f"--negative-scale/--negative-method steer attention only at guidance <= 1, but the guidance scale is"
            f" {guidance}; above 1 the negative prompt acts through classifier-free guidance."
        )


def run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .shapes.evaluate import generate_images

    if args.prompts is not None:
        if not args.prompts.is_file():
            parser.error(f"--prompts {str(args.prompts)!r} does not exist or is not a file.")
        try:
            prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--prompts {str(args.prompts)!r} could not be read as UTF-8 text: {error}")
        if not prompts:
            parser.error(f"--prompts {str(args.prompts)!r} has no prompts.")
    else:
        prompts = [args.prompt]
    blocking = next((p for p in (args.out, *args.out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        parser.error(f"--out {str(args.out)!r}: {str(blocking)!r} is a file; give a folder.")

    pipe, metadata = load_pipeline(args.model, parser, args.decoder)
    if args.ppap is not None:  # before OMS, which hands `guidance_fn` on to the pipeline it runs in front of
        pipe = guided(pipe)
    pipe = attach_oms(pipe, args, parser)
    settings = {**sampling_kwargs(args, metadata), "negative_prompt": args.negative_prompt, **oms_kwargs(args)}
    check_call_arguments(pipe, settings, parser)
    guidance = ppap_kwargs(args, pipe, parser)
    expanded = [prompt for prompt in prompts for _ in range(args.num_images)]
    images = generate_images(pipe, expanded, seed=args.seed, batch_size=args.batch_size, **settings, **guidance)

    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, image) in enumerate(zip(expanded, images)):
        name = f"{i:05d}.png"
        image.save(args.out / name)
        ppap = (
            {"ppap": args.ppap, "guide_class": args.guide_class, "guide_target": args.guide_target} if guidance else {}
        )
        records.append(
            {"file": name, "prompt": prompt, "seed": args.seed, "index": i, "model": args.model, **settings, **ppap}
        )
    index = args.out / "index.jsonl"
    partial = index.with_name("index.jsonl.partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(partial, index)
    print(f"Wrote {len(images)} image{'s' if len(images) != 1 else ''} to {args.out}/ (index: {index})")


def format_table(model: str, settings: dict[str, Any], result: dict[str, Any]) -> str:
    adherence, held_out = result["adherence"], result["held_out_adherence"]
    columns = ["all", "shape", "colour", "size", "position", "background"]
    steps, guidance = settings.get("num_inference_steps"), settings.get("guidance_scale")
    lines = [
        f"model: {model}   steps: {steps if steps is not None else 'default'}   "
        f"guidance: {guidance if guidance is not None else 'default'}   n: {result['n']}",
        "| split | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        "| all prompts | " + " | ".join(f"{adherence[c]:.3f}" for c in columns) + " |",
    ]
    if held_out:
        lines.append("| held-out pairs | " + " | ".join(f"{held_out[c]:.3f}" for c in columns) + " |")
    lines.append(
        f"rejected: {result['rejected']:.3f}   fidelity (RMS to the nearest clean drawing): {result['fidelity']:.2f}   "
        f"drawing_fd: {result['drawing_fd']:.3f}   shapes_fd: {result['shapes_fd']:.3f}   "
        "brightness error (black/white backgrounds, 0-255): "
        f"{result['brightness_error']:.2f}   images/s: {result['images_per_second']:.2f}"
    )
    return "\n".join(lines)


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .shapes.evaluate import evaluate_pipeline
    from .shapes.judge import ShapesJudge

    pipe, metadata = load_pipeline(args.model, parser, args.decoder)
    if args.ppap is not None:  # before OMS, which hands `guidance_fn` on to the pipeline it runs in front of
        pipe = guided(pipe)
    pipe = attach_oms(pipe, args, parser)
    settings = {**sampling_kwargs(args, metadata), **oms_kwargs(args)}
    check_call_arguments(pipe, settings, parser)
    judge = ShapesJudge.from_pretrained()
    if args.ppap is not None:
        run_ppap_eval(args, pipe, judge, settings, parser)
        return
    if args.open and args.negative:
        parser.error("--open and --negative are two different measurements; give one.")
    if args.open:
        from .shapes.evaluate import evaluate_open_prompts

        result = evaluate_open_prompts(
            pipe, judge, num_prompts=args.n, seed=args.seed, batch_size=args.batch_size, **settings
        )
        if args.json:
            print(json.dumps({"model": args.model, "seed": args.seed, **settings, **result}))
        else:
            from .shapes.open_prompts import format_open_prompt_result

            print(f"model: {args.model}   settings: {settings}\n{format_open_prompt_result(result)}")
        return
    if args.negative:
        from .shapes.negative_eval import evaluate_negative_prompts, format_negative_table

        if "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
            parser.error(f"--negative: {type(pipe).__name__} takes no `negative_prompt`.")
        result = evaluate_negative_prompts(
            pipe, judge, num_prompts=args.n, seed=args.seed, batch_size=args.batch_size, **settings
        )
    else:
        result = evaluate_pipeline(
            pipe, judge, num_prompts=args.n, seed=args.seed, batch_size=args.batch_size, **settings
        )
    if args.json:
        print(json.dumps({"model": args.model, "seed": args.seed, **settings, **result}))
    elif args.negative:
        print(f"model: {args.model}   settings: {settings}\n{format_negative_table(result)}")
    else:
        print(format_table(args.model, settings, result))


def run_ppap_eval(args: argparse.Namespace, pipe, judge, settings: dict[str, Any], parser) -> None:
    """`fastgen eval --ppap`: the guided attribute on prompts that leave it open, without and with PPAP."""
    from .guidance.shapesworld import GUIDED_ATTRIBUTE, bind_target, evaluate_guided

    if args.guide_class is not None or args.guide_target is not None:
        parser.error(
            "fastgen eval --ppap guides each quarter of the prompts toward one target; drop --guide-class/--guide-target."
        )
    guidance = load_ppap(args, parser)
    attribute = GUIDED_ATTRIBUTE[guidance.task]
    rows = {}
    for name, guidance_for in (
        ("no guidance", None),
        ("PPAP", lambda target: bind_target(guidance, guidance.task, target, scale=args.ppap_scale)),
    ):
        result = evaluate_guided(
            pipe, judge, guidance.task, guidance_for, args.n, args.seed, args.batch_size, **settings
        )
        rows[name] = {k: v for k, v in result.items() if k not in ("images", "targets")}
    if args.json:
        print(json.dumps({"model": args.model, "ppap": args.ppap, "seed": args.seed, **settings, **rows}))
        return
    stated = list(rows["PPAP"]["stated"])
    print(
        f"model: {args.model}   ppap: {args.ppap} ({guidance.task})   n: {args.n}   prompts leave out the {attribute}"
    )
    print(f"| method | {attribute} = target | " + " | ".join(stated) + " |")
    print("|---" * (len(stated) + 2) + "|")
    for name, row in rows.items():
        print(f"| {name} | {row['target_rate']:.3f} | " + " | ".join(f"{row['stated'][s]:.3f}" for s in stated) + " |")
    if guidance.task == "regression":
        print("centre error (px): " + ", ".join(f"{name} {row['centre_error_px']:.2f}" for name, row in rows.items()))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, list) and not value:  # `--flag=--`: argparse (3.11) drops the "--" and skips `type`
            parser.error(f"argument --{name.replace('_', '-')}: expected a value, got '--'")
    # A command prints its result, not the loading bars of every component.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        (run_generate if args.command == "generate" else run_eval)(args, parser)
    except (ValueError, TypeError) as error:
        # A setting the pipeline (or guide) refuses, by the argument its message names: an error for the flag
        # that set it, not a traceback. Anything else is a bug and keeps its traceback.
        flag = flag_named_in(str(error), None)
        if flag is None:
            raise
        parser.error(f"{flag}: {error}")


if __name__ == "__main__":
    sys.exit(main())

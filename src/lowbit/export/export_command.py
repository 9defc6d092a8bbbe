"""``lowbit export FILE_OR_CHECKPOINT --format onnx --out model.onnx``: write an ONNX QDQ graph.

The source is a ``.lowbit`` file (rebuilt with ``lowbit.load``; its recorded
input shape gives the example input) or a training checkpoint (or its
directory; model and data from ``run.json``, a quantization-aware one rebuilt
with its preset), or a float model from outside lowbit: ``--model
package.module:function`` with ``--model-args``, ``--weights`` and
``--input-shape C,H,W`` (or ``--data``, whose images give the shape). The
command table entry is ``Command(HELP, add_arguments, run)``.
"""

from __future__ import annotations

import argparse

import torch

from ..cli_options import MODEL_HELP, add_image_options, add_model_options, data_spec
from ..errors import ConfigError
from ..output import Output, output_path

HELP = "export a .lowbit file or a training checkpoint to ONNX (QDQ graph for onnxruntime's int8 kernels)"
FORMATS = ("onnx",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .onnx import BINARY_OPS, DEFAULT_CHANNEL_MULTIPLE, DEFAULT_OPSET, WEIGHT_TYPES

    parser.add_argument("source", metavar="FILE_OR_CHECKPOINT", nargs="?", default=None,
                        help="a .lowbit file, or a training checkpoint (or its directory); none with --model "
                             "package.module:function")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="output format (default: onnx)")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--int4", action="store_true",
                        help="store codes of at most 4 bits as int4/uint4 (opset >= 21; default: int8 containers)")
    parser.add_argument("--channel-multiple", type=int, default=DEFAULT_CHANNEL_MULTIPLE,
                        help="pad the input channels of small int8 convs to a multiple of this, for onnxruntime's "
                             f"fast x86 int8 conv (default: {DEFAULT_CHANNEL_MULTIPLE}; 1: no padding)")
    parser.add_argument("--binary-ops", default="float", choices=BINARY_OPS,
                        help="binary / XNOR weights as dequantized float (default, runs anywhere) or as sign bits "
                             "in the ai.lowbit custom ops (docs/onnx.md)")
    parser.add_argument("--weight-type", default="safe", choices=WEIGHT_TYPES,
                        help="int8 weight codes before 8-bit inputs: int8 where onnxruntime's x86 kernels without "
                             "VNNI cannot saturate, else uint8 (default: safe, exact on every CPU); int8: always "
                             "(exact and fastest on x86 CPUs with VNNI); uint8: always")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--data", default=None,
                        help="dataset of a checkpoint (default: from run.json), or whose images give the input "
                             "shape of a --model package.module:function")
    add_model_options(parser)
    add_image_options(parser)


def _source(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """(model, example input) of the source argument."""
    from .. import workflow
    from ..cli_options import build_external, check_model_options, input_shape_of, is_external

    model_args, input_shape = check_model_options(args)
    data = data_spec(args.data, args, input_shape)
    if is_external(args):
        if args.source is not None:
            raise ConfigError(f"with --model {args.model} give its weights with --weights, not as the source "
                              f"argument {args.source!r}")
        shape = input_shape_of(data, input_shape)
        return build_external(args, model_args), torch.zeros(1, *shape)
    if args.source is None:
        raise ConfigError("export needs a .lowbit file or a training checkpoint, or --model package.module:function")
    source = workflow.checkpoint_file(args.source)
    if not source.is_file():
        raise ConfigError(f"{args.source!r} is neither a .lowbit file nor a training checkpoint")
    if source.suffix == ".lowbit":
        model = workflow.load_quantized(source)  # rebuilt from the file's graph IR, which records the input shape
        return model, torch.zeros([1, *model.ir["inputs"][0]["shape"][1:]])
    model, run = workflow.load_trained(source, args.model, data)
    return model, workflow.example_input(run["data"])


def run(args: argparse.Namespace) -> Output:
    """The command's text and JSON data."""
    from .onnx import local_vnni, to_onnx, uint8_weight_layers, write_onnx

    out = output_path(args.out, "--out")
    model, example = _source(args)
    proto = to_onnx(model, example, opset=args.opset, int4=args.int4, channel_multiple=args.channel_multiple,
                    binary_ops=args.binary_ops, weight_type=args.weight_type)
    path = write_onnx(proto, out)
    uint8_layers = uint8_weight_layers(proto)
    data = {"path": str(path), "source": args.source or args.model, "format": args.format, "opset": args.opset,
            "input_shape": [-1, *example.shape[1:]], "bytes": path.stat().st_size, "weight_type": args.weight_type,
            "uint8_weight_layers": uint8_layers}
    text = f"wrote {path} ({data['bytes']:,} bytes, ONNX opset {args.opset}) from {data['source']}"
    if uint8_layers:
        vnni = local_vnni()
        here = ("unknown here" if vnni is None else f"this CPU has {', '.join(vnni)}" if vnni
                else "this CPU has none")
        text += (f"\n{len(uint8_layers)} layer(s) store their 8-bit weights as uint8: exact on every CPU (int8 "
                 "would saturate onnxruntime's x86 kernels without VNNI), but 1.2-2.6x slower than int8 "
                 f"weights; for a VNNI target ({here}) use --weight-type int8, for speed on any x86 the w7a8 "
                 "preset (docs/onnx.md)")
        data["local_vnni"] = vnni
    return Output(text=text, data=data)

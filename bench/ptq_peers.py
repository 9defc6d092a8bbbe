"""The peers of bench/ptq.py: brevitas, NNCF and torch's own fake-quant, each run through its post-training flow
at a setting (weight bits, activation bits) and returned as a torch module that computes the quantized logits.

Every peer keeps the weights of the first and the last quantized layer at 8 bits and quantizes the network's
input at 8 bits (lowbit's default "8bit" first/last policy, which also quantizes the last layer's input at 8
bits); the other weights are symmetric per output channel at the setting's bits (narrow grid at 8 bits, full
grid below, as lowbit's presets), the activations affine per tensor at the setting's bits where the peer can.

- ``torch``: ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` (batch norms folded into the fused QAT convs,
  torch's own placement: each op's output observed) with ``FakeQuantize`` of ``PerChannelMinMaxObserver``
  weights and ``MinMaxObserver`` activations; observers on over the calibration batches, then fake-quant on.
- ``brevitas``: ``preprocess_for_quantize`` (batch norms merged; ``eq``: its graph equalization, 20 iterations),
  ``quantize`` (fx backend: its quantizer placement) with per-channel float-scale weights (``stats``: max |w|)
  and unsigned affine activations from its default 99.999th-percentile statistics, ``calibration_mode``, then
  ``gptq_mode`` (GPTQ) or its learned rounding (AdaRound: hard-sigmoid rounding, rounding regulariser + MSE,
  layer by layer, Adam lr 1e-3, batch 8), then ``bias_correction_mode``.
- ``nncf``: ``nncf.quantize`` (MinMax ranges, then fast bias correction unless ``nobc``), preset "mixed"
  (affine activations) where the target allows it, overflow fix off (the fake-quant model is what is measured);
  4-bit weights need ``target_device=NPU``, the only hardware config with 4-bit quantizers (symmetric
  per-tensor 4-bit activations, hence preset "performance" at a4); no hardware config has 3 bits. The first and
  last layers' weight quantizers and the input quantizer are set back to 8 bits after ``nncf.quantize`` (its
  API has one weight and one activation bit width per model).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout

import torch
from torch import nn

#: tool -> its methods, in the order the bench runs them
METHODS = {
    "brevitas": ("calibrate", "eq", "eq+bias", "gptq", "adaround", "eq+gptq+bias", "eq+adaround+bias"),
    "nncf": ("minmax", "minmax+fastbc"),
    "torch": ("fakequant",),
}


class NotExpressible(Exception):
    """The peer cannot express this setting or method; the message says why."""


@contextlib.contextmanager
def _quiet():
    """No warnings, stdout or stderr (the peers print progress bars and notices of their own)."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _weight_layers(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


# ----------------------------------------------------------------------------------------------------- torch


def torch_fakequant(model: nn.Module, batches: list[torch.Tensor], weight_bits: int, act_bits: int,
                    method: str = "fakequant", adaround_steps: int = 0) -> nn.Module:
    """torch.ao's QAT graph in eval mode: observe the calibration batches, then fake-quantize."""
    from torch.ao.quantization import (FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver, QConfig,
                                       QConfigMapping, disable_fake_quant, disable_observer, enable_fake_quant,
                                       enable_observer)
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    def qconfig(w: int, a: int) -> QConfig:
        weight = FakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=-2 ** (w - 1) + (w >= 8),
                                        quant_max=2 ** (w - 1) - 1, dtype=torch.qint8,
                                        qscheme=torch.per_channel_symmetric, ch_axis=0)
        act = FakeQuantize.with_args(observer=MinMaxObserver, quant_min=0, quant_max=2 ** a - 1, dtype=torch.quint8,
                                     qscheme=torch.per_tensor_affine)
        return QConfig(activation=act, weight=weight)

    layers = _weight_layers(model, (nn.Conv2d, nn.Linear))
    mapping = QConfigMapping().set_global(qconfig(weight_bits, act_bits))
    for name, _ in (layers[0], layers[-1]):
        mapping.set_module_name(name, qconfig(8, 8))
    with _quiet():
        prepared = prepare_qat_fx(copy.deepcopy(model).train(), mapping, example_inputs=(batches[0][:1],))
    prepared.eval()
    prepared.apply(disable_fake_quant)
    prepared.apply(enable_observer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    prepared.apply(enable_fake_quant)
    prepared.apply(disable_observer)
    return prepared


# -------------------------------------------------------------------------------------------------- brevitas


def _brevitas_bits(module: nn.Module, proxy: str, bits: int, **extra) -> None:
    """Rebuild one brevitas quantizer proxy with another bit width (before calibration)."""
    target = getattr(module, proxy)
    target.quant_injector = target.quant_injector.let(bit_width=bits, **extra)
    target.init_tensor_quant()


def _brevitas_adaround(model: nn.Module, batches: list[torch.Tensor], steps: int) -> None:
    """brevitas's learned rounding (AdaRound's hard sigmoid), layer by layer, as its ImageNet PTQ example."""
    import brevitas_examples.common.learned_round.learned_round_trainer as trainer_module
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    from brevitas_examples.common.learned_round.learned_round_args import (HandlerSpec, LossArgs, OptimizerArgs,
                                                                           TrainerConfig, TrainingArgs)
    from brevitas_examples.common.learned_round.learned_round_method import LearnedRoundArgs
    from brevitas_examples.imagenet_classification.ptq.learned_round_utils import (CacheVision,
                                                                                   vision_block_forward,
                                                                                   vision_forward)

    # accelerate's offloading hooks are for GPUs; on CPU they are no-ops whose removal trips over brevitas's
    # injectors, so they are left out
    trainer_module.offload_model = lambda m: m
    trainer_module.remove_hooks = lambda m: None
    config = TrainerConfig(
        training_args=TrainingArgs(
            optimizers_args=[OptimizerArgs(target_params="learned_round", optimizer_cls="Adam", lr=1e-3,
                                           optimizer_kwargs={}, lr_scheduler_args=None)],
            batch_size=8, iters=steps,
            losses_args=[LossArgs(cls="round_reg", kwargs=None),
                         LossArgs(cls="mse", kwargs={"reduction": "none", "dim": 1})],
            loss_scaling_factor=1.0, use_best_model=False, use_amp=False, amp_dtype="float16", fast_update=False),
        training_handlers=[HandlerSpec[LearnedRoundArgs](name="learned_round", config=LearnedRoundArgs(
            learned_round_param="hard_sigmoid", learned_round_kwargs=None))])
    blocks = functools.partial(trainer_module.get_blocks,
                               block_check_fn=lambda m, _name: isinstance(m, QuantWeightBiasInputOutputLayer))
    trainer_module.LearnedRoundTrainer(config=config).train(
        model=model, model_forward=vision_forward, block_forward=vision_block_forward,
        data_loader=[(b, None) for b in batches], cache=CacheVision(), get_blocks_fn=blocks, keep_gpu=True)


def brevitas_ptq(model: nn.Module, batches: list[torch.Tensor], weight_bits: int, act_bits: int,
                 method: str = "calibrate", adaround_steps: int = 500) -> nn.Module:
    """brevitas's PTQ flow: preprocess (``eq``: graph equalization), quantize, calibrate, then GPTQ or
    AdaRound, then bias correction, as ``method`` names them ("eq+gptq+bias", ...)."""
    import brevitas.nn as qnn
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
    from brevitas.graph.gptq import gptq_mode
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq.ptq_common import quantize_model

    steps = set(method.split("+")) - {"calibrate"}
    unknown = steps - {"eq", "bias", "gptq", "adaround"}
    if unknown:
        raise NotExpressible(f"unknown brevitas method step(s) {sorted(unknown)}")
    with _quiet():
        prepared = preprocess_for_quantize(copy.deepcopy(model).eval(), equalize_iters=20 if "eq" in steps else 0,
                                           equalize_merge_bias=True, merge_bn=True)
        quantized = quantize_model(prepared, backend="fx", weight_bit_width=weight_bits, act_bit_width=act_bits,
                                   bias_bit_width=None, weight_quant_granularity="per_channel",
                                   act_quant_percentile=99.999, act_quant_type="asym",
                                   scale_factor_type="float_scale", quant_format="int",
                                   weight_narrow_range=weight_bits >= 8)
        layers = _weight_layers(quantized, (qnn.QuantConv2d, qnn.QuantLinear))
        for _, layer in (layers[0], layers[-1]):
            _brevitas_bits(layer, "weight_quant", 8, narrow_range=True)
        inputs = [m for m in quantized.modules() if isinstance(m, qnn.QuantIdentity)]
        if act_bits != 8 and inputs:  # the first QuantIdentity quantizes the network's input
            _brevitas_bits(inputs[0], "act_quant", 8)
        quantized.eval()
        with torch.no_grad():
            quantized(batches[0])
            with calibration_mode(quantized):
                for batch in batches:
                    quantized(batch)
            if "gptq" in steps:
                with gptq_mode(quantized, act_order=False, use_quant_activations=False,
                               create_weight_orig=True) as gptq:
                    for _ in range(gptq.num_layers):
                        for batch in batches:
                            gptq.model(batch)
                        gptq.update()
        if "adaround" in steps:
            _brevitas_adaround(quantized, batches, adaround_steps)
        if "bias" in steps:
            with torch.no_grad(), bias_correction_mode(quantized):
                for batch in batches:
                    quantized(batch)
    return quantized.eval()


# ------------------------------------------------------------------------------------------------------ nncf


class _Wrapped(nn.Module):
    """A model inside a plain module: NNCF adds its hook storage as a child, which an ``nn.Sequential`` would call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def nncf_ptq(model: nn.Module, batches: list[torch.Tensor], weight_bits: int, act_bits: int,
             method: str = "minmax+fastbc", adaround_steps: int = 0) -> nn.Module:
    """``nncf.quantize`` at the setting; ``method`` "minmax" disables its bias correction."""
    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                       QuantizationParameters)

    if weight_bits not in (4, 8) or act_bits not in (4, 8):
        raise NotExpressible(f"NNCF's hardware configs have 2-, 4-, 8- and 16-bit quantizers, no {weight_bits}-bit "
                             "weights" if weight_bits not in (4, 8) else f"no {act_bits}-bit activations")
    low = weight_bits < 8 or act_bits < 8
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.DISABLE, disable_bias_correction=method == "minmax",
        weights_quantization_params=QuantizationParameters(num_bits=weight_bits, per_channel=True),
        activations_quantization_params=QuantizationParameters(num_bits=act_bits))
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with _quiet():
        quantized = nncf.quantize(
            _Wrapped(copy.deepcopy(model).eval()), nncf.Dataset(batches), subset_size=len(batches),
            preset=nncf.QuantizationPreset.PERFORMANCE if act_bits < 8 else nncf.QuantizationPreset.MIXED,
            target_device=nncf.TargetDevice.NPU if low else nncf.TargetDevice.CPU,
            fast_bias_correction=True, advanced_parameters=advanced)
    quantizers = {n.rsplit("hooks.", 1)[1]: m for n, m in quantized.named_modules() if hasattr(m, "num_bits")}
    layers = _weight_layers(model, (nn.Conv2d, nn.Linear))
    ends = [f"inner/{name.replace('.', '/')}/" for name, _ in (layers[0], layers[-1])]
    chosen = [q for key, q in quantizers.items() if key.endswith("__1.0") and any(key.startswith(e) for e in ends)]
    if act_bits != 8:  # the network's input: a graph input node has no module scope
        chosen += [q for key, q in quantizers.items() if "/" not in key][:1]
    for q in chosen:
        q.num_bits = 8
    return quantized.eval()


PEERS = {"brevitas": brevitas_ptq, "nncf": nncf_ptq, "torch": torch_fakequant}


def versions() -> dict[str, str]:
    """The installed version of each peer (or why it is missing)."""
    out = {}
    for name in ("brevitas", "nncf", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            out[name] = f"missing: {type(e).__name__}"
    out["torch"] = torch.__version__
    out["threads"] = str(torch.get_num_threads())
    out["cpus"] = str(os.cpu_count())
    return out

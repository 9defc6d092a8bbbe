"""End to end: a binary CNN (float first and last layers) in lowbit's Engine against torch float32.

    .venv/bin/python bench/inference.py [--repeats 5]

The model is a BNN-style VGG for 28x28 inputs: float conv 1->128, then
binary 3x3 convs 128-128, 128-256, 256-256, 256-512 (BN + hardtanh around
them, 2x2 max pools), binary linear 512*3*3 -> 1024, float linear -> 10.
The float32 baseline is the same float architecture in torch (eval, no grad); the
int8 baseline is torch's dynamic int8 quantization of its linear layers. Best of
``--repeats`` runs after a warm-up; batch 1 and 64, 1 thread and all threads.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn

import lowbit
from lowbit.runtime import Engine
from timing import best  # bench/timing.py

BINARY = {"name": "binary", "ste": "clipped"}


def model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 128, 3, padding=1), nn.BatchNorm2d(128), nn.Hardtanh()]
    for c_in, c_out, pool in ((128, 128, True), (128, 256, False), (256, 256, True), (256, 512, True)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
        layers += [nn.MaxPool2d(2)] if pool else []
        layers += [nn.BatchNorm2d(c_out), nn.Hardtanh()]
    layers += [nn.Flatten(), nn.Linear(512 * 3 * 3, 1024), nn.BatchNorm1d(1024), nn.Hardtanh(), nn.Linear(1024, 10)]
    return nn.Sequential(*layers).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    float_model = model()
    quantized = lowbit.quantize(float_model, {"weight": BINARY, "input": BINARY, "first": "float", "last": "float"})
    int8 = torch.ao.quantization.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bnn.lowbit")
        lowbit.save(quantized.eval(), path, example_input=torch.zeros(1, 1, 28, 28))
        file_bytes = os.path.getsize(path)
        float_bytes = 4 * sum(p.numel() for p in float_model.parameters())
        print(f"float32 parameters {float_bytes} B; .lowbit file {file_bytes} B ({float_bytes / file_bytes:.1f}x smaller)")
        cores = os.cpu_count() or 1
        for threads in (1, cores):
            torch.set_num_threads(threads)
            engine = Engine(path, threads=threads)
            for batch in (1, 64):
                x = torch.randn(batch, 1, 28, 28)
                xn = x.numpy()
                with torch.no_grad():
                    t_float = best(lambda: float_model(x), args.repeats)
                    t_int8 = best(lambda: int8(x), args.repeats)
                t_engine = best(lambda: engine.run(xn), args.repeats)
                print(f"threads {threads} batch {batch:2d}: torch float32 {t_float * 1e3:8.2f} ms, torch int8-dynamic "
                      f"{t_int8 * 1e3:8.2f} ms, engine {t_engine * 1e3:7.2f} ms -> {t_float / t_engine:5.1f}x vs "
                      f"float32, {t_int8 / t_engine:5.1f}x vs int8")


if __name__ == "__main__":
    main()

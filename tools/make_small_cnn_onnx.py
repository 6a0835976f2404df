"""Make the bundled ``tilec/models/small-cnn.onnx`` from a PyTorch model.

A small classifier as a PyTorch user writes it, exported with torch's
classic ONNX exporter: 3x32x32 input, three conv + batch norm + leaky ReLU
(0.1) blocks with max-pooling, global average pooling, a linear head over
10 classes. Its initializers are its initial weights (seeded); the batch
size 8 is fixed in the input shape, which tilec reads as the model's
default batch. The file carries no loss: train it with ``--loss softmax``.

Run from the repository root (needs torch, the tests' pinned version)::

    python tools/make_small_cnn_onnx.py
"""
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tilec" / "models" / "small-cnn.onnx"


def small_cnn():
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]

    torch.manual_seed(0)
    return nn.Sequential(*block(3, 16), nn.MaxPool2d(2, 2), *block(16, 32), nn.MaxPool2d(2, 2), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def main(out=OUT):
    model = small_cnn().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classic exporter is deprecated, but needs no onnxscript
        # eval mode without constant folding keeps batch norm apart from the conv
        torch.onnx.export(model, (torch.zeros(8, 3, 32, 32),), str(out), opset_version=13, dynamo=False,
                          do_constant_folding=False, input_names=["images"], output_names=["logits"])
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

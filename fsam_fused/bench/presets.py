"""Parameter lists that mirror real models: only the shapes matter to the optimizer."""

from __future__ import annotations


def resnet18_cifar_shapes():
    """The 62 parameter tensors (11.2 M) of the CIFAR ResNet-18 of the F-SAM recipes."""
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    c_in = 64
    for c in (64, 128, 256, 512):
        for block in range(2):
            shapes += [(c, c_in, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
            if block == 0 and c != c_in:
                shapes += [(c, c_in, 1, 1), (c,), (c,)]
            c_in = c
    return shapes + [(10, 512), (10,)]


def vit_b16_shapes():
    """ViT-B/16 at 224 px with a 1000-class head: 152 tensors, 86.6 M."""
    d, mlp = 768, 3072
    shapes = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(12):
        shapes += [
            (d,),
            (d,),
            (3 * d, d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (mlp, d),
            (mlp,),
            (d, mlp),
            (d,),
        ]
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def gpt2_shapes():
    """GPT-2 small (the output layer tied to the token embedding): 148 tensors, 124.4 M."""
    d = 768
    shapes = [(50257, d), (1024, d)]
    for _ in range(12):
        shapes += [
            (d,),
            (d,),
            (d, 3 * d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (d, 4 * d),
            (4 * d,),
            (4 * d, d),
            (d,),
        ]
    return shapes + [(d,), (d,)]


def tiny_shapes():
    """2,000 tensors of 1 to 64 elements: the per-tensor overhead, with no bandwidth to hide it."""
    return [(1 + (i * 37) % 64,) for i in range(2000)]


def single_64m_shapes():
    """One tensor of 64 Mi elements: pure bandwidth."""
    return [(64 * 2**20,)]


def large_shapes():
    """48 tensors of 4096 x 1536: 302 M parameters, a mid-size language model's worth."""
    return [(4096, 1536)] * 48


PRESETS = {
    "resnet18": resnet18_cifar_shapes,
    "vit_b16": vit_b16_shapes,
    "gpt2": gpt2_shapes,
    "tiny2000": tiny_shapes,
    "single64m": single_64m_shapes,
    "large": large_shapes,
}
# The default (--quick) run: about a minute on a 2-core CPU, the C++ build on first use aside.
QUICK = {"cpu": ["resnet18", "tiny2000"], "cuda": ["resnet18", "gpt2", "tiny2000"]}
# --full: every preset that mirrors a model ("large" only on request: 302 M parameters).
FULL = ["resnet18", "vit_b16", "gpt2", "tiny2000", "single64m"]


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

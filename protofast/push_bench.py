"""The push (prototype projection) benchmark: :func:`protofast.push_prototypes` against the original host loop.

Setup (ProtoPNet defaults, SEMANTICS.md §1.1): M = 2000 prototypes of shape (128, 1, 1), K = 200 classes with 10
contiguous prototypes each, 7×7 feature maps, push batch 75, ``num_images`` (2000) images with labels drawn
uniformly from the K classes, all from one seed.

To isolate the cost of the projection itself, the "images" *are* the feature maps: ``conv_features`` is the
identity on ``[B, 128, 7, 7]`` tensors drawn uniform in [0, 1) (the range of the sigmoid add-on). A real backbone
adds the same forward cost to both providers. (``protofast.data.SyntheticParts`` cannot define 200 classes, so
it is not used here.)

Providers, run on fresh copies of one model (same initial prototypes) over the same batches:

``original``   :func:`protofast.reference.push_original.push_prototypes_original`: per batch the original
               ``push_forward`` (``x²`` convolved with the ``ones`` tensor, ``conv2d(x, p)``, the full
               ``(B, M, 7, 7)`` map), both copied to numpy, then the Python loop over the 2000 prototypes.
``protofast``  :func:`protofast.push_prototypes` (``progress=False``).

Both must produce identical prototypes and image indices (checked every round). Timing: a warm-up run of each,
then ``repeats`` rounds, each running both providers in alternating order; medians and the ratio are reported.
Nothing runs at import time.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from typing import Dict, List, Optional, Sequence

PROVIDERS = ("original", "protofast")


def _bench_model_class():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class BenchPPNet(nn.Module):
        """The original PPNet head with identity features (see the module docstring)."""

        def __init__(self, num_prototypes, channels, num_classes, generator):
            super().__init__()
            shape = (num_prototypes, channels, 1, 1)
            self.prototype_shape = shape
            self.prototype_vectors = nn.Parameter(torch.rand(shape, generator=generator))
            self.ones = nn.Parameter(torch.ones(shape), requires_grad=False)
            identity = torch.zeros(num_prototypes, num_classes)
            per_class = num_prototypes // num_classes
            identity[torch.arange(num_prototypes), torch.arange(num_prototypes) // per_class] = 1
            self.register_buffer("prototype_class_identity", identity)

        def conv_features(self, x):
            return x

        def push_forward(self, x):
            """The original: ``relu(conv2d(x², ones) − 2·conv2d(x, p) + ‖p‖²)``, full maps."""
            x2_patch_sum = F.conv2d(x ** 2, self.ones)
            p2 = torch.sum(self.prototype_vectors ** 2, dim=(1, 2, 3)).view(-1, 1, 1)
            xp = F.conv2d(x, self.prototype_vectors)
            return x, F.relu(x2_patch_sum + (-2 * xp + p2))

    return BenchPPNet


def make_push_inputs(num_images: int = 2000, num_prototypes: int = 2000, channels: int = 128, size: int = 7,
                     num_classes: int = 200, batch_size: int = 75, seed: int = 0):
    """``(model, batches)``: a :class:`BenchPPNet` and the list of ``(features, labels)`` push batches."""
    import torch

    g = torch.Generator().manual_seed(seed)
    model = _bench_model_class()(num_prototypes, channels, num_classes, g)
    images = torch.rand(num_images, channels, size, size, generator=g)
    labels = torch.randint(0, num_classes, (num_images,), generator=g)
    batches = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, num_images, batch_size)]
    return model, batches


def _run(provider: str, model, batches):
    from .push import push_prototypes
    from .reference.push_original import push_prototypes_original

    net = copy.deepcopy(model)
    t0 = time.perf_counter()
    if provider == "original":
        res = push_prototypes_original(net, batches)
        index = res.image_index
    else:
        index = push_prototypes(net, batches, progress=False).image_index.numpy()
    seconds = time.perf_counter() - t0
    return seconds, net.prototype_vectors.detach(), index


def run_push_benchmark(num_images: int = 2000, batch_size: int = 75, repeats: int = 3,
                       threads: Optional[int] = None, seed: int = 0,
                       providers: Sequence[str] = PROVIDERS) -> Dict:
    """Times the providers interleaved in this process; returns a dict with per-provider times (ms), medians,
    ``ratio`` (original / protofast median), the agreement check and the environment."""
    import numpy as np
    import torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        model, batches = make_push_inputs(num_images=num_images, batch_size=batch_size, seed=seed)
        times: Dict[str, List[float]] = {p: [] for p in providers}
        outputs = {}
        for p in providers:                                   # warm-up (and the agreement check)
            _, proto, index = _run(p, model, batches)
            outputs[p] = (proto, index)
        agree = True
        if len(providers) > 1:
            ref_proto, ref_index = outputs[providers[0]]
            for p in providers[1:]:
                agree &= bool(torch.equal(outputs[p][0], ref_proto)) and bool(np.array_equal(outputs[p][1], ref_index))
        for r in range(repeats):
            order = list(providers) if r % 2 == 0 else list(reversed(providers))
            for p in order:
                seconds, proto, index = _run(p, model, batches)
                times[p].append(seconds * 1e3)
                agree &= bool(torch.equal(proto, outputs[providers[0]][0]))
        medians = {p: statistics.median(v) for p, v in times.items()}
        result = {
            "config": {"num_images": num_images, "batch_size": batch_size, "num_prototypes": 2000, "channels": 128,
                       "feature_map": "7x7", "num_classes": 200, "repeats": repeats, "seed": seed},
            "times_ms": times, "median_ms": medians, "agree": agree,
            "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        }
        if "original" in medians and "protofast" in medians:
            result["ratio"] = medians["original"] / medians["protofast"]
        return result
    finally:
        torch.set_num_threads(old_threads)


def format_push_report(result: Dict) -> str:
    cfg, env = result["config"], result["environment"]
    lines = [f"push over {cfg['num_images']} images (batch {cfg['batch_size']}), M=2000 prototypes 128x1x1, "
             f"K=200, 7x7 maps; torch {env['torch']}, {env['threads']} thread(s), "
             f"1-min load {'-' if env['loadavg_1min'] is None else format(env['loadavg_1min'], '.2f')}",
             f"{'provider':<12}{'median ms':>12}   all rounds (ms)"]
    for p, med in result["median_ms"].items():
        rounds = ", ".join(f"{t:.0f}" for t in result["times_ms"][p])
        lines.append(f"{p:<12}{med:>12.1f}   {rounds}")
    if "ratio" in result:
        lines.append(f"speed-up (original / protofast): {result['ratio']:.1f}x")
    lines.append(f"identical prototypes and image indices: {result['agree']}")
    return "\n".join(lines)

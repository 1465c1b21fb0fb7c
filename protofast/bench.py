"""The ProtoPNet head benchmark behind ``protofast bench`` (and the providers of ``benchmarks/``).

One training-step loss of the ProtoPNet prototype head (SEMANTICS.md §1.2–§1.3) is computed by several
*providers* on the same synthetic tensors:

==============  =====================================================================================
``original``    the original cfchen-duke/ProtoPNet way: ``x²`` convolved with an all-ones (P, C, 1, 1)
                tensor, ``conv2d(x, p)``, a (B, P, H, W) distance map, ``-max_pool2d(-d)``, dense masks
                (:mod:`protofast.reference.protopnet_original`)
``compile``     ``torch.compile`` of ``original`` (batch dimension marked dynamic: compiled once)
``cdist``       ``torch.cdist(x_patches, p) ** 2`` then ``amin`` over patches, same losses
``protofast``   ``protofast.prototype_min_distances`` → ``log_similarity`` → ``cluster_separation_costs``,
                ``masked_l1``
``gemm``        the GEMM floor: one ``[B·H·W, D] @ [D, M]`` matmul (``torch.mm``), nothing else; the same
                measurement is reported for both modes
==============  =====================================================================================

Every provider except ``gemm`` returns the scalar
``loss = CE(logits) + 0.8·clst − 0.08·sep + 1e-4·l1`` and the suite asserts that they agree to fp32
tolerance. Two modes: ``fwd`` computes the loss with autograd enabled (as in training), ``fwd+bwd`` also runs
``loss.backward()`` into x, the prototypes and the last layer.

Inputs (ProtoPNet defaults): x (B, 128, 7, 7) in (0, 1) like the sigmoid add-on, prototypes (2000, 128, 1, 1)
U[0, 1), K = 200 classes with 10 contiguous prototypes each, random labels, last layer (200, 2000) initialised
1 / −0.5. x, prototypes and the last layer require grad.

Timing: every provider is warmed up (protofast may build its C++ kernel, torch.compile compiles), then
``repeats`` rounds run, each round running every (provider, mode) once in a rotated order, so that all
providers see the same machine state; the median is reported with ratios. Peak memory is measured in a
separate run under ``torch.profiler`` (``profile_memory=True``): the maximum of the allocator's
"Total Allocated" above its value before the run, in MB (10⁶ bytes).

Nothing here runs at import time; torch is imported lazily by the functions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

PROVIDERS = ("original", "compile", "cdist", "protofast", "gemm")
QUICK_PROVIDERS = ("original", "cdist", "protofast", "gemm")
MODES = ("fwd", "fwd+bwd")
# What the providers compute (both start from x and the prototypes and share the original's coefficients):
#   head: the prototype head of the issue, distances -> min -> log-similarity -> cluster/separation, as the
#         scalar mean(similarity) + 0.8·clst − 0.08·sep (the similarity feeds the backward with 1/(B·M));
#   step: the full training loss, CE(similarity @ Wcᵀ) + 0.8·clst − 0.08·sep + 1e-4·l1 (last layer included).
LOSSES = {"head": "mean(log-sim) + 0.8·clst − 0.08·sep", "step": "CE(logits) + 0.8·clst − 0.08·sep + 1e-4·l1"}
QUICK_BATCHES = (80, 200)
FULL_BATCHES = (40, 80, 160, 200)
MALLOC_ENV_VARS = ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

# ProtoPNet defaults (SEMANTICS.md §1.1)
NUM_PROTOTYPES = 2000
CHANNELS = 128
HEIGHT = WIDTH = 7
NUM_CLASSES = 200
EPSILON = 1e-4
COEFS = {"crs_ent": 1.0, "clst": 0.8, "sep": -0.08, "l1": 1e-4}

# Acceptance targets (fwd+bwd): protofast ≤ 1.3× the GEMM floor and ≥ 7× faster than original at B = 80,
# ≥ 10× faster at B = 200; peak memory ≤ 1/10 of original's.
TARGET_GEMM_RATIO_B80 = 1.3
TARGET_SPEEDUP_B80 = 7.0
TARGET_SPEEDUP_B200 = 10.0
TARGET_MEMORY_FRACTION = 0.1

# fp32 agreement of the loss values (rtol on a loss of O(10), atol for the rounding of the distance sums)
LOSS_RTOL = 1e-4
LOSS_ATOL = 1e-3


class ProviderMismatch(AssertionError):
    """Two providers computed different loss values for the same inputs."""


class ProviderUnavailable(RuntimeError):
    """A provider cannot run here (e.g. protofast's ops are missing)."""


# --------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class HeadInputs:
    """The tensors of one benchmark case (CPU, float32)."""

    x: "torch.Tensor"                 # (B, C, H, W), requires grad
    prototypes: "torch.Tensor"        # (M, C, 1, 1), requires grad
    last_layer: "torch.Tensor"        # (K, M), requires grad
    labels: "torch.Tensor"            # (B,) int64
    identity: "torch.Tensor"          # (M, K) 0/1 float
    ones: "torch.Tensor"              # (M, C, 1, 1), the original's all-ones tensor (no grad)
    x2d: "torch.Tensor"               # (B·H·W, C) contiguous patch matrix, for the GEMM floor
    p2d: "torch.Tensor"               # (M, C) contiguous prototype matrix, for the GEMM floor
    max_dist: float                   # C·h·w
    gemm_out: "torch.Tensor" = None   # (B·H·W, M) preallocated output of the ``gemm_out`` variant
    loss: str = "head"                # "head" or "step" (see LOSSES)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def zero_grad(self) -> None:
        """``set_to_none`` for every leaf, as ``optimizer.zero_grad()`` does."""
        self.x.grad = None
        self.prototypes.grad = None
        self.last_layer.grad = None


def make_inputs(batch: int, *, num_prototypes: int = NUM_PROTOTYPES, channels: int = CHANNELS,
                height: int = HEIGHT, width: int = WIDTH, num_classes: int = NUM_CLASSES,
                seed: int = 0, loss: str = "head") -> HeadInputs:
    """Synthetic ProtoPNet-head inputs (see the module docstring), deterministic in ``seed`` and ``batch``."""
    import torch

    from .reference import protopnet_original as orig

    g = torch.Generator().manual_seed(seed * 100_003 + batch)
    # sigmoid outputs lie in the open interval (0, 1)
    x = torch.rand(batch, channels, height, width, generator=g).clamp_(1e-6, 1 - 1e-6).requires_grad_()
    prototypes = torch.rand(num_prototypes, channels, 1, 1, generator=g).requires_grad_()
    identity = orig.prototype_class_identity(num_prototypes, num_classes)
    last_layer = orig.last_layer_incorrect_connection(identity, -0.5).contiguous().requires_grad_()
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    ones = torch.ones(num_prototypes, channels, 1, 1)
    x2d = x.detach().permute(0, 2, 3, 1).reshape(-1, channels).contiguous()
    p2d = prototypes.detach().reshape(num_prototypes, channels).contiguous()
    gemm_out = torch.empty(x2d.shape[0], num_prototypes)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    return HeadInputs(x, prototypes, last_layer, labels, identity, ones, x2d, p2d, float(channels), gemm_out, loss)


# ------------------------------------------------------------------------------------------ providers


def _assemble(kind, similarity, cluster, separation, labels, last_layer, l1_fn):
    """The scalar a provider returns, from the head's outputs (see LOSSES)."""
    import torch.nn.functional as F

    head = COEFS["clst"] * cluster + COEFS["sep"] * separation
    if kind == "head":
        return similarity.mean() + head
    logits = F.linear(similarity, last_layer)
    return COEFS["crs_ent"] * F.cross_entropy(logits, labels) + head + COEFS["l1"] * l1_fn()


def _loss_from_min_distances(min_distances, labels, identity, last_layer, max_dist, kind):
    """The original's log-similarity and dense-mask loss terms from (B, M) min distances."""
    from .reference import protopnet_original as orig

    similarity = orig.distance_2_similarity(min_distances, "log", EPSILON)
    cluster, separation, _ = orig.cluster_separation_costs(min_distances, labels, identity, max_dist)
    return _assemble(kind, similarity, cluster, separation, labels, last_layer,
                     lambda: orig.l1_masked(last_layer, identity))


def original_loss(x, prototypes, ones, last_layer, labels, identity, max_dist, kind="head"):
    """The original way, end to end: ones-conv, max_pool2d min, dense masks. Returns the scalar loss."""
    from .reference import protopnet_original as orig

    mind = orig.min_distances(orig._l2_convolution(x, prototypes, ones))
    return _loss_from_min_distances(mind, labels, identity, last_layer, max_dist, kind)


def head_original(inp: HeadInputs):
    """Provider ``original``."""
    return original_loss(inp.x, inp.prototypes, inp.ones, inp.last_layer, inp.labels, inp.identity,
                         inp.max_dist, inp.loss)


_COMPILED = {}


def compiled_original_loss():
    """``torch.compile(original_loss)``, built once per process (inductor, default mode)."""
    if "fn" not in _COMPILED:
        import torch

        _COMPILED["fn"] = torch.compile(original_loss)
    return _COMPILED["fn"]


def head_compile(inp: HeadInputs):
    """Provider ``compile``: the batch dimension is marked dynamic, so one compilation serves every B."""
    import torch

    torch._dynamo.maybe_mark_dynamic(inp.x, 0)
    torch._dynamo.maybe_mark_dynamic(inp.labels, 0)
    return compiled_original_loss()(inp.x, inp.prototypes, inp.ones, inp.last_layer, inp.labels, inp.identity,
                                    inp.max_dist, inp.loss)


def head_cdist(inp: HeadInputs):
    """Provider ``cdist``: ``cdist(x_patches, p)²`` (B, H·W, M), ``amin`` over patches, same losses."""
    import torch

    B, C = inp.x.shape[:2]
    M = inp.prototypes.shape[0]
    patches = inp.x.flatten(2).transpose(1, 2)                        # (B, H·W, C)
    d = torch.cdist(patches, inp.prototypes.view(M, C)) ** 2          # (B, H·W, M)
    mind = d.amin(dim=1)                                              # (B, M)
    return _loss_from_min_distances(mind, inp.labels, inp.identity, inp.last_layer, inp.max_dist, inp.loss)


def _protofast_ops():
    import protofast

    missing = [name for name in ("prototype_min_distances", "log_similarity", "cluster_separation_costs",
                                 "masked_l1") if not hasattr(protofast, name)]
    if missing:
        raise ProviderUnavailable(f"protofast does not export {', '.join(missing)}")
    return protofast


def head_protofast(inp: HeadInputs):
    """Provider ``protofast``: the fused min-distance op, then protofast's loss ops."""
    pf = _protofast_ops()
    mind, _ = pf.prototype_min_distances(inp.x, inp.prototypes)
    similarity = pf.log_similarity(mind, eps=EPSILON)
    cluster, separation, _ = pf.cluster_separation_costs(mind, inp.labels, inp.identity, inp.max_dist)
    return _assemble(inp.loss, similarity, cluster, separation, inp.labels, inp.last_layer,
                     lambda: pf.masked_l1(inp.last_layer, inp.identity))


def gemm_floor(inp: HeadInputs):
    """Provider ``gemm``: ``torch.mm(X2d, P2d.t())`` with X2d (B·H·W, C) and P2d (M, C), nothing else."""
    import torch

    return torch.mm(inp.x2d, inp.p2d.t())


def gemm_floor_preallocated(inp: HeadInputs):
    """``torch.mm(X2d, P2d.t(), out=...)`` into a preallocated output: the GEMM without the allocation and
    first-touch page faults of its (B·H·W, M) result (recorded in the JSON next to the ``gemm`` rows)."""
    import torch

    return torch.mm(inp.x2d, inp.p2d.t(), out=inp.gemm_out)


HEADS: Dict[str, Callable] = {
    "original": head_original,
    "compile": head_compile,
    "cdist": head_cdist,
    "protofast": head_protofast,
    "gemm": gemm_floor,
    "gemm_out": gemm_floor_preallocated,
}


def get_provider(name: str) -> Callable:
    """The head function of a provider: ``fn(HeadInputs) -> loss`` (``gemm``: the matmul output)."""
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}") from None


def step(provider: str, inp: HeadInputs, mode: str):
    """Run one measurement's work: the head, and ``backward()`` in ``fwd+bwd`` mode (not for ``gemm``)."""
    out = HEADS[provider](inp)
    if mode == "fwd+bwd" and not provider.startswith("gemm"):
        out.backward()
    elif mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return out


def time_step(provider: str, inp: HeadInputs, mode: str) -> float:
    """Wall time of one :func:`step` in seconds; gradients are reset (to None) before the clock starts and the
    result (with its autograd graph) is released after it stops."""
    inp.zero_grad()
    t0 = time.perf_counter()
    out = step(provider, inp, mode)
    t1 = time.perf_counter()
    del out
    return t1 - t0


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging) inside the block; Python exceptions are unaffected."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CPU memory allocated by ``fn()`` above what was allocated before it, in MB (10⁶ bytes).

    torch has no CPU ``max_memory_allocated``, but the profiler records every allocation: the events named
    ``[memory]`` carry ``Total Allocated`` (after the event) and ``Bytes`` (signed). The baseline is the first
    event's ``Total Allocated − Bytes``.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():                 # kineto prints "USDT: ... profiler_start/stop" lines to fd 2
        prof.start()
    try:
        out = fn()
        del out
    finally:
        with _quiet_stderr():
            prof.stop()
    fd, path = tempfile.mkstemp(prefix="protofast-bench-", suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f).get("traceEvents", []) if e.get("name") == "[memory]"]
    finally:
        os.unlink(path)
    if not events:
        return 0.0
    first = events[0]["args"]
    baseline = first["Total Allocated"] - first["Bytes"]
    peak = max(e["args"]["Total Allocated"] for e in events)
    return max(0.0, (peak - baseline) / 1e6)


def step_peak_memory_mb(provider: str, inp: HeadInputs, mode: str) -> float:
    """:func:`peak_memory_mb` of one :func:`step` (gradients reset to None first)."""
    inp.zero_grad()
    mb = peak_memory_mb(lambda: step(provider, inp, mode))
    inp.zero_grad()
    return mb


def losses_agree(a: float, b: float) -> bool:
    return abs(a - b) <= LOSS_ATOL + LOSS_RTOL * abs(b)


# -------------------------------------------------------------------------------------------- the run


def environment() -> dict:
    """Machine, versions, threads and the glibc malloc settings (they change eager timings, DESIGN §6)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "libc": " ".join(platform.libc_ver()).strip(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "malloc_env": {name: os.environ.get(name) for name in MALLOC_ENV_VARS},
        "protofast_backend_env": os.environ.get("PROTOFAST_BACKEND"),
    }
    try:
        from ._version import __version__

        env["protofast"] = __version__
    except Exception:  # pragma: no cover - partial checkouts
        env["protofast"] = None
    return env


def protofast_info() -> Optional[dict]:
    try:
        import protofast

        info = getattr(protofast, "info", None)
        return info() if info is not None else None
    except Exception as exc:  # a report, not a test: keep going
        return {"error": f"{type(exc).__name__}: {exc}"}


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_suite(batches: Sequence[int] = QUICK_BATCHES, providers: Sequence[str] = QUICK_PROVIDERS,
              repeats: int = 10, seed: int = 0, progress: bool = True, measure_memory: bool = True,
              log: Callable[[str], None] = None, loss: str = "head") -> dict:
    """Warm up, time (interleaved rounds) and measure peak memory of every (B, mode, provider).

    Returns a JSON-serialisable dict: ``environment``, ``config``, ``results`` (one row per (B, mode, provider)
    with ``median_ms``, ``q1_ms``, ``q3_ms``, ``times_ms``, ``x_original``, ``x_gemm``, ``peak_mb``, ``loss``),
    ``unavailable`` (provider -> reason) and ``checks``.

    Raises:
        ProviderMismatch: when a provider's loss differs from ``original``'s beyond fp32 tolerance.
    """
    from tqdm.auto import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    for p in providers:
        get_provider(p)                                  # validates the name
    providers = list(dict.fromkeys(providers))
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    if "original" not in providers:
        providers = ["original"] + providers          # the reference of the ratios and of the loss check
    timed = [p for p in providers if p != "gemm"]
    items = [(p, m) for p in timed for m in MODES] + ([("gemm", "fwd")] if "gemm" in providers else [])
    extra = [("gemm_out", "fwd")] if "gemm" in providers else []   # timed, not tabulated
    per_batch = 2 * len(providers) + repeats * (len(items) + len(extra)) \
        + (len(items) if measure_memory else 0)

    started = time.time()
    load_before = _loadavg()
    unavailable: Dict[str, str] = {}
    rows: List[dict] = []
    bar = tqdm(total=per_batch * len(batches), desc="protofast bench", unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for batch in batches:
            inp = make_inputs(batch, seed=seed, loss=loss)
            losses: Dict[str, float] = {}
            # warm-up: builds/compiles, and the loss-agreement check
            for p in providers:
                done = 0
                if p not in unavailable:
                    bar.set_postfix_str(f"B={batch} warm-up {p}")
                    try:
                        for mode in ("fwd+bwd", "fwd"):
                            inp.zero_grad()
                            out = step(p, inp, mode)
                            if p != "gemm":
                                losses[p] = float(out.detach())
                            del out
                            done += 1
                            bar.update(1)
                    except Exception as exc:
                        if p == "original":
                            raise
                        unavailable[p] = f"{type(exc).__name__}: {exc}"
                        losses.pop(p, None)
                        log(f"provider {p!r} unavailable, skipped: {unavailable[p]}")
                bar.update(2 - done)
            for p, value in losses.items():
                if not losses_agree(value, losses["original"]):
                    raise ProviderMismatch(
                        f"B={batch}: provider {p!r} loss {value!r} differs from original's {losses['original']!r} "
                        f"(rtol {LOSS_RTOL}, atol {LOSS_ATOL})")

            active = [(p, m) for p, m in items if p not in unavailable]
            if ("gemm", "fwd") in active:
                step("gemm_out", inp, "fwd")
                active += extra
            times: Dict[tuple, List[float]] = {key: [] for key in active}
            for r in range(repeats):
                bar.set_postfix_str(f"B={batch} round {r + 1}/{repeats}")
                shift = r % len(active)
                for key in active[shift:] + active[:shift]:
                    times[key].append(time_step(key[0], inp, key[1]))
                    bar.update(1)
            if len(active) < len(items) + len(extra):
                bar.update(repeats * (len(items) + len(extra) - len(active)))

            peaks: Dict[tuple, Optional[float]] = {key: None for key in active}
            if measure_memory:
                for key in active:
                    if key in extra:
                        continue
                    bar.set_postfix_str(f"B={batch} memory {key[0]} {key[1]}")
                    peaks[key] = step_peak_memory_mb(key[0], inp, key[1])
                    bar.update(1)
                bar.update(len(items) - len([k for k in active if k not in extra]))

            # The GEMM floor is the faster of the two ways of running the one matmul: into a fresh output (which
            # page-faults its B·H·W×M result on every call, 31 MB at B=80, and swings with the allocator's
            # state) or into a preallocated one. Ratios against the faster are the stricter comparison.
            gemm_runs = [_median(times[k]) * 1e3 for k in (("gemm", "fwd"), ("gemm_out", "fwd")) if k in times]
            gemm_ms = min(gemm_runs) if gemm_runs else None
            for mode in MODES:
                orig_ms = _median(times[("original", mode)]) * 1e3
                for p in providers:
                    key = (p, "fwd" if p == "gemm" else mode)
                    if key not in times:
                        continue
                    ts = [t * 1e3 for t in times[key]]
                    ms = _median(ts)
                    rows.append({
                        "batch": batch,
                        "mode": mode,
                        "provider": p,
                        "median_ms": ms,
                        "q1_ms": _quantile(ts, 0.25),
                        "q3_ms": _quantile(ts, 0.75),
                        "min_ms": min(ts),
                        "times_ms": ts,
                        "x_original": orig_ms / ms,
                        "x_gemm": ms / gemm_ms if gemm_ms else None,
                        "peak_mb": peaks[key],
                        "loss": losses.get(p),
                    })
                    if p == "gemm" and ("gemm_out", "fwd") in times:
                        rows[-1]["gemm_preallocated_ms"] = _median(times[("gemm_out", "fwd")]) * 1e3
            del inp
    finally:
        bar.close()

    result = {
        "benchmark": "protopnet_head",
        "environment": environment(),
        "protofast_info": protofast_info() if "protofast" not in unavailable else None,
        "config": {
            "batches": list(batches), "providers": list(providers), "modes": list(MODES), "repeats": repeats,
            "seed": seed, "loss": loss, "loss_formula": LOSSES[loss], "num_prototypes": NUM_PROTOTYPES, "channels": CHANNELS, "height": HEIGHT,
            "width": WIDTH, "num_classes": NUM_CLASSES, "dtype": "float32", "loss_coefs": COEFS,
            "loss_rtol": LOSS_RTOL, "loss_atol": LOSS_ATOL,
        },
        "unavailable": unavailable,
        "results": rows,
        "wall_s": time.time() - started,
    }
    result["environment"]["loadavg_1min_before"] = load_before
    result["environment"]["loadavg_1min_after"] = _loadavg()
    result["checks"] = acceptance_checks(rows)
    return result


# ----------------------------------------------------------------------------------- report helpers


def _row(rows, batch, mode, provider):
    for r in rows:
        if r["batch"] == batch and r["mode"] == mode and r["provider"] == provider:
            return r
    return None


def acceptance_checks(rows: List[dict]) -> List[dict]:
    """The three acceptance checks, each ``{"name", "status": PASS|FAIL|SKIP, "detail", "values"}``."""
    checks = []
    pf80 = _row(rows, 80, "fwd+bwd", "protofast")
    if pf80 and pf80["x_gemm"] is not None:
        ok = pf80["x_gemm"] <= TARGET_GEMM_RATIO_B80 and pf80["x_original"] >= TARGET_SPEEDUP_B80
        checks.append({
            "name": "B=80 fwd+bwd: protofast ≤ 1.3× GEMM floor and ≥ 7× faster than original",
            "status": "PASS" if ok else "FAIL",
            "detail": f"{pf80['x_gemm']:.2f}× GEMM floor (target ≤ {TARGET_GEMM_RATIO_B80}), "
                      f"{pf80['x_original']:.1f}× faster than original (target ≥ {TARGET_SPEEDUP_B80:g})",
            "values": {"x_gemm": pf80["x_gemm"], "x_original": pf80["x_original"]},
        })
    else:
        checks.append({"name": "B=80 fwd+bwd: protofast ≤ 1.3× GEMM floor and ≥ 7× faster than original",
                       "status": "SKIP", "detail": "B=80 protofast/gemm not measured", "values": {}})
    pf200 = _row(rows, 200, "fwd+bwd", "protofast")
    if pf200:
        ok = pf200["x_original"] >= TARGET_SPEEDUP_B200
        checks.append({
            "name": "B=200 fwd+bwd: protofast ≥ 10× faster than original",
            "status": "PASS" if ok else "FAIL",
            "detail": f"{pf200['x_original']:.1f}× faster than original (target ≥ {TARGET_SPEEDUP_B200:g})",
            "values": {"x_original": pf200["x_original"]},
        })
    else:
        checks.append({"name": "B=200 fwd+bwd: protofast ≥ 10× faster than original", "status": "SKIP",
                       "detail": "B=200 protofast not measured", "values": {}})
    fractions = []
    for r in rows:
        if r["provider"] == "protofast" and r["peak_mb"] is not None:
            o = _row(rows, r["batch"], r["mode"], "original")
            if o and o["peak_mb"]:
                fractions.append((r["peak_mb"] / o["peak_mb"], r["batch"], r["mode"], r["peak_mb"], o["peak_mb"]))
    if fractions:
        worst = max(fractions)
        ok = worst[0] <= TARGET_MEMORY_FRACTION
        checks.append({
            "name": "peak memory: protofast ≤ 1/10 of original (every B and mode)",
            "status": "PASS" if ok else "FAIL",
            "detail": f"worst B={worst[1]} {worst[2]}: {worst[3]:.1f} MB vs {worst[4]:.1f} MB = 1/{1 / worst[0]:.1f}"
                      if worst[0] > 0 else "protofast allocated nothing measurable",
            "values": {"worst_fraction": worst[0], "batch": worst[1], "mode": worst[2]},
        })
    else:
        checks.append({"name": "peak memory: protofast ≤ 1/10 of original (every B and mode)", "status": "SKIP",
                       "detail": "peak memory not measured", "values": {}})
    return checks


def _symbol(text: str, fallback: str, stream=None) -> str:
    enc = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    try:
        text.encode(enc)
        return text
    except (UnicodeEncodeError, LookupError):
        return fallback


def format_table(result: dict, stream=None) -> str:
    """The results as a fixed-width table: B, mode, provider, ms, ×original, ×gemm, peak MB."""
    x = _symbol("×", "x", stream)
    header = ("B", "mode", "provider", "ms", f"{x}original", f"{x}gemm", "peak MB")
    lines = []
    prev = None
    for r in result["results"]:
        group = (r["batch"], r["mode"])
        cells = (
            str(r["batch"]) if group != prev else "",
            r["mode"] if group != prev else "",
            r["provider"],
            f"{r['median_ms']:.1f}",
            f"{r['x_original']:.2f}",
            f"{r['x_gemm']:.2f}" if r["x_gemm"] is not None else "-",
            f"{r['peak_mb']:.1f}" if r["peak_mb"] is not None else "-",
        )
        if group != prev and prev is not None:
            lines.append(None)
        lines.append(cells)
        prev = group
    widths = [max([len(header[i])] + [len(c[i]) for c in lines if c]) for i in range(len(header))]
    align = ("r", "l", "l", "r", "r", "r", "r")

    def fmt(cells):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    out = [fmt(header), fmt(tuple("-" * w for w in widths))]
    out += [fmt(c) if c else "" for c in lines]
    return "\n".join(out)


def format_markdown_table(result: dict) -> str:
    """The results as a Markdown table (for docs/benchmarks.md)."""
    out = ["| B | mode | provider | ms | ×original | ×gemm | peak MB |", "|---:|---|---|---:|---:|---:|---:|"]
    for r in result["results"]:
        out.append(f"| {r['batch']} | {r['mode']} | {r['provider']} | {r['median_ms']:.1f} | {r['x_original']:.2f} | "
                   + (f"{r['x_gemm']:.2f}" if r["x_gemm"] is not None else "-") + " | "
                   + (f"{r['peak_mb']:.1f}" if r["peak_mb"] is not None else "-") + " |")
    return "\n".join(out)


def format_report(result: dict, stream=None) -> str:
    """Header (machine, threads, malloc settings), the table, and the acceptance checks."""
    env = result["environment"]
    info = result.get("protofast_info") or {}
    backend = None
    if isinstance(info, dict):
        backend = info.get("cpu_backend") or info.get("backend") or info.get("backends")
    malloc = ", ".join(f"{k}={v if v is not None else 'unset'}" for k, v in env["malloc_env"].items())
    cfg = result["config"]
    lines = [
        f"protofast {env.get('protofast')} bench: ProtoPNet {cfg.get('loss', 'head')} "
        f"({LOSSES[cfg.get('loss', 'head')]}), M={cfg['num_prototypes']}, "
        f"D={cfg['channels']}, {cfg['height']}x{cfg['width']}, K={cfg['num_classes']}, fp32, "
        f"median of {cfg['repeats']} interleaved rounds",
        f"torch {env['torch']}, {env['cpu']} ({env['cpu_count']} cores), "
        f"torch.get_num_threads()={env['torch_num_threads']}",
        f"malloc: {malloc}",
        f"protofast backend: {backend if backend is not None else env.get('protofast_backend_env') or 'default'}"
        + (f" (PROTOFAST_BACKEND={env['protofast_backend_env']})" if env.get("protofast_backend_env") else ""),
        "",
        format_table(result, stream),
        "",
    ]
    x = _symbol("×", "x", stream)
    lines.append(f"{x}original = original ms / provider ms (bigger is faster); {x}gemm = provider ms / GEMM-floor ms "
                 "(the faster of the gemm row and the same matmul into a preallocated output, below); "
                 "peak MB = peak allocated above the inputs (10^6 bytes)")
    prealloc = [(r["batch"], r["gemm_preallocated_ms"]) for r in result["results"]
                if r["provider"] == "gemm" and r["mode"] == "fwd" and r.get("gemm_preallocated_ms") is not None]
    if prealloc:
        lines.append("GEMM floor into a preallocated output (no allocation or page faults of the result): "
                     + ", ".join(f"B={b} {ms:.1f} ms" for b, ms in prealloc))
    for p, reason in result.get("unavailable", {}).items():
        lines.append(f"unavailable: {p}: {reason}")
    busy = env.get("loadavg_1min_before")
    if busy is not None and env.get("cpu_count") and busy > 0.25 * env["cpu_count"]:
        lines.append(f"note: the 1-minute load average was {busy:.2f} before the run: other processes were using "
                     "the CPU, so timings may be inflated and noisy")
    lines.append("")
    lines.append("acceptance checks:")
    for i, c in enumerate(result["checks"], 1):
        name = c["name"] if x == "×" else c["name"].replace("×", "x").replace("≤", "<=").replace("≥", ">=")
        detail = c["detail"] if x == "×" else c["detail"].replace("×", "x").replace("≤", "<=").replace("≥", ">=")
        lines.append(f"  {i}. [{c['status']}] {name}: {detail}")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

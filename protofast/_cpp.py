"""Just-in-time build and loading of the C++ CPU kernels (the ``_SOURCES`` files in ``csrc/``).

``load_library()`` builds the extension on its first call (never at import), loads it with
``torch.ops.load_library`` and returns whether ``torch.ops.protofast_cpu.min_distances_forward`` is usable. The
result, success or failure, is cached for the process: a failed build is not retried.

Build cache: ``$PROTOFAST_CACHE_DIR`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/protofast``, in a sub-directory
named from the protofast, torch and python versions and a short sha256 of the sources, the compile flags and
this CPU's model and flags (the library is built with ``-march=native`` and must not be reused on
another CPU). A finished build leaves a ``BUILD_OK`` marker naming the library; later processes then load it
directly, without compiler or ninja.

Concurrency: builds run under an flock (``filelock``) on ``<cache dir>/.protofast-build.lock``, waited for at most
``$PROTOFAST_BUILD_TIMEOUT`` seconds (default 600). The OS releases it when its holder dies, so a killed build
never blocks the next one; torch's own ``lock`` file, which a killed build leaves behind (and which would make
the next build wait forever), is removed while the flock is held.

Without a C++ compiler or ninja, on a lock timeout or a failed build, ``load_library()`` warns once
(RuntimeWarning) and returns False; the caller then uses the torch fallback.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

__all__ = ["load_library", "build_info"]

_EXTENSION_NAME = "protofast_cpu_kernels"
_SOURCES = ("prototype_distances.cpp", "losses.cpp", "pipnet.cpp", "nmf.cpp")
# -march=native: the vectorised microkernel becomes AVX-512 where the CPU has it (about 3x, DESIGN.md §6).
# -fopenmp: without it at::parallel_for silently runs on one thread.
_EXTRA_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-DNDEBUG")
_EXTRA_LDFLAGS = ("-fopenmp",)
_MARKER = "BUILD_OK"
_LOCK_NAME = ".protofast-build.lock"
_COMPILE_MESSAGE = "protofast: compiling the C++ CPU kernels (first use only, about 10 s)..."

_lock = threading.Lock()
_state: dict = {"available": None, "error": None, "library_path": None, "build_seconds": None}


class _Unavailable(Exception):
    """The extension cannot be built or loaded here; the message says why."""


def _sources_dir() -> Path | None:
    """``protofast/csrc`` when installed (setup.py maps csrc/ there), else the checkout's top-level ``csrc/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES):
            return candidate
    return None


def _cpu_signature() -> str:
    """Model name and feature flags of this CPU (a -march=native binary must not move to another CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        import platform

        return f"{platform.machine()}|{platform.processor()}"
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU implementer", "CPU part", "isa"):
            fields[key] = value.strip()
    return "|".join(f"{k}={fields[k]}" for k in sorted(fields))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _cache_dir(sources: Path | None) -> Path:
    base = os.environ.get("PROTOFAST_CACHE_DIR")
    if base:
        root = Path(base).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "protofast"

    import torch

    try:
        from ._version import __version__ as version
    except ImportError:  # pragma: no cover - a broken install
        version = "unknown"

    digest = hashlib.sha256()
    if sources is not None:
        files = sorted({*(sources / name for name in _SOURCES), *sources.glob("*.h")})
        for path in files:
            digest.update(path.name.encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    digest.update(repr((_EXTRA_CFLAGS, _EXTRA_LDFLAGS)).encode())
    digest.update(_cpu_signature().encode())
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    name = f"{version}-torch{torch.__version__}-py{py}-{digest.hexdigest()[:12]}"
    return root / _safe(name)


def _load_built(cache_dir: Path) -> str | None:
    """Load a finished build (marker + library present): no compiler or ninja needed. None if there is none."""
    import torch

    marker = cache_dir / _MARKER
    try:
        lines = marker.read_text().splitlines()
    except OSError:
        return None
    library = cache_dir / (lines[0].strip() if lines else "")
    if not library.name or not library.is_file():
        return None
    torch.ops.load_library(str(library))
    return str(library)


def _build(sources: Path, cache_dir: Path) -> str:
    compiler = os.environ.get("CXX", "c++")
    # CXX may carry a launcher or options ("ccache g++"): the first word must be an executable.
    words = shlex.split(compiler) or [compiler]
    if shutil.which(words[0]) is None:
        raise _Unavailable(f"no C++ compiler found ({compiler!r} is not on PATH; set CXX)")

    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise _Unavailable("ninja is not installed (pip install ninja)")

    try:
        from filelock import FileLock, Timeout
    except ImportError as exc:  # pragma: no cover - filelock is a dependency of torch and of protofast
        raise _Unavailable(f"the filelock package is missing ({exc})") from exc

    try:
        timeout = float(os.environ.get("PROTOFAST_BUILD_TIMEOUT", "600"))
    except ValueError as exc:
        raise _Unavailable(
            f"PROTOFAST_BUILD_TIMEOUT must be a number of seconds, got {os.environ['PROTOFAST_BUILD_TIMEOUT']!r}"
        ) from exc
    lock_path = cache_dir / _LOCK_NAME
    try:
        with FileLock(str(lock_path), timeout=timeout):
            # Another process may have finished the build while we waited.
            try:
                built = _load_built(cache_dir)
            except (OSError, RuntimeError):
                built = None
            if built is not None:
                return built
            # A build killed half-way leaves torch's FileBaton 'lock' behind; the next build would wait on it
            # forever. We hold the flock, so no live build of ours owns it.
            stale = cache_dir / "lock"
            if stale.exists():
                stale.unlink(missing_ok=True)
            print(_COMPILE_MESSAGE, file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # compiler-version chatter from cpp_extension
                    library = cpp_extension.load(
                        name=_EXTENSION_NAME,
                        sources=[str(sources / name) for name in _SOURCES],
                        extra_cflags=list(_EXTRA_CFLAGS),
                        extra_ldflags=list(_EXTRA_LDFLAGS),
                        build_directory=str(cache_dir),
                        is_python_module=False,
                        verbose=False,
                    )
            except Exception as exc:
                detail = str(exc).strip()
                if len(detail) > 2000:
                    detail = "..." + detail[-2000:]
                raise _Unavailable(f"the build in {cache_dir} failed: {type(exc).__name__}: {detail}") from exc
            seconds = round(time.perf_counter() - start, 2)
            _state["build_seconds"] = seconds
            library = Path(library)
            # Marker: first line the library's file name (what _load_built reads), then the build time.
            tmp = cache_dir / f".{_MARKER}.{os.getpid()}"
            tmp.write_text(f"{library.name}\nbuild_seconds={seconds}\n")
            os.replace(tmp, cache_dir / _MARKER)
            return str(library)
    except Timeout as exc:
        raise _Unavailable(
            f"timed out after {timeout:g} s waiting for the build lock {lock_path} (another process is "
            "compiling; raise PROTOFAST_BUILD_TIMEOUT to wait longer)"
        ) from exc


def _op_registered() -> bool:
    import torch

    try:
        torch.ops.protofast_cpu.min_distances_forward  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _load() -> str | None:
    sources = _sources_dir()
    if sources is None:
        raise _Unavailable("the C++ sources (csrc/prototype_distances.cpp) are not installed with protofast")
    cache_dir = _cache_dir(sources)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Unavailable(f"cannot create the build cache {cache_dir}: {exc} (set PROTOFAST_CACHE_DIR)") from exc
    try:
        built = _load_built(cache_dir)  # fast path: no lock, compiler or ninja
    except (OSError, RuntimeError):
        built = None  # a damaged build: rebuild it under the lock
    if built is None:
        built = _build(sources, cache_dir)
    return built


def load_library() -> bool:
    """Build (first call only) and load the C++ CPU kernels; True when ``torch.ops.protofast_cpu`` is usable."""
    if _state["available"] is not None:
        return _state["available"]
    with _lock:
        if _state["available"] is not None:
            return _state["available"]
        if _op_registered():  # loaded by other means (e.g. an ahead-of-time build)
            _state["available"] = True
            return True
        try:
            path = _load()
            if not _op_registered():
                raise _Unavailable(f"{path} loaded but does not register torch.ops.protofast_cpu")
        except Exception as exc:  # _Unavailable, or an unexpected failure: never break the caller
            reason = str(exc) if isinstance(exc, _Unavailable) else f"{type(exc).__name__}: {exc}"
            _state.update(available=False, error=reason)
            warnings.warn(
                f"protofast: the C++ CPU kernels are unavailable, using the slower PyTorch fallback: {reason}",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        _state.update(available=True, error=None, library_path=path)
        return True


def build_info() -> dict:
    """State of the C++ extension, without triggering a build.

    ``available`` is None until ``load_library()`` has been called; ``cache_dir`` is where the build goes (or
    went); ``sources`` the directory of the C++ sources ("" when they are not installed).
    """
    sources = _sources_dir()
    try:
        cache_dir = str(_cache_dir(sources))
    except Exception as exc:  # pragma: no cover - e.g. an unreadable source file
        cache_dir = f"<unknown: {exc}>"
    return {
        "available": _state["available"],
        "error": _state["error"],
        "library_path": _state["library_path"],
        "build_seconds": _state["build_seconds"],
        "cache_dir": cache_dir,
        "sources": str(sources) if sources is not None else "",
    }

"""The C++ CPU backend: builds ``csrc/fsam_cpu.cpp`` on first use and drives its ops.

The extension is compiled by ``torch.utils.cpp_extension.load`` with ninja the first time a
CPU bucket needs it (never at import or test collection), into a cache directory that
survives between runs:

* ``build_directory()``: ``$FSAM_FUSED_BUILD_DIR/<tag>`` if that is set, else
  ``$TORCH_EXTENSIONS_DIR/fsam_fused/<tag>`` (torch's default root ``~/.cache/torch_extensions``),
  where the tag names the torch version, the Python version and the CPU capability, so builds
  for different setups never collide;
* ``MAX_JOBS`` defaults to at most 4 parallel compile jobs;
* ninja's own lock (``torch.utils.file_baton``) is left behind by an interrupted build and
  makes every later build wait forever. The build here first takes an ``fcntl`` lock, which
  the operating system releases when its holder dies, and while holding it removes any such
  leftover: no other live process can be building in that directory then.

When the build is impossible (no compiler, no ninja, a compile error) ``backend="auto"``
warns once and uses ``"foreach"``; ``backend="cpp"`` raises with the reason.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import threading
import warnings

import torch

from .reference import EPS, Bucket

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAME = "fsam_fused_cpu"
_lock = threading.Lock()
_status = None  # None: not tried yet; True: loaded; str: why it cannot be
_warned = False  # fallback_warning has been given


def _sources():
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "csrc"), os.path.join(os.path.dirname(here), "csrc")):
        path = os.path.join(root, "fsam_cpu.cpp")
        if os.path.exists(path):
            return [path]
    raise FileNotFoundError("csrc/fsam_cpu.cpp is missing from the installation")


def build_directory() -> str:
    """Where the extension is built and cached: ``<root>/<tag>``, the root being
    ``$FSAM_FUSED_BUILD_DIR`` or ``$TORCH_EXTENSIONS_DIR/fsam_fused`` (torch's default
    ``~/.cache/torch_extensions``). The tag names the torch version, the Python version and
    the CPU capability: torch's loader rebuilds when the sources or flags change, not when
    torch does, and a build for a newer CPU must not be reused on an older one."""
    root = os.environ.get("FSAM_FUSED_BUILD_DIR") or os.path.join(
        os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "torch_extensions"), "fsam_fused")
    cap = torch.backends.cpu.get_cpu_capability()
    tag = f"torch{torch.__version__}-py{platform.python_version()}-{cap}"
    tag = "".join(c if c.isalnum() or c in ".-_" else "_" for c in tag)
    return os.path.join(root, tag)


def _build():
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    words = shlex.split(cxx)  # CXX may carry a launcher or flags: "ccache g++"
    if not words or shutil.which(words[0]) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    directory = build_directory()
    os.makedirs(directory, exist_ok=True)
    env_jobs = os.environ.get("MAX_JOBS")
    if env_jobs is None:
        os.environ["MAX_JOBS"] = str(max(1, min(4, os.cpu_count() or 1)))
    try:
        with _BuildLock(directory):
            cpp_extension.load(name=_NAME, sources=_sources(), build_directory=directory,
                               extra_cflags=_cflags(), extra_ldflags=["-fopenmp"],
                               is_python_module=False, verbose=False)
    finally:
        if env_jobs is None:
            del os.environ["MAX_JOBS"]


def _cflags():
    # -fopenmp: torch's CPU build runs at::parallel_for through OpenMP, inline in the
    # headers; without the flag the pragma is ignored and every pass runs on one thread
    # (the module links the libgomp.so.1 torch has already loaded). -ffp-contract=off: no
    # fused multiply-add, so float32 results match the reference's separately rounded ops.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64") and \
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # at::vec's 256-bit implementation (the build tag names the capability, so a cache
        # shared with an older CPU is never reused). Without it Vectorized<float> is a plain
        # array loop and the bfloat16 conversions are scalar: the passes become compute bound.
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


class _BuildLock:
    """An exclusive ``fcntl`` lock on the build directory; clears ninja's stale baton."""

    def __init__(self, directory):
        self.directory = directory
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no stale-lock protection, the build still works
            return self
        self.fd = os.open(os.path.join(self.directory, ".fsam_fused.lock"),
                          os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        # We hold the only lock on this directory, so torch's baton file, if present, was
        # left by a build that died: without removing it, load() would wait for it forever.
        baton = os.path.join(self.directory, "lock")
        if os.path.exists(baton):
            os.remove(baton)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        return False


def load() -> str | None:
    """Build (or reuse the cached build of) the extension and register its ops once per
    process. Returns None when ``torch.ops.fsam_fused`` is ready, else the reason it is not."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                try:
                    _build()
                    _register_fakes()
                    _status = True
                except Exception as e:  # noqa: BLE001 - any failure means "no C++ backend"
                    _status = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    return None if _status is True else _status


def fallback_warning(reason: str) -> None:
    """The one warning ``backend="auto"`` gives when it cannot build the C++ backend."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fsam_fused: the C++ CPU backend is unavailable ({reason.splitlines()[0]}); "
                      "CPU parameters use backend='foreach' instead", RuntimeWarning,
                      stacklevel=6)  # the caller of first_step



def _register_fakes():
    """Shape-only implementations, so torch.compile and opcheck can trace the ops."""
    lib = "fsam_fused::"  # called once per process, by load()

    @torch.library.register_fake(lib + "norm_sq")
    def _(weights, grads, emas, adaptive, decay, gain, sigma, paper):
        return grads[0].new_empty(1, dtype=torch.float32)

    @torch.library.register_fake(lib + "perturb_")
    def _(weights, grads, emas, saved, sq, rho, adaptive, decay, gain, swap, sigma, eps, paper):
        return None

    @torch.library.register_fake(lib + "restore_")
    def _(weights, saved):
        return None


def supports(device: torch.device, dtype: torch.dtype, ema_dtype: torch.dtype) -> str | None:
    """None if the C++ kernels can run this bucket (the build aside), else why not."""
    if device.type != "cpu":
        return f"the C++ kernels take CPU tensors, got a {device.type} tensor"
    for what, dt in (("weights", dtype), ("EMA", ema_dtype)):
        if dt not in SUPPORTED_DTYPES:
            return (f"the C++ kernels support {', '.join(map(str, SUPPORTED_DTYPES))} "
                    f"{what}, not {dt}")
    return None


# Double-buffer a tensor only from this size on. Swapping storages costs two ``p.data``
# assignments (about 1.5 us together) whatever the size; the copy it saves costs about 0.4 ns
# an element here, so below a few thousand elements the copy is cheaper. Measured: 2,000
# tensors of 1 to 64 elements, all swapped, took 7-13% longer than all copied.
SWAP_MIN_NUMEL = 4096


def owns_storage(p: torch.Tensor) -> bool:
    """True if ``p`` is a plain tensor covering its whole storage from offset 0: swapping its
    storage cannot desynchronise a flat buffer it is a view of."""
    return (type(p) in (torch.Tensor, torch.nn.Parameter) and p.storage_offset() == 0
            and p.untyped_storage().nbytes() == p.numel() * p.element_size())


class _Static:
    """Per-plan arguments of the ops (the plan is rebuilt whenever any of them changes)."""

    __slots__ = ("emas", "adaptive", "decay", "gain", "rhos", "swap", "swapped", "copied")

    def __init__(self, b: Bucket):
        # Official order on first sight: m is zero, decay 0 and gain 1 make m_new = g.
        firsts = [f and not b.paper for f in b.first]
        self.emas = b.emas if b.emas is not None else []
        self.adaptive = [int(a) for a in b.adaptive]
        self.decay = [0.0 if f else b.lmbda for f in firsts]
        self.gain = [1.0 if f else 1.0 - b.lmbda for f in firsts]
        self.rhos = [float(r) for r in b.rhos]
        # Per parameter: double-buffer it, or save an exact copy in place.
        self.swap = [int(not b.fixed_addresses and p.numel() >= SWAP_MIN_NUMEL
                         and owns_storage(p)) for p in b.params]
        # (parameter, its own storage, the spare buffer) for the swapped ones, taken before
        # any perturbation; (parameters, saved copies) for the others.
        self.swapped = [(p, p.detach(), s) for p, s, w in zip(b.params, b.saved, self.swap)
                        if w]
        self.copied = ([p for p, w in zip(b.params, self.swap) if not w],
                       [s for s, w in zip(b.saved, self.swap) if not w])


class CppBackend:
    """Three op calls per bucket and step, each one parallel pass over the whole list.

    With ``fixed_addresses`` off (the default), a parameter that owns its storage and has at
    least ``SWAP_MIN_NUMEL`` elements is double-buffered: ``perturb_`` writes ``w + e`` into
    its spare buffer, which is swapped in with ``p.data``, and restoring swaps the untouched
    original back: 28 bytes per float32 parameter instead of 40, and bit-exact by
    construction. The others get an exact copy, which ``restore_`` copies back.
    """

    name = "cpp"

    @staticmethod
    def _static(b: Bucket) -> _Static:
        st = b.scratch_static.get("cpp")
        if st is None:
            st = b.scratch_static["cpp"] = _Static(b)
        return st

    def norm_partials(self, b: Bucket) -> torch.Tensor:
        st = self._static(b)
        return torch.ops.fsam_fused.norm_sq(b.params, b.grads, st.emas, st.adaptive, st.decay,
                                            st.gain, b.sigma, b.paper)

    def perturb(self, b: Bucket, sq: torch.Tensor) -> None:
        st = self._static(b)
        # One op for both kinds: it checks everything before it writes anything.
        torch.ops.fsam_fused.perturb_(b.params, b.grads, st.emas, b.saved, sq, st.rhos,
                                      st.adaptive, st.decay, st.gain, st.swap, b.sigma, EPS,
                                      b.paper)
        for p, _, spare in st.swapped:
            p.data = spare

    def restore(self, b: Bucket) -> None:
        st = self._static(b)
        for p, own, _ in st.swapped:
            p.data = own
        if st.copied[0]:
            torch.ops.fsam_fused.restore_(*st.copied)

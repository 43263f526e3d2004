"""Builds and verifies the C++ CPU backend (``csrc/fsam_cpu.cpp``); imports nothing of
``fsam_fused``, so it runs alone: ``python -m fsam_fused.ops`` builds ahead of time.

Nothing happens at import. :func:`ensure_built` returns the path of a verified build, building
it first if need be; :mod:`fsam_fused.ops.cpp` loads it once per process (the first time a
CPU bucket needs the ops, or when ``FSAM(..., backend="cpp")`` is constructed). A build that
must compile says so once on stderr, with the expected time (``BUILD_NOTICE``).

Cache layout, in ``build_directory()`` (``<root>/<tag>``, see there)::

    fsam_fused_cpu.so      the installed library, only ever replaced whole (os.replace)
    fsam_fused_cpu.json    its manifest: size and sha256 of the .so, and the fingerprint of
                           what it was built from (sha256 of the sources, compile and link
                           flags, torch and Python versions)
    .fsam_fused.lock       the build lock (fcntl), holding the PID of the process building
    .staging-XXXX/         a private directory per build, removed when the build ends

Verification: a cached ``.so`` is loaded only if its manifest is readable, its fingerprint
matches this installation and the file has the size and sha256 the manifest names. Anything
else (a truncated or garbage file, no manifest, changed sources) is never handed to the
dynamic loader: mapping a truncated ELF file kills the process with SIGBUS. Checking a good
build needs neither a compiler nor write access, so a complete cache works from a read-only
directory or without a compiler on PATH.

Building: under the lock, torch's ``cpp_extension.load`` compiles with ninja into the staging
directory, in a child process (``sys.executable``) with a time limit
(``FSAM_FUSED_BUILD_TIMEOUT``, default 900 s): that bounds a hung compiler, and the child,
not this process, loads the fresh build once (an op namespace can be registered only once
per process, and this process loads the installed copy). The finished ``.so`` is moved into
place with ``os.replace`` (atomic: a reader sees the old file or the new one, whole) and the
manifest is written after it, so a ``.so`` is never loaded while it is being written.
torch's own lock file (``lock``, its "baton") now lives in the staging directory; a build
that dies leaves it there, and the next build, holding the fcntl lock, removes leftover
staging directories (and a ``lock`` left in the cache directory by older versions).

The lock: the OS releases an fcntl lock when its holder dies, so a dead build never blocks
the next. A waiting process polls; after 3 s it warns once (``BuildLockWarning``) naming the
holder's PID and the lock file, and gives up after ``FSAM_FUSED_BUILD_WAIT`` seconds (default
300). When the holder finishes, the waiter verifies again and loads what it built.

Fallback: when no verified build can be had (no compiler, no ninja, a compile error, an
unwritable directory, the lock still held), ``ensure_built()`` raises with the reason and
``fsam_fused.ops.cpp.load()`` returns it; ``backend="auto"``
warns once (``fallback_warning``) and uses ``"foreach"``, ``backend="cpp"`` raises with it.
A damaged or stale cache that can be rebuilt is reported with a ``CachedBuildWarning``.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NAME = "fsam_fused_cpu"
_SO = _NAME + ".so"
_MANIFEST = _NAME + ".json"
_LOCK = ".fsam_fused.lock"
_STAGING = ".staging-"


class CachedBuildWarning(RuntimeWarning):
    """The cached build is damaged, stale or unverifiable and is being rebuilt."""


class BuildLockWarning(RuntimeWarning):
    """Another process holds the build lock; this one is waiting for it."""


def _sources():
    # This file is fsam_fused/ops/cpp_build.py: the sources are package data in
    # fsam_fused/csrc when installed, <checkout>/csrc in a source tree.
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.path.join(package, "csrc"), os.path.join(os.path.dirname(package), "csrc")):
        path = os.path.join(root, "fsam_cpu.cpp")
        if os.path.exists(path):
            return [path]
    raise FileNotFoundError("csrc/fsam_cpu.cpp is missing from the installation")


def build_directory() -> str:
    """Where the extension is built and cached: ``<root>/<tag>``, the root being
    ``$FSAM_FUSED_BUILD_DIR`` or ``$TORCH_EXTENSIONS_DIR/fsam_fused`` (torch's default
    ``~/.cache/torch_extensions``). The tag names the torch version, the Python version and
    the CPU capability: a build for a newer CPU must not be reused on an older one, and
    builds for different setups sharing a root never collide."""
    root = os.environ.get("FSAM_FUSED_BUILD_DIR") or os.path.join(
        os.environ.get("TORCH_EXTENSIONS_DIR")
        or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"),
        "fsam_fused",
    )
    cap = torch.backends.cpu.get_cpu_capability()
    tag = f"torch{torch.__version__}-py{platform.python_version()}-{cap}"
    tag = "".join(c if c.isalnum() or c in ".-_" else "_" for c in tag)
    return os.path.join(root, tag)


def _cflags():
    # -fopenmp: torch's CPU build runs at::parallel_for through OpenMP, inline in the
    # headers; without the flag the pragma is ignored and every pass runs on one thread
    # (the module links the libgomp.so.1 torch has already loaded). -ffp-contract=off: no
    # fused multiply-add, so float32 results match the reference's separately rounded ops.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    ):
        # at::vec's 256-bit implementation (the build tag names the capability, so a cache
        # shared with an older CPU is never reused). Without it Vectorized<float> is a plain
        # array loop and the bfloat16 conversions are scalar: the passes become compute bound.
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


_LDFLAGS = ["-fopenmp"]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint():
    """What a build depends on. Not the compiler's name: a complete build must stay usable
    with CXX unset or pointing nowhere."""
    return {
        "sources": {os.path.basename(s): _sha256(s) for s in _sources()},
        "cflags": _cflags(),
        "ldflags": _LDFLAGS,
        "torch": f"{torch.__version__} {torch.version.git_version}",
        "python": platform.python_version(),
    }


def _env_seconds(name, default):
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise RuntimeError(f"{name}={value!r} is not a number of seconds")
    return seconds


# ------------------------------------------------------------------ verification


def _check(directory):
    """("ok", None), ("missing", None) when nothing was ever built here, or ("bad", what is
    wrong). Reads only: it runs before any lock, in read-only directories too."""
    so, manifest = os.path.join(directory, _SO), os.path.join(directory, _MANIFEST)
    if not os.path.exists(so):
        if not os.path.exists(manifest):
            return "missing", None
        return "bad", f"cached build {so} is missing (its manifest is there)"
    try:
        with open(manifest, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        return "bad", (
            f"cached build {so} has no manifest {_MANIFEST} (an interrupted build, "
            "or one by an older fsam_fused)"
        )
    except (OSError, ValueError) as e:
        return "bad", f"the manifest of cached build {so} is unreadable ({e})"
    if not (
        isinstance(m, dict)
        and isinstance(m.get("size"), int)
        and isinstance(m.get("sha256"), str)
        and isinstance(m.get("fingerprint"), dict)
    ):
        return "bad", f"the manifest of cached build {so} is malformed"
    want = _fingerprint()
    changed = [k for k in want if m["fingerprint"].get(k) != want[k]]
    if changed:
        return "bad", f"cached build {so} is stale ({', '.join(changed)} changed)"
    size = os.stat(so).st_size
    if size != m["size"]:
        return "bad", f"cached build {so} is damaged ({size} bytes, expected {m['size']})"
    if _sha256(so) != m["sha256"]:
        return "bad", f"cached build {so} is damaged (its sha256 is not the manifest's)"
    return "ok", None


def _cannot_build():
    """Why a build cannot even start here, or None."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    words = shlex.split(cxx)  # CXX may carry a launcher or flags: "ccache g++"
    if not words or shutil.which(words[0]) is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def ensure_built() -> str:
    """The path of a verified build, building it first if need be; raises with the reason
    when there is none."""
    directory = build_directory()
    so = os.path.join(directory, _SO)
    state, problem = _check(directory)
    if state == "ok":
        return so  # no lock, no compiler, no write: a read-only cache works

    def cannot(why):
        return RuntimeError(why if problem is None else f"{problem} and cannot be rebuilt: {why}")

    why = _cannot_build()
    if why is not None:
        raise cannot(why)
    try:
        os.makedirs(directory, exist_ok=True)
        lock = _BuildLock(directory)
        lock.open()
    except OSError as e:
        raise cannot(f"the build directory {directory} is not writable ({e.strerror or e})") from e
    with lock:
        # Whoever held the lock before may have built it meanwhile; a problem seen before
        # the lock may also have been a build being installed (new .so, manifest not yet).
        state, problem = _check(directory)
        if state == "ok":
            return so
        if problem is not None:
            warnings.warn(f"fsam_fused: {problem}; rebuilding", CachedBuildWarning, stacklevel=2)
        _notice(directory)
        _build(directory)
        state, problem = _check(directory)
        if state != "ok":
            raise RuntimeError(f"the fresh build does not verify: {problem}")
    return so


# ------------------------------------------------------------------ building

# Said once, on stderr, before a compile: the first CPU step otherwise sits silent for a
# minute or more. stderr rather than a warning: a warning filter ("error", or pytest's
# recording) must not turn a build into a failure, and it is not a problem to act on.
BUILD_NOTICE = (
    "fsam_fused: compiling the C++ CPU backend (csrc/fsam_cpu.cpp) into {directory}; this "
    "takes about 1-3 minutes, once: later runs load the cached build. To build ahead of "
    "time: python -m fsam_fused.ops\n"
)
_noticed = False


def _notice(directory):
    global _noticed
    if not _noticed:
        _noticed = True
        sys.stderr.write(BUILD_NOTICE.format(directory=directory))
        sys.stderr.flush()


# Run by the child process: torch's loader compiles with ninja, then loads the result once
# (which also proves it loads before it is installed).
_CHILD = """
import json, sys
from torch.utils import cpp_extension
a = json.loads(sys.argv[1])
cpp_extension.load(name=a["name"], sources=a["sources"], build_directory=a["directory"],
                   extra_cflags=a["cflags"], extra_ldflags=a["ldflags"],
                   is_python_module=False, verbose=False)
"""


def _build_env():
    env = dict(os.environ)
    if "MAX_JOBS" not in env:  # ninja's default, cores + 2, swamps a shared machine
        env["MAX_JOBS"] = str(max(1, min(4, os.cpu_count() or 1)))
    return env


def _run(args, env, timeout):
    """Runs the child in its own process group, so a timeout kills ninja and the compilers
    with it. Returns (exit status, output)."""
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"the build did not finish within {timeout:g} s (FSAM_FUSED_BUILD_TIMEOUT); stopped it"
        ) from None
    finally:
        if proc.poll() is None:  # timed out or interrupted
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (AttributeError, OSError):
                proc.kill()
            proc.communicate()


def _build(directory):
    """Compile into a private staging directory, install the .so atomically, then write
    its manifest. Called with the build lock held."""
    # Holding the lock, no live process is building here: any staging directory (with the
    # baton torch leaves in it when a build dies) or old in-place baton is a leftover.
    for stale in glob.glob(os.path.join(directory, _STAGING + "*")):
        shutil.rmtree(stale, ignore_errors=True)
    baton = os.path.join(directory, "lock")
    if os.path.exists(baton):
        os.remove(baton)
    fingerprint = _fingerprint()
    staging = tempfile.mkdtemp(prefix=_STAGING, dir=directory)
    try:
        args = {
            "name": _NAME,
            "sources": _sources(),
            "directory": staging,
            "cflags": fingerprint["cflags"],
            "ldflags": fingerprint["ldflags"],
        }
        timeout = _env_seconds("FSAM_FUSED_BUILD_TIMEOUT", 900.0)
        rc, out = _run([sys.executable, "-c", _CHILD, json.dumps(args)], _build_env(), timeout)
        built = os.path.join(staging, _SO)
        if rc != 0 or not os.path.exists(built):
            tail = "\n".join(out.strip().splitlines()[-30:])
            raise RuntimeError(
                f"compiling {os.path.basename(args['sources'][0])} failed "
                f"(exit status {rc})\n{tail}"
            )
        manifest = {
            "format": 1,
            "so": _SO,
            "size": os.stat(built).st_size,
            "sha256": _sha256(built),
            "fingerprint": fingerprint,
        }
        tmp = os.path.join(staging, _MANIFEST)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        # The old manifest goes first: between the two replaces a reader sees "no manifest"
        # and queues for the lock rather than trusting a mismatched pair.
        try:
            os.remove(os.path.join(directory, _MANIFEST))
        except FileNotFoundError:
            pass
        os.replace(built, os.path.join(directory, _SO))
        os.replace(tmp, os.path.join(directory, _MANIFEST))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _BuildLock:
    """An exclusive ``fcntl`` lock on the build directory, with the holder's PID in it.

    Waits by polling, warns once after ``NOTICE_S`` and gives up (TimeoutError) after
    ``FSAM_FUSED_BUILD_WAIT`` seconds."""

    NOTICE_S = 3.0
    POLL_S = 0.1

    def __init__(self, directory):
        self.path = os.path.join(directory, _LOCK)
        self.fd = None

    def open(self):
        """Creates the lock file (OSError when the directory is not writable)."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        return self

    def _holder(self):
        try:
            pid = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            pid = ""
        return f"PID {pid}" if pid.isdigit() else "another process"

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock; the atomic install still protects readers
            return self
        if self.fd is None:
            self.open()
        wait = _env_seconds("FSAM_FUSED_BUILD_WAIT", 300.0)
        start, noticed = time.monotonic(), False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    self._close()
                    raise
            waited = time.monotonic() - start
            if waited >= wait:
                holder = self._holder()
                self._close()
                raise TimeoutError(
                    f"the build lock {self.path} is still held by {holder} "
                    f"after {waited:.0f} s (FSAM_FUSED_BUILD_WAIT={wait:g}); "
                    "not building"
                )
            if not noticed and waited >= self.NOTICE_S:
                noticed = True
                warnings.warn(
                    f"fsam_fused: waiting for the C++ build lock {self.path}, held "
                    f"by {self._holder()}; giving up after {wait:g} s "
                    "(FSAM_FUSED_BUILD_WAIT)",
                    BuildLockWarning,
                    stacklevel=3,
                )
            time.sleep(min(self.POLL_S, max(0.0, wait - waited)))
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def _close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __exit__(self, *exc):
        if self.fd is not None:
            try:
                import fcntl

                os.ftruncate(self.fd, 0)  # no stale PID for the next waiter to name
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except ImportError:
                pass
            self._close()
        return False


def main(argv=None) -> int:
    """``python -m fsam_fused.ops``: build (or verify) the extension now, so that no
    training run pays for the compile; prints the path of the verified build."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m fsam_fused.ops",
        description="Build (or verify) the fsam_fused C++ CPU backend ahead of time.",
    )
    ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        so = ensure_built()
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
        print(f"fsam_fused: the C++ CPU backend cannot be built: {e}", file=sys.stderr)
        return 1
    print(f"fsam_fused: C++ CPU backend ready: {so} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

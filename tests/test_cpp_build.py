"""The C++ backend's build on first use and its cache (``fsam_fused/ops/cpp_build.py``, loaded by ``fsam_fused/ops/cpp.py``).

Every scenario runs in a fresh process (the ops can be loaded once per process) on a fresh
cache directory. There are two real compilations: the ``built`` fixture, and the rebuild of
a garbage cache in (b); the other cache directories are copies of the fixture's build. The
reported failures each have a test:

(a) a truncated cached .so killed every later run with SIGBUS;
(b) an empty or garbage cached .so made "auto" fall back forever, never rebuilt;
(c) a live process holding the build lock made the first CPU step wait silently, forever;
(d) a complete cached build was not used from a read-only directory or without a compiler;
(e) the first build was silent (a minute or more inside the first step, unexplained) and could
    not be done ahead of time.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from fsam_fused.ops import cpp_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = os.path.basename(cpp_build.build_directory())
SO, MANIFEST, LOCK = "fsam_fused_cpu.so", "fsam_fused_cpu.json", ".fsam_fused.lock"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the build tests need Linux (fcntl, g++)"
)


def _python(code, env=None, timeout=300, **kw):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def _env(**kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CXX", None)
    env.update(kw)
    return env


# Takes auto's first steps, then tries backend="cpp" explicitly; prints what happened.
STEPS = """
import warnings, torch
from fsam_fused import FSAM
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3)
    opt = FSAM([p], torch.optim.SGD, lr=0.1)
    for _ in range(2):
        opt.first_step(); opt.second_step()
print("backend:", opt.plan_summary()[0].backend)
for w in caught:
    print(f"warning: {w.category.__name__}: {w.message}")
p = torch.nn.Parameter(torch.randn(4)); p.grad = torch.ones(4)
try:
    FSAM([p], torch.optim.SGD, lr=0.1, backend="cpp").first_step()
    print("explicit: ok", torch.ops.fsam_fused.norm_sq(
        [torch.ones(4)], [torch.ones(4)], [], torch.tensor([[0.0, 0.0, 0.0, 1.0]]),
        torch.tensor([0.0, 1e-12]), False).item())
except ValueError as e:
    print("explicit:", e)
"""


def _lines(out, prefix):
    return [line[len(prefix) :] for line in out.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real build (compilation 1 of 2), in a cache directory holding what builds that
    died leave: a staging directory with torch's baton in it, and the baton older versions
    left in the cache directory itself."""
    root = tmp_path_factory.mktemp("built")
    d = root / TAG
    os.makedirs(d / ".staging-dead")
    open(d / "lock", "w").close()
    open(d / ".staging-dead" / "lock", "w").close()
    r = _python(STEPS, _env(FSAM_FUSED_BUILD_DIR=str(root)), timeout=600)
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout, "backend: ") == ["cpp"], r.stdout
    assert _lines(r.stdout, "explicit: ") == ["ok 4.0"], r.stdout
    assert not _lines(r.stdout, "warning: "), r.stdout
    return d


def _copy(built, tmp_path, name="cache"):
    """A fresh cache root holding a copy of the fixture's complete build."""
    root = tmp_path / name
    shutil.copytree(built, root / TAG)
    return root


def _expected_size(d):
    with open(d / MANIFEST) as f:
        return json.load(f)["size"]


def test_real_build_clears_leftovers_and_writes_a_manifest(built):
    assert sorted(os.listdir(built)) == sorted([SO, MANIFEST, LOCK])  # no staging, no baton
    assert os.path.getsize(built / LOCK) == 0  # the holder's PID is gone with the holder
    m = json.loads((built / MANIFEST).read_text())
    assert m["size"] == os.path.getsize(built / SO) > 0
    assert m["fingerprint"]["cflags"][:3] == ["-O3", "-fopenmp", "-ffp-contract=off"]
    assert list(m["fingerprint"]["sources"]) == ["fsam_cpu.cpp"]


def test_nothing_is_built_at_import_or_auto_construction(tmp_path):
    build = tmp_path / "build"
    r = _python(
        """
        import torch, fsam_fused
        from fsam_fused import FSAM
        from fsam_fused.ops import cpp as cpp_ops
        p = torch.nn.Parameter(torch.randn(3))
        FSAM([p], torch.optim.SGD, lr=0.1)
        assert not cpp_ops.attempted()
        print("ok")
    """,
        _env(FSAM_FUSED_BUILD_DIR=str(build)),
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert not build.exists()


def test_explicit_cpp_builds_at_construction_and_says_so_once(built, tmp_path):
    """(e) backend="cpp" compiles at construction, not inside the first step, and the
    compile is announced once on stderr with the expected time and the command that builds
    ahead; a cached build loads silently. (The compile is faked: a copy of the fixture's.)"""
    fake = f"""
        import json, os, shutil, sys, torch
        from fsam_fused import FSAM
        from fsam_fused.ops import cpp as cpp_ops, cpp_build
        def fake_run(args, env, timeout):
            sys.stderr.write("COMPILING\\n")
            shutil.copy({str(built / SO)!r}, os.path.join(json.loads(args[-1])["directory"],
                                                          {SO!r}))
            return 0, ""
        cpp_build._run = fake_run
        p = torch.nn.Parameter(torch.randn(3))
        FSAM([p], torch.optim.SGD, lr=0.1, backend="cpp")
        print("built at construction:", cpp_ops.attempted() and cpp_ops.load() is None)
        FSAM([p], torch.optim.SGD, lr=0.1, backend="cpp")
    """
    root = tmp_path / "fresh"
    r = _python(fake, _env(FSAM_FUSED_BUILD_DIR=str(root)))
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout, "built at construction: ") == ["True"]
    notice = cpp_build.BUILD_NOTICE.format(directory=root / TAG).strip()
    assert r.stderr.count("fsam_fused: compiling the C++ CPU backend") == 1, r.stderr
    assert r.stderr.index(notice) < r.stderr.index("COMPILING"), r.stderr  # said before
    assert "1-3 minutes" in notice and "python -m fsam_fused.ops" in notice
    r = _python(fake, _env(FSAM_FUSED_BUILD_DIR=str(root)))  # cached: silent, no compile
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # No compiler and no cache: construction itself refuses, naming the reason.
    r = _python(
        "import torch\nfrom fsam_fused import FSAM\n"
        "try:\n    FSAM([torch.nn.Parameter(torch.randn(3))], torch.optim.SGD, lr=0.1, "
        "backend='cpp')\nexcept ValueError as e:\n    print('refused:', e)\n",
        _env(FSAM_FUSED_BUILD_DIR=str(tmp_path / "none"), CXX="/nonexistent/c++"),
    )
    assert _lines(r.stdout, "refused: ") == [
        "backend='cpp' cannot run these parameters: RuntimeError: no C++ compiler: "
        "'/nonexistent/c++' is not on PATH (set CXX); use backend='auto', 'foreach' or "
        "'reference'"
    ], (r.stdout, r.stderr)


def test_the_build_command_builds_ahead(built, tmp_path):
    """(e) python -m fsam_fused.ops verifies or builds, prints the path, exit status 0; with
    no way to build it says why and exits 1."""
    root = _copy(built, tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "fsam_fused.ops"],
        cwd=ROOT,
        env=_env(FSAM_FUSED_BUILD_DIR=str(root)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"fsam_fused: C++ CPU backend ready: {root / TAG / SO} ("), r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "fsam_fused.ops"],
        cwd=ROOT,
        env=_env(FSAM_FUSED_BUILD_DIR=str(tmp_path / "none"), CXX="/nonexistent/c++"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "cannot be built: no C++ compiler" in r.stderr, r.stderr


def test_without_a_compiler_auto_warns_once_and_uses_foreach(tmp_path):
    r = _python(
        """
        import warnings, torch
        from fsam_fused import FSAM
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            for _ in range(2):
                p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3)
                opt = FSAM([p], torch.optim.SGD, lr=0.1)
                for _ in range(2):
                    opt.first_step(); opt.second_step()
                assert [b.backend for b in opt.plan_summary()] == ["foreach"]
        msgs = [str(w.message) for w in caught if "C++" in str(w.message)]
        assert len(msgs) == 1, msgs
        print(msgs[0])
        p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.randn(3)
        try:
            FSAM([p], torch.optim.SGD, lr=0.1, backend="cpp").first_step()
        except ValueError as e:
            print("explicit:", e)
    """,
        _env(CXX="/nonexistent/c++", FSAM_FUSED_BUILD_DIR=str(tmp_path / "b")),
    )
    assert r.returncode == 0, r.stderr
    assert "no C++ compiler" in r.stdout and "foreach" in r.stdout
    assert (
        "explicit: backend='cpp' cannot run these parameters: RuntimeError: no C++ "
        "compiler" in r.stdout
    )


def test_build_bounds_jobs_stages_and_installs_with_a_manifest(tmp_path, monkeypatch):
    """The build runs in a child process (faked here) with MAX_JOBS bounded in the child's
    environment only, into a private staging directory; leftovers of dead builds are
    removed, and the result is installed with a manifest that verifies."""
    monkeypatch.setenv("FSAM_FUSED_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("MAX_JOBS", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    d = cpp_build.build_directory()
    assert os.path.dirname(d) == str(tmp_path) and "torch" in os.path.basename(d)
    os.makedirs(os.path.join(d, ".staging-dead"))
    open(os.path.join(d, "lock"), "w").close()
    seen = []

    def fake_run(args, env, timeout):
        a = json.loads(args[-1])
        seen.append(dict(a, jobs=env.get("MAX_JOBS"), timeout=timeout, left=sorted(os.listdir(d))))
        with open(os.path.join(a["directory"], SO), "wb") as f:
            f.write(b"\x7fELF built %d" % len(seen))
        return 0, ""

    monkeypatch.setattr(cpp_build, "_run", fake_run)
    assert cpp_build.ensure_built() == os.path.join(d, SO)
    s = seen[0]
    assert os.path.dirname(s["directory"]) == d and s["sources"][0].endswith("fsam_cpu.cpp")
    assert [x for x in s["left"] if x != os.path.basename(s["directory"])] == [LOCK]
    assert 1 <= int(s["jobs"]) <= 4 and "MAX_JOBS" not in os.environ
    assert "-fopenmp" in s["cflags"] and s["ldflags"] == ["-fopenmp"]
    assert sorted(os.listdir(d)) == sorted([SO, MANIFEST, LOCK])
    assert cpp_build._check(d) == ("ok", None)
    # Without its manifest the build is not trusted: warned about, rebuilt.
    os.remove(os.path.join(d, MANIFEST))
    monkeypatch.setenv("MAX_JOBS", "1")
    with pytest.warns(cpp_build.CachedBuildWarning, match="has no manifest.*; rebuilding"):
        cpp_build.ensure_built()
    assert seen[1]["jobs"] == "1" and cpp_build._check(d) == ("ok", None)
    with open(os.path.join(d, SO), "rb") as f:
        assert f.read() == b"\x7fELF built 2"
    # A verified build is used as it is: no rebuild, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpp_build.ensure_built()
    assert len(seen) == 2


# ------------------------------------------------------------------ the reported failures


def test_a_truncated_cache_is_never_loaded_and_is_rebuilt(built, tmp_path):
    """(a) Mapping a truncated library raised SIGBUS. Now its size is checked against the
    manifest first: without a compiler "auto" falls back naming it and "cpp" raises; with
    one it is rebuilt (the compile step faked: the fixture's library copied in)."""
    root = _copy(built, tmp_path)
    so, want = root / TAG / SO, _expected_size(root / TAG)
    os.truncate(so, want // 2)
    damaged = f"cached build {so} is damaged ({want // 2} bytes, expected {want})"
    r = _python(STEPS, _env(FSAM_FUSED_BUILD_DIR=str(root), CXX="/nonexistent/c++"))
    assert r.returncode == 0, (r.returncode, r.stderr)  # SIGBUS: returncode -7
    assert _lines(r.stdout, "backend: ") == ["foreach"]
    reason = (
        f"RuntimeError: {damaged} and cannot be rebuilt: no C++ compiler: "
        "'/nonexistent/c++' is not on PATH (set CXX)"
    )
    assert _lines(r.stdout, "warning: ") == [
        f"RuntimeWarning: fsam_fused: the C++ CPU backend is unavailable ({reason}); CPU "
        "parameters use backend='foreach' instead"
    ], r.stdout
    assert _lines(r.stdout, "explicit: ") == [
        f"backend='cpp' cannot run these parameters: {reason}; use backend='auto', "
        "'foreach' or 'reference'"
    ]

    fake_compile = f"""
        import json, os, shutil
        from fsam_fused.ops import cpp_build
        def fake_run(args, env, timeout):
            shutil.copy({str(built / SO)!r}, os.path.join(json.loads(args[-1])["directory"],
                                                          {SO!r}))
            return 0, ""
        cpp_build._run = fake_run
    """
    r = _python(textwrap.dedent(fake_compile) + STEPS, _env(FSAM_FUSED_BUILD_DIR=str(root)))
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert _lines(r.stdout, "warning: ") == [
        f"CachedBuildWarning: fsam_fused: {damaged}; rebuilding"
    ], r.stdout
    assert _lines(r.stdout, "backend: ") == ["cpp"]
    assert _lines(r.stdout, "explicit: ") == ["ok 4.0"]
    assert os.path.getsize(so) == want


def test_b_an_empty_or_garbage_cache_is_rebuilt(built, tmp_path):
    """(b) An empty or garbage library is recognised (size, sha256) and rebuilt, for real
    here (compilation 2 of 2); after that every run just loads it. Without a compiler the
    reason names the damage."""
    root = _copy(built, tmp_path, "garbage")
    so, want = root / TAG / SO, _expected_size(root / TAG)
    so.write_bytes(b"\xde\xad" * (want // 2) + b"!" * (want % 2))  # the right size
    r = _python(STEPS, _env(FSAM_FUSED_BUILD_DIR=str(root)), timeout=600)
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout, "warning: ") == [
        f"CachedBuildWarning: fsam_fused: cached build {so} is damaged (its sha256 is not "
        "the manifest's); rebuilding"
    ], r.stdout
    assert _lines(r.stdout, "backend: ") == ["cpp"]
    assert _lines(r.stdout, "explicit: ") == ["ok 4.0"]
    assert cpp_build._check(root / TAG) == ("ok", None)
    # Rebuilt once and for all: the next run loads it with no compiler and no warning.
    r = _python(STEPS, _env(FSAM_FUSED_BUILD_DIR=str(root), CXX="/nonexistent/c++"))
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout, "backend: ") == ["cpp"] and not _lines(r.stdout, "warning: ")

    root = _copy(built, tmp_path, "empty")
    so = root / TAG / SO
    so.write_bytes(b"")
    r = _python(STEPS, _env(FSAM_FUSED_BUILD_DIR=str(root), CXX="/nonexistent/c++"))
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout, "backend: ") == ["foreach"]
    (w,) = _lines(r.stdout, "warning: ")
    assert (
        f"unavailable (RuntimeError: cached build {so} is damaged (0 bytes, expected "
        f"{want}) and cannot be rebuilt: no C++ compiler" in w
    )


# Imports first, so that "loading" means the lock is a moment away.
LOADING = "import fsam_fused.ops.cpp_build\nprint('loading', flush=True)\n"

HOLDER = """
import fcntl, os, shutil, sys
d, built = sys.argv[1], sys.argv[2]
fd = os.open(os.path.join(d, ".fsam_fused.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.write(fd, b"%d\\n" % os.getpid())
print("held", flush=True)
sys.stdin.readline()  # "finish your build": install one the way the builder does
for name in ("fsam_fused_cpu.so", "fsam_fused_cpu.json"):
    shutil.copy(os.path.join(built, name), os.path.join(d, name + ".tmp"))
    os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))
os.ftruncate(fd, 0)
fcntl.flock(fd, fcntl.LOCK_UN)
print("done", flush=True)
"""


def test_c_a_held_lock_is_named_and_the_wait_is_bounded(built, tmp_path):
    """(c) While another live process holds the build lock, the first step warns after
    3 s which PID holds which lock and gives up after FSAM_FUSED_BUILD_WAIT seconds; once
    the holder has installed its build, a waiter loads it (no build of its own)."""
    root = tmp_path / "cache"
    d = root / TAG
    os.makedirs(d)
    lock = d / LOCK
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(d), str(built)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        timed = """
            import time
            t0 = time.monotonic()
            from fsam_fused.ops import cpp as cpp_ops
            cpp_ops.load()  # builds nothing: gives up waiting
            print("waited:", time.monotonic() - t0)
        """
        r = _python(
            textwrap.dedent(timed) + STEPS,
            _env(FSAM_FUSED_BUILD_DIR=str(root), FSAM_FUSED_BUILD_WAIT="4"),
        )
        assert r.returncode == 0, r.stderr
        waited = float(_lines(r.stdout, "waited: ")[0])
        assert 4 <= waited < 15, waited
        # The notice went to stderr as it happened (the load ran before STEPS recorded).
        assert (
            f"BuildLockWarning: fsam_fused: waiting for the C++ build lock {lock}, held "
            f"by PID {holder.pid}; giving up after 4 s (FSAM_FUSED_BUILD_WAIT)" in r.stderr
        )
        reason = (
            f"TimeoutError: the build lock {lock} is still held by PID {holder.pid} "
            "after 4 s (FSAM_FUSED_BUILD_WAIT=4); not building"
        )
        assert _lines(r.stdout, "backend: ") == ["foreach"]
        assert _lines(r.stdout, "warning: ") == [
            f"RuntimeWarning: fsam_fused: the C++ CPU backend is unavailable ({reason}); "
            "CPU parameters use backend='foreach' instead"
        ], r.stdout
        assert _lines(r.stdout, "explicit: ") == [
            f"backend='cpp' cannot run these parameters: {reason}; use backend='auto', "
            "'foreach' or 'reference'"
        ]

        waiter = subprocess.Popen(
            [sys.executable, "-c", LOADING + STEPS],
            cwd=ROOT,
            env=_env(FSAM_FUSED_BUILD_DIR=str(root), FSAM_FUSED_BUILD_WAIT="120"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert waiter.stdout.readline().strip() == "loading"
        time.sleep(1.0)  # let it reach the lock
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "done"
        inode = os.stat(d / SO).st_ino
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        assert _lines(out, "backend: ") == ["cpp"] and not _lines(out, "warning: "), out
        assert _lines(out, "explicit: ") == ["ok 4.0"]
        assert os.stat(d / SO).st_ino == inode  # loaded the holder's build, built nothing
        assert os.path.getsize(lock) == 0
    finally:
        holder.kill()
        holder.wait()


# Run in the child before anything else: every write under the cache root fails the way a
# read-only file system fails it, and is recorded.
READ_ONLY = """
import builtins, errno, os, atexit
_root = os.path.realpath(os.environ["FSAM_FUSED_BUILD_DIR"])
_attempts = []
def _inside(path):
    try:
        return os.path.realpath(os.fspath(path)).startswith(_root)
    except TypeError:
        return False  # a file descriptor
def _refuse(what, path):
    _attempts.append(f"{what} {path}")
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
def _guard(what, real, writes):
    def guarded(path, *a, **kw):
        if _inside(path) and writes(*a, **kw):
            _refuse(what, path)
        return real(path, *a, **kw)
    return guarded
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
os.open = _guard("os.open", os.open, lambda flags, *a, **kw: flags & _W)
builtins.open = _guard("open", builtins.open,
                       lambda mode="r", *a, **kw: any(c in mode for c in "wax+"))
for _name in ("mkdir", "remove", "unlink", "rmdir", "replace", "rename", "truncate", "chmod"):
    setattr(os, _name, _guard("os." + _name, getattr(os, _name), lambda *a, **kw: True))
atexit.register(lambda: print("write attempts:", _attempts))
"""


def test_d_a_complete_cache_works_read_only_and_without_a_compiler(built, tmp_path):
    """(d) A verified build is loaded with no compiler (CXX points nowhere) and no write
    access. Tests run as root, which ignores permission bits, so the cache is made
    read-only twice over: its modes are cleared, and the child refuses, with EROFS, every
    write under the cache root and records the attempts (there must be none: no lock file
    either). The next test mounts it read-only for real where the container allows it."""
    root = _copy(built, tmp_path)
    os.remove(root / TAG / LOCK)
    for p in (root / TAG / SO, root / TAG / MANIFEST, root / TAG, root):
        os.chmod(p, os.stat(p).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        r = _python(READ_ONLY + STEPS, _env(FSAM_FUSED_BUILD_DIR=str(root), CXX="/nonexistent/c++"))
        assert r.returncode == 0, r.stderr
        assert _lines(r.stdout, "backend: ") == ["cpp"] and not _lines(r.stdout, "warning: ")
        assert _lines(r.stdout, "explicit: ") == ["ok 4.0"]
        assert _lines(r.stdout, "write attempts: ") == ["[]"]
        assert sorted(os.listdir(root / TAG)) == [MANIFEST, SO]
    finally:
        for p in (root, root / TAG):
            os.chmod(p, 0o755)


# Runs "$3" with Python "$2" in a private mount namespace where "$1" is bind-mounted on
# itself read-only: a real read-only file system, which binds root too. unshare's default
# propagation is private, so the mount never shows outside.
RO_MOUNT = 'mount --bind -o ro "$1" "$1" && exec "$2" -c "$3"'


def test_d_a_read_only_mounted_cache(built, tmp_path):
    """(d) again on a really read-only file system: the cache root bind-mounted read-only
    (``unshare -m``; skipped where mount namespaces are not allowed)."""
    root = _copy(built, tmp_path)
    os.remove(root / TAG / LOCK)
    probe = (
        subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                RO_MOUNT,
                "sh",
                str(root),
                sys.executable,
                f"open({str(root / 'x')!r}, 'w')",
            ],
            capture_output=True,
            text=True,
        )
        if shutil.which("unshare")
        else None
    )
    if probe is None or "Read-only file system" not in probe.stderr:
        pytest.skip(
            "cannot mount a read-only file system here (unshare -m): "
            + (probe.stderr[-300:] if probe else "no unshare")
        )
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", RO_MOUNT, "sh", str(root), sys.executable, STEPS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(FSAM_FUSED_BUILD_DIR=str(root), CXX="/nonexistent/c++"),
    )
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout, "backend: ") == ["cpp"] and not _lines(r.stdout, "warning: ")
    assert _lines(r.stdout, "explicit: ") == ["ok 4.0"]
    assert sorted(os.listdir(root / TAG)) == [MANIFEST, SO]

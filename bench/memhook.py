"""Run a module under tracemalloc and keep the snapshot taken nearest its peak RSS.

``python -m bench.memhook OUT -m bot --config ...`` runs ``python -m bot ...`` with
tracemalloc on (``MEMHOOK_FRAMES`` frames per allocation, default 12). A watcher thread
reads the process's RSS every ``MEMHOOK_INTERVAL`` seconds (default 1); whenever it
is ``MEMHOOK_STEP_MB`` (default 15) above the RSS of the last snapshot, it takes a new
snapshot and writes it to ``OUT`` (``OUT.json``: RSS, threads, traced memory, the
collector's generations and the most numerous object types at that moment). The last
file written is the one nearest the peak. :func:`report` reads them back
(``bench.relay --memory-profile``). Not a test and not part of the bot: the tracing
itself costs memory and CPU, so its RSS and CPU figures are not the bot's.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _status() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def _census(limit: int = 40) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        counts[name] += 1
        try:
            sizes[name] += sys.getsizeof(obj)
        except TypeError:
            pass
    return {
        "objects": sum(counts.values()),
        "generations": [len(gc.get_objects(i)) for i in range(3)],
        "frozen": gc.get_freeze_count(),
        "gc_count": list(gc.get_count()),
        "top_by_count": counts.most_common(limit),
        "top_by_shallow_size": sizes.most_common(limit),
    }


def _take(out: Path, status: dict[str, int]) -> None:
    snapshot = tracemalloc.take_snapshot()
    current, peak = tracemalloc.get_traced_memory()
    tmp = out.with_suffix(".tmp")
    snapshot.dump(str(tmp))
    os.replace(tmp, out)
    del snapshot  # before the census: its million trace tuples are not the bot's
    meta = {"at": time.time(), "status": status, "traced": current, "traced_peak": peak,
            "threads": [t.name for t in threading.enumerate()], **_census()}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def _watch(out: Path, step_kb: int, interval: float) -> None:
    last = 0
    while True:
        time.sleep(interval)
        status = _status()
        if status["VmRSS"] > last + step_kb:
            last = status["VmRSS"]
            try:
                _take(out, status)
            except Exception as exc:  # noqa: BLE001 - diagnosis must not end the bot
                print(f"memhook: snapshot failed: {exc!r}", file=sys.stderr, flush=True)


def _watch_garbage(out: Path, step_kb: int, interval: float) -> None:
    """MEMHOOK_MODE=gc: at each RSS step, a full collection; how much it found (cyclic
    garbage the collector's thresholds had left) and the RSS before and after, as JSON
    lines. Changes the run it measures (the garbage is gone afterwards)."""
    last = 0
    with out.open("a") as fh:
        while True:
            time.sleep(interval)
            status = _status()
            if status["VmRSS"] > last + step_kb:
                last = status["VmRSS"]
                counts = [len(gc.get_objects(i)) for i in range(3)]
                started = time.perf_counter()
                found = gc.collect()
                took = time.perf_counter() - started
                fh.write(json.dumps({"at": time.time(), "rss_before": status["VmRSS"],
                                     "rss_after": _status()["VmRSS"], "unreachable": found,
                                     "generations": counts, "seconds": round(took, 3)}) + "\n")
                fh.flush()


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: python -m bench.memhook OUT -m MODULE [ARGS...]")
    out, module = Path(sys.argv[1]), sys.argv[3]
    garbage = os.environ.get("MEMHOOK_MODE") == "gc"
    if not garbage:
        tracemalloc.start(int(os.environ.get("MEMHOOK_FRAMES", "12")))
    threading.Thread(
        target=_watch_garbage if garbage else _watch, name="memhook", daemon=True,
        args=(out, int(float(os.environ.get("MEMHOOK_STEP_MB", "15")) * 1024),
              float(os.environ.get("MEMHOOK_INTERVAL", "1"))),
    ).start()
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# --------------------------------------------------------------------------- report


def _own_frame(trace: tracemalloc.Traceback) -> str:
    """The innermost frame in this repository's code (not a library's): who asked."""
    for frame in trace:  # most recent call first
        name = frame.filename
        if name.startswith(str(ROOT)) and "/.venv/" not in name and "/site-packages/" not in name:
            return f"{os.path.relpath(name, ROOT)}:{frame.lineno}"
    return "(no project frame)"


def report(out: Path, top: int = 25) -> str:
    """The snapshot nearest the peak: the top allocators by line, by library file and
    by the project line that caused them, plus the object census."""
    if not out.exists():
        return f"memory profile: no snapshot was written to {out}"
    if os.environ.get("MEMHOOK_MODE") == "gc":
        rows = [json.loads(line) for line in out.read_text().splitlines() if line]
        return "full collections at RSS steps (MB before -> after, unreachable found):\n" + (
            "\n".join(f"  {r['rss_before'] / 1024:6.0f} -> {r['rss_after'] / 1024:6.0f}  "
                      f"{r['unreachable']:9,}  gens {r['generations']}  {r['seconds']} s"
                      for r in rows))
    meta = json.loads(out.with_suffix(".json").read_text())
    snapshot = tracemalloc.Snapshot.load(str(out)).filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    mb = 1024 * 1024
    st = meta["status"]
    lines = [
        f"memory profile ({out}): snapshot at RSS {st['VmRSS'] / 1024:.0f} MB "
        f"(anon {st.get('RssAnon', 0) / 1024:.0f} MB, peak so far {st['VmHWM'] / 1024:.0f} MB),"
        f" {st['Threads']} threads; traced by tracemalloc {meta['traced'] / mb:.1f} MB "
        f"(the rest: interpreter, native libraries, allocator free lists, tracing overhead)",
        f"gc: {meta['objects']:,} tracked objects, generations {meta['generations']}, "
        f"frozen {meta['frozen']:,}, counts {meta['gc_count']}",
        f"threads: {', '.join(meta['threads'])}",
        "", f"top {top} allocating lines:",
    ]
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        lines.append(f"  {stat.size / mb:7.1f} MB {stat.count:9,} blocks  "
                     f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}")
    lines += ["", f"top {top} files:"]
    for stat in snapshot.statistics("filename")[:top]:
        lines.append(f"  {stat.size / mb:7.1f} MB {stat.count:9,} blocks  "
                     f"{os.path.relpath(stat.traceback[0].filename, ROOT)}")
    by_own: collections.Counter[str] = collections.Counter()
    count_own: collections.Counter[str] = collections.Counter()
    for stat in snapshot.statistics("traceback"):
        key = _own_frame(stat.traceback)
        by_own[key] += stat.size
        count_own[key] += stat.count
    lines += ["", f"top {top} project lines (innermost project frame of each allocation):"]
    for key, size in by_own.most_common(top):
        lines.append(f"  {size / mb:7.1f} MB {count_own[key]:9,} blocks  {key}")
    lines += ["", "objects by type (count, gc-tracked):"]
    lines += [f"  {n:9,}  {name}" for name, n in meta["top_by_count"][:top]]
    lines += ["", "objects by type (shallow size):"]
    lines += [f"  {s / mb:7.1f} MB  {name}" for name, s in meta["top_by_shallow_size"][:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()


def memray_command(out: Path) -> list[str]:
    """Interpreter arguments that run a module under memray (aggregated capture: only
    what is needed for the high-water mark, so hours of allocations stay small)."""
    return ["-m", "memray", "run", "--aggregate", "--quiet", "--force", "-o", str(out)]


def report_memray(out: Path, top: int = 25) -> str:
    """What was allocated (Python and native, every thread) at the moment the heap was
    largest: by thread, by the innermost project line, and by the library line."""
    try:
        import memray
    except ImportError:
        return "memory profile: memray is not installed (pip install memray)"
    if not out.exists():
        return f"memory profile: no capture at {out}"
    reader = memray.FileReader(str(out))
    meta = reader.metadata
    snaps = list(reader.get_memory_snapshots())
    peak_rss = max((s.rss for s in snaps), default=0)
    mb = 1024 * 1024
    by_thread: collections.Counter[str] = collections.Counter()
    by_own: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    by_stack: collections.Counter[str] = collections.Counter()
    total = 0
    for rec in reader.get_high_watermark_allocation_records(merge_threads=False):
        size = rec.size
        total += size
        thread = rec.thread_name or f"tid {rec.tid}"
        # aiosqlite's connection threads are numbered: one line for all of them.
        by_thread["Thread-N (" + thread.split("(", 1)[1] if thread.startswith("Thread-")
                  and "(" in thread else thread] += size
        stack = rec.stack_trace(max_stacks=40)
        own = "(no project frame)"
        for func, filename, lineno in stack:  # innermost first
            if (filename.startswith(str(ROOT)) and "/.venv/" not in filename
                    and "/site-packages/" not in filename):
                own = f"{os.path.relpath(filename, ROOT)}:{lineno} {func}"
                break
        by_own[own] += size
        if stack:
            func, filename, lineno = stack[0]
            by_line[f"{_short(filename)}:{lineno} {func}"] += size
            by_stack[" < ".join(f"{f}@{_short(p)}:{n}" for f, p, n in stack[:6])] += size
    lines = [
        f"memory profile ({out}, memray): heap at its peak {total / mb:.0f} MB "
        f"(memray: {meta.peak_memory / mb:.0f} MB), highest RSS sampled {peak_rss / mb:.0f} MB; "
        f"{meta.total_allocations:,} allocations in all",
        "", "at the heap's peak, by thread:",
    ]
    lines += [f"  {s / mb:7.1f} MB  {k}" for k, s in by_thread.most_common(top)]
    lines += ["", f"top {top} project lines (innermost project frame):"]
    lines += [f"  {s / mb:7.1f} MB  {k}" for k, s in by_own.most_common(top)]
    lines += ["", f"top {top} allocating lines:"]
    lines += [f"  {s / mb:7.1f} MB  {k}" for k, s in by_line.most_common(top)]
    lines += ["", f"top {top} stacks (6 innermost frames):"]
    lines += [f"  {s / mb:7.1f} MB  {k}" for k, s in by_stack.most_common(top)]
    return "\n".join(lines)


def _short(filename: str) -> str:
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1]
    if "/lib/python3" in filename:  # the standard library
        return filename.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return os.path.relpath(filename, ROOT) if filename.startswith(str(ROOT)) else filename

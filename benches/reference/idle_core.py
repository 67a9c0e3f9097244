"""What runs while the other core idles: reads `perf script` output of a system-wide profile
and, millisecond by millisecond, pairs the two CPUs' samples; where one CPU is idle (pid 0),
counts what the other runs (thread id, innermost frame and the first selfsup or burn frame).

Record and print (2 CPUs; the timed steps are the last part of the run, pass their window):
    perf record -a -F 997 -g -o p.perf -- train_throughput --case dino_vit_tiny4_2+4crops_b64
    perf script -i p.perf -F cpu,tid,time,ip,sym > p.txt
    python3 benches/reference/idle_core.py p.txt [--from T0 --to T1] [--top 30]

Per-second sample counts of each thread (`--per-second`) show where the timed steps start.
BENCHMARKS.md (issue 30, sixth round) used it to find the memsets and burn-flex's calling-thread
ReLU that left a core idle.
"""
import argparse
import collections
import re

HEADER = re.compile(r"^\s*(\d+) \[(\d+)\]\s+([\d.]+):")


def samples(path):
    """(tid, cpu, time, frames innermost first) of each sample."""
    current = None
    for line in open(path, errors="replace"):
        match = HEADER.match(line)
        if match:
            if current:
                yield current
            current = (int(match[1]), int(match[2]), float(match[3]), [])
        elif current and line.strip():
            parts = line.strip().split(None, 1)
            current[3].append(parts[-1])
    if current:
        yield current


def caller(frames):
    """The first selfsup or burn frame, generic arguments dropped."""
    for frame in frames:
        if ("selfsup::" in frame or "burn_" in frame) and "closure" not in frame:
            return re.sub(r"<[^<>]*>", "", frame)[:70]
    return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", help="perf script -F cpu,tid,time,ip,sym output")
    parser.add_argument("--from", dest="start", type=float, default=0.0, help="window start (s)")
    parser.add_argument("--to", dest="end", type=float, default=float("inf"), help="window end (s)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--per-second", action="store_true", help="samples per thread and second")
    args = parser.parse_args()

    if args.per_second:
        counts = collections.Counter(
            (int(t), tid) for tid, _, t, _ in samples(args.script) if tid != 0
        )
        for (second, tid), n in sorted(counts.items()):
            print(second, tid, n)
        return

    by_ms = collections.defaultdict(dict)
    for tid, cpu, t, frames in samples(args.script):
        if args.start <= t <= args.end:
            by_ms[int(t * 1000)][cpu] = (tid, frames)
    paired = [cpus for cpus in by_ms.values() if len(cpus) == 2]
    alone = collections.Counter()
    for cpus in paired:
        (tid_a, frames_a), (tid_b, frames_b) = cpus.values()
        if (tid_a == 0) != (tid_b == 0):
            tid, frames = (tid_b, frames_b) if tid_a == 0 else (tid_a, frames_a)
            alone[(tid, frames[0][:50] if frames else "?", caller(frames))] += 1
    total = max(len(paired), 1)
    print(f"{len(paired)} ms with both CPUs sampled; one idle in {sum(alone.values())} "
          f"({100 * sum(alone.values()) / total:.1f}%)")
    for (tid, top, where), n in alone.most_common(args.top):
        print(f"{100 * n / total:5.2f}%  tid {tid}  {top}  <  {where}")


if __name__ == "__main__":
    main()

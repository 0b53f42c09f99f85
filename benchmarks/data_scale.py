"""The data layer's start-up and resume at internet scale, simulated on one machine.

    python benchmarks/data_scale.py --out runs/data_scale                  # 2k / 20k / 230k shards, 100k / 1M / 12M lines
    python benchmarks/data_scale.py --out runs/data_scale --shards 2000 --lines 100000 --shard-writer-lines 10000

Builds shard sets of ``--shards`` empty placeholder tars with an ``index.json`` of eve-ds's format counting
``--samples-per-shard`` each (LAION-2B: 230,000 shards of about 10,000 samples), and JSONL manifests of ``--lines``
lines, all naming one small image. Each is then measured in a fresh process, as one rank of ``--ranks`` with
``--workers`` loader workers would meet it (shard reading is replaced by a generator of samples; a manifest's lines
and image are read for real):

- open: ``open_source`` on rank 0 (expanding the pattern, checking the shards exist, reading the index; scanning a
  manifest and writing its offsets the first time), then, in another process, again as a later start finds it; the
  pickled size of what rank 0 hands the other ranks, and the time they take to unpickle it;
- first positions: the stream of the last rank built, and the first 64 positions of each of its readers;
- memory: the rank's resident and proportional memory (RSS, PSS) after that, and each worker's private memory
  (forked as the DataLoader forks them, reading its own first positions);
- resume: the saved position of every reader (size of the checkpoint's data_position.json) and the time a rank
  takes to restore its readers from it at half the number of ranks.

Then ``tools/make_shards.py`` on manifests of ``--shard-writer-lines`` lines: wall time and peak memory, which
should grow and stay flat with the manifest. Prints one table and writes ``results.json``.
"""
import argparse
import io
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CAPTION = "a photo of a red circle and a small blue square on a green background, number {}"


def memory() -> dict:
    """This process's memory in MiB: resident, proportional (shared pages divided among their users) and private."""
    fields = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def build_shard_set(folder: Path, shards: int, samples: int) -> str:
    from eve_ds.data.shards import write_index

    width = max(5, len(str(shards - 1)))
    if not (folder / "index.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        names = [f"{number:0{width}d}.tar" for number in range(shards)]
        for name in names:
            (folder / name).touch()
        write_index(folder, {name: samples for name in names})
    return f"{folder}/{{{0:0{width}d}..{shards - 1:0{width}d}}}.tar"


def build_manifest(path: Path, lines: int) -> Path:
    if not path.is_file():
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "PNG")
        (path.parent / "image.png").write_bytes(buffer.getvalue())
        partial = path.with_name(path.name + ".partial")
        with partial.open("w") as out:
            for start in range(0, lines, 100_000):
                out.write("".join(json.dumps({"image": "image.png", "caption": CAPTION.format(n)}) + "\n"
                                  for n in range(start, min(lines, start + 100_000))))
        partial.rename(path)
    return path


def generated_shard(path, problems, skip=0, stop=None):
    """What a shard of the index's size yields, without a byte read: the simulation's shard reader."""
    files = {"jpg": b"\xff\xd8 placeholder", "txt": b"a placeholder caption"}
    for index in range(skip, stop):
        yield f"{Path(path).stem}{index:06d}", files


def first_positions(stream, role: int, count: int = 64):
    from eve_ds.data.stream import fresh_state, reader_samples

    reader = stream.rank * stream.roles + role
    state = fresh_state(len(stream.sources), reader, stream.readers)
    samples = reader_samples(stream.sources, stream.weights, state, reader, stream.readers, stream.seed, stream.block)
    return [next(samples) for _ in range(count)]


def worker(stream, role: int, results):
    first_positions(stream, role)
    results.put(memory())


def measure(spec: str, ranks: int, workers: int, cache: Path) -> dict:
    """One source as the last of ``ranks`` ranks meets it (run in a fresh process)."""
    import eve_ds.data.sources as sources
    from eve_ds.data import PretrainingStream, open_source
    from eve_ds.data.stream import fresh_state, resumed_states

    sources.iter_shard = generated_shard
    figures = {"memory_before": memory()}
    started = time.perf_counter()
    source = open_source(spec, index_cache=cache)  # what a later start does: the first was measured before
    figures["open_again_s"] = time.perf_counter() - started
    handed = pickle.dumps(source)
    started = time.perf_counter()
    source = pickle.loads(handed)
    figures.update(handed_mib=len(handed) / 2**20, unpickle_s=time.perf_counter() - started,
                   samples=source.total, described=source.describe())

    started = time.perf_counter()
    stream = PretrainingStream([source], [1.0], None, 32, ranks - 1, ranks, workers)
    for role in range(workers):
        first_positions(stream, role)
    figures["first_positions_s"] = time.perf_counter() - started
    figures["rank_memory"] = memory()

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=worker, args=(stream, role, results)) for role in range(workers)]
    for child in children:
        child.start()
    worker_memory = [results.get() for _ in children]
    for child in children:
        child.join()
    figures["worker_private_mib"] = max(m["private"] for m in worker_memory)
    figures["worker_pss_mib"] = max(m["pss"] for m in worker_memory)

    readers = ranks * workers
    saved = {"layout": stream.describe(), "batches": 0, "problems": {},
             "states": [[fresh_state(1, rank * workers + role, readers) for role in range(workers)]
                        for rank in range(ranks)]}
    for rank_states in saved["states"]:  # every reader part-way into its slice
        for state in rank_states:
            state["sources"][0]["pending"][0][3] = 17
    figures["position_mib"] = len(json.dumps(saved)) / 2**20
    half = PretrainingStream([source], [1.0], None, 32, ranks // 2 - 1, ranks // 2, workers)
    saved = json.loads(json.dumps(saved))  # as read from the file
    started = time.perf_counter()
    resumed_states(saved, half)
    figures["resume_at_half_s"] = time.perf_counter() - started
    return figures


def first_open(spec: str, cache: Path) -> dict:
    """The first start's open on rank 0 (a manifest's scan and offsets file included)."""
    from eve_ds.data import open_source

    started = time.perf_counter()
    open_source(spec, index_cache=cache)
    return {"open_s": time.perf_counter() - started}


def in_fresh_process(args, spec: str, cache: Path, what: str) -> dict:
    result = subprocess.run([sys.executable, __file__, what, spec, "--ranks", str(args.ranks), "--workers",
                             str(args.workers), "--cache", str(cache)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"data_scale: measuring {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measured(args, spec: str) -> dict:
    cache = args.out / "cache"
    return {**in_fresh_process(args, spec, cache, "--first-open"), **in_fresh_process(args, spec, cache, "--measure")}


def shard_writer(args, lines: int) -> dict:
    manifest = build_manifest(args.out / "writer" / f"manifest-{lines}.jsonl", lines)
    out = args.out / "writer" / f"shards-{lines}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    # The tool in a process of its own, which reports its peak and its shard writers' (Linux: KiB).
    script = ("import json, resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
              "run_name='__main__'); print(json.dumps([resource.getrusage(who).ru_maxrss for who in "
              "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]))")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, str(REPO / "tools" / "make_shards.py"), str(manifest),
                             str(out), "--shard-size", "1000", "--workers", "1"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"data_scale: make_shards failed:\n{result.stderr[-3000:]}")
    wall = time.perf_counter() - started
    main_peak, writer_peak = json.loads(result.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return {"lines": lines, "wall_s": wall, "peak_mib": main_peak / 1024, "writer_peak_mib": writer_peak / 1024}


def table(rows: list, writer: list, args) -> str:
    lines = [f"One rank of {args.ranks} with {args.workers} loader workers ({os.cpu_count()} CPUs here)", "",
             "| source | open (rank 0, first) | open again | handed to a rank | first positions | rank's memory "
             "for the data (RSS / PSS) | each worker's own | data position | restore at half the ranks |",
             "|---" * 9 + "|"]
    for name, f in rows:
        grown = {key: f["rank_memory"][key] - f["memory_before"][key] for key in ("rss", "pss")}
        lines.append(f"| {name} ({f['described']}) | {f['open_s']:.2f} s | {f['open_again_s']:.2f} s | "
                     f"{f['handed_mib']:.1f} MiB, {f['unpickle_s']:.2f} s | {f['first_positions_s']:.2f} s | "
                     f"+{grown['rss']:.0f} / +{grown['pss']:.0f} MiB | {f['worker_private_mib']:.0f} MiB | "
                     f"{f['position_mib']:.1f} MiB | {f['resume_at_half_s']:.3f} s |")
    lines += ["", f"Rank's memory: over the {rows[0][1]['memory_before']['rss']:.0f} MiB of the process before the "
              "source (torch and eve-ds imported). Each worker's own: private memory of a forked loader worker after "
              "its first positions."] if rows else []
    if writer:
        lines += ["", "tools/make_shards.py (shards of 1,000, one writer): " + "; ".join(
            f"{w['lines']:,} lines {w['wall_s']:.1f} s ({1e6 * w['wall_s'] / w['lines']:.0f} us a line), peak "
            f"{w['peak_mib']:.0f} MiB (its writer {w['writer_peak_mib']:.0f} MiB)" for w in writer)]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "data_scale")
    parser.add_argument("--shards", default="2000,20000,230000")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--lines", default="100000,1000000,12000000")
    parser.add_argument("--shard-writer-lines", default="10000,30000,100000")
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--first-open", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure or args.first_open:
        print(json.dumps(measure(args.measure, args.ranks, args.workers, args.cache) if args.measure else
                         first_open(args.first_open, args.cache)))
        return
    rows = []
    for shards in (int(n) for n in args.shards.split(",") if n):
        spec = build_shard_set(args.out / f"shards-{shards}", shards, args.samples_per_shard)
        rows.append((f"{shards:,} shards", measured(args, spec)))
        print(rows[-1][0], json.dumps(rows[-1][1]), flush=True)
    for lines in (int(n) for n in args.lines.split(",") if n):
        manifest = build_manifest(args.out / f"manifest-{lines}" / "manifest.jsonl", lines)
        for stale in manifest.parent.glob("*.offsets"):
            stale.unlink()  # the first open scans
        rows.append((f"{lines:,}-line manifest", measured(args, str(manifest))))
        print(rows[-1][0], json.dumps(rows[-1][1]), flush=True)
    writer = [shard_writer(args, int(n)) for n in args.shard_writer_lines.split(",") if n]
    text = table(rows, writer, args)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "shard_writer": writer}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()

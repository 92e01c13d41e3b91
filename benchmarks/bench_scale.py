"""Benchmark: how `hybridreg align` scales with the section size (issue 16).

Stacks of 512^2 to 16384^2 sections are built from real serial-section EM (../shared/data)
by tiling: section k of a big stack is a mosaic of one source section (the same z for every
tile, so consecutive sections stay consecutive sections of the source; each tile rotated /
flipped by a fixed per-tile choice so that neighbouring tiles differ), shifted by a small
random whole-pixel translation per section (seeded; section 0 unshifted) so that registration
has something to do. Source sections are used 0, 1, ..., Z-1, Z-2, ... (back and forth) when
the stack has more sections than the source. The stacks are uncompressed multi-page TIFFs
written one page at a time (never a whole stack in memory), outside the repository
(default /tmp/hybridreg-scale/), and reused when they exist with the same recipe.

Each method is run as the real CLI in a subprocess, under ``/usr/bin/time`` for the peak
resident memory:

    hybridreg align STACK --out OUT.zarr --fields-out FIELDS --method M [method args]
        --no-progress --overwrite [--tile PX when given and size > PX] [--extra ...]

methods: ``learned``; ``elastix`` (``--params em_affine``); ``hybrid`` (default preset).

Figures per (method, size): seconds per registered pair (mean of FIELDS/pairs.csv's
``seconds``: the registration alone; the first pair's also shown apart, as it carries the
method's one-off start-up, e.g. loading the network), registration Mpx/s (size^2 / s per
pair), end-to-end wall time of the command (start-up, reading, registration, solve, writing
the aligned stack and the transforms) and end-to-end Mpx/s (sections * size^2 / wall time),
peak RSS (GNU time's %M: the largest single process, not a sum over child processes), the
bytes of the transforms (every file under FIELDS but the .csv tables: .mha fields, .h5 ITK
transforms, transformix chains, JSON metadata) against the bytes of the uint8 image stack.
A failed run (a non-zero exit, killed for memory, past --timeout) is recorded with its exit
code and the tail of its stderr. Each row also keeps the 1-minute load average at its start:
other work on the machine skews the timings.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_scale.py --out benchmarks/results/scale.json
    .venv/bin/python benchmarks/bench_scale.py --sizes 512 1024 --methods learned elastix \\
        --sections 4 --out benchmarks/results/scale_small.json
    .venv/bin/python benchmarks/bench_scale.py --sizes 16384 --build-only   # stacks only
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HYBRIDREG_SHARED_DATA", ROOT.parent / "shared" / "data"))
WORK = Path(os.environ.get("HYBRIDREG_SCALE_DIR", "/tmp/hybridreg-scale"))

#: method -> its CLI arguments
METHODS = {
    "learned": ["--method", "learned"],
    "elastix": ["--method", "elastix", "--params", "em_affine"],
    "hybrid": ["--method", "hybrid"],
}
#: files under FIELDS that are tables, not transforms (small JSON metadata such as a grid
#: description counts as part of the transforms)
TABLE_SUFFIXES = (".csv",)
STACK_VERSION = 1  # bump when build_stack's recipe changes: older stacks are rebuilt


# --- stacks -----------------------------------------------------------------------------------

def _source_z(k: int, depth: int) -> int:
    """Source section of stack section ``k``: 0, 1, ..., depth-1, depth-2, ... (ping-pong)."""
    if depth == 1:
        return 0
    period = 2 * (depth - 1)
    z = k % period
    return z if z < depth else period - z


def _dihedral(tile: np.ndarray, t: int) -> np.ndarray:
    """One of the 8 rotations / flips of a square tile."""
    out = np.rot90(tile, t % 4)
    return out[:, ::-1] if t >= 4 else out


def _tile_variant(i: int, j: int) -> int:
    """The fixed rotation / flip of mosaic tile (i, j); tile (0, 0) is the source as is."""
    return (3 * i + 5 * j + 2 * i * j) % 8


def _fill_section(out: np.ndarray, src: np.ndarray, oy: int, ox: int) -> None:
    """``out`` = the window at (oy, ox) of the plane tiled with ``src``'s variants."""
    size = out.shape[0]
    t = src.shape[0]
    variants = [np.ascontiguousarray(_dihedral(src, v)) for v in range(8)]
    for i in range(oy // t, (oy + size - 1) // t + 1):
        y0, y1 = max(i * t, oy), min((i + 1) * t, oy + size)
        for j in range(ox // t, (ox + size - 1) // t + 1):
            x0, x1 = max(j * t, ox), min((j + 1) * t, ox + size)
            out[y0 - oy:y1 - oy, x0 - ox:x1 - ox] = \
                variants[_tile_variant(i, j)][y0 - i * t:y1 - i * t, x0 - j * t:x1 - j * t]


def stack_recipe(size: int, sections: int, *, source: str, max_shift: int, seed: int) -> dict:
    """What :func:`build_stack` makes (written next to the stack; equal recipe: reused)."""
    return {"version": STACK_VERSION, "size": size, "sections": sections, "source": source,
            "max_shift_px": max_shift, "seed": seed}


def build_stack(size: int, sections: int, out_dir=WORK, *,
                source: str = "vnc2013_stack2_raw.tif", max_shift: int = 4,
                seed: int = 16) -> tuple[Path, dict]:
    """A ``sections x size x size`` uint8 stack tiled from real sections, written page by page.

    Returns ``(path, info)``; ``info`` is the recipe plus the per-section shifts, the build's
    seconds and whether an existing stack was reused. Sections are shifted by whole pixels,
    ``(dy, dx)`` uniform in ``[-max_shift, max_shift]`` (section 0 by none): the content of
    section k sits at ``(y + dy_k, x + dx_k)`` in the source mosaic.
    """
    import tifffile

    out_dir = Path(out_dir).resolve()
    if out_dir == ROOT or ROOT in out_dir.parents:
        raise SystemExit(f"{out_dir}: stacks are kept outside the repository")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"stack_{size}_{sections}.tif"
    meta_path = path.with_suffix(".json")
    recipe = stack_recipe(size, sections, source=source, max_shift=max_shift, seed=seed)
    if path.exists() and meta_path.exists():
        try:
            info = json.loads(meta_path.read_text())
            with tifffile.TiffFile(path) as tif:
                shape, dtype = tuple(tif.series[0].shape), tif.series[0].dtype
            if (shape == (sections, size, size) and dtype == np.uint8
                    and {k: info.get(k) for k in recipe} == recipe):
                return path, {**info, "build_seconds": 0.0, "reused": True}
        except Exception:  # unreadable or half-written: build it again
            pass

    t0 = time.perf_counter()
    src_stack = tifffile.imread(DATA / source)
    if src_stack.ndim != 3 or src_stack.shape[1] != src_stack.shape[2]:
        raise SystemExit(f"{source}: need a stack of square sections, got {src_stack.shape}")
    src_stack = np.asarray(src_stack, dtype=np.uint8)
    depth = src_stack.shape[0]
    rng = np.random.default_rng(seed)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(sections, 2))
    shifts[0] = 0
    page = np.empty((size, size), np.uint8)
    tmp = path.with_name(path.name + ".part")
    bigtiff = sections * size * size > 2 ** 31  # classic TIFF: 4 GiB offsets
    with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for k in range(sections):
            dy, dx = (int(v) for v in shifts[k])
            # offset max_shift + 1 keeps every window inside the mosaic's non-negative tiles
            _fill_section(page, src_stack[_source_z(k, depth)],
                          max_shift + 1 + dy, max_shift + 1 + dx)
            tw.write(page, contiguous=True, metadata={"axes": "ZYX"} if k == 0 else None)
    os.replace(tmp, path)
    info = {**recipe, "shifts_yx": shifts.tolist(),
            "source_z": [_source_z(k, depth) for k in range(sections)],
            "build_seconds": round(time.perf_counter() - t0, 2)}
    meta_path.write_text(json.dumps(info, indent=1))
    return path, {**info, "reused": False}


# --- runs -------------------------------------------------------------------------------------

def hybridreg_command() -> list[str]:
    """The CLI: the ``hybridreg`` script next to this Python, else ``python -m hybridreg.cli``."""
    script = Path(sys.executable).parent / "hybridreg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hybridreg.cli"]


def dir_bytes(path: Path, *, skip_suffixes=()) -> dict:
    """Bytes of the files under ``path`` by kind (``total`` included), skipping some suffixes."""
    kinds: dict[str, int] = {}
    if not path.exists():
        return {"total": 0}
    for p in path.rglob("*"):
        if not p.is_file() or p.suffix in skip_suffixes:
            continue
        rel = p.relative_to(path)
        kind = rel.parts[0] if len(rel.parts) > 1 else (p.suffix.lstrip(".") or "other")
        kinds[kind] = kinds.get(kind, 0) + p.stat().st_size
    kinds["total"] = sum(kinds.values())
    return kinds


def read_pair_seconds(fields: Path) -> tuple[list[float], str]:
    """Per-pair registration seconds: pairs.csv (joint), else sections.csv (k >= 1)."""
    for name in ("pairs.csv", "sections.csv"):
        f = fields / name
        if not f.exists():
            continue
        with open(f, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if name == "sections.csv":
            rows = [r for r in rows if r.get("section") not in ("0", None)]
        secs = [float(r["seconds"]) for r in rows if r.get("seconds") not in ("", None)]
        if secs:
            return secs, name
    return [], ""


def run_one(stack: Path, size: int, sections: int, method: str, *, tile: int, extra: list[str],
            timeout: float, runs_dir: Path, clean: bool) -> dict:
    """One ``hybridreg align`` run under /usr/bin/time, and its figures."""
    run_dir = runs_dir / f"{method}_{size}_{sections}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out, fields = run_dir / "aligned.zarr", run_dir / "fields"
    tiling = ["--tile", str(tile)] if tile and size > tile else []
    cli = [*hybridreg_command(), "align", str(stack), "--out", str(out), "--fields-out",
           str(fields), *METHODS[method], "--no-progress", "--overwrite", *tiling, *extra]
    rss_file = run_dir / "time.txt"
    cmd = ["/usr/bin/time", "-o", str(rss_file), "-f", "%M", *cli]
    row = {"method": method, "size": size, "sections": sections, "hybridreg": git_state(),
           "date": time.strftime("%Y-%m-%d %H:%M"),
           # other work on the machine skews the timings: the 1-minute load at the start
           "load_average_1min": round(os.getloadavg()[0], 2),
           "command": shlex.join(["hybridreg", *cli[len(hybridreg_command()):]])}
    print(f"[{method} {size}^2 x {sections}] {row['command']}", flush=True)
    t0 = time.perf_counter()
    with open(run_dir / "stdout.log", "wb") as so, open(run_dir / "stderr.log", "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
            proc.wait()
            rc = None
    wall = time.perf_counter() - t0
    stderr = (run_dir / "stderr.log").read_text(errors="replace")
    timing = rss_file.read_text(errors="replace") if rss_file.exists() else ""
    rss_kb = [int(x) for x in timing.split() if x.isdigit()]
    killed = re.search(r"terminated by signal (\d+)", timing)
    row.update(returncode=rc, wall_seconds=round(wall, 2),
               peak_rss_gb=round(rss_kb[-1] / 1024 ** 2, 3) if rss_kb else None)
    if rc != 0:
        why = ("timeout" if rc is None else
               f"killed by signal {killed.group(1)}" + (" (out of memory?)"
                                                        if killed.group(1) == "9" else "")
               if killed else f"exit {rc}")
        tail = stderr.strip().splitlines()[-15:]
        row.update(ok=False, error=why, stderr_tail="\n".join(tail))
        print(f"  FAILED: {why}\n    " + "\n    ".join(tail[-5:]), flush=True)
    else:
        row["ok"] = True
    pair_secs, source = read_pair_seconds(fields)
    px = size * size
    image_bytes = sections * px  # uint8
    tb = dir_bytes(fields, skip_suffixes=TABLE_SUFFIXES)
    row.update(
        pairs=len(pair_secs), pair_seconds_from=source or None,
        seconds_per_pair=round(float(np.mean(pair_secs)), 3) if pair_secs else None,
        seconds_per_pair_list=[round(s, 3) for s in pair_secs],
        seconds_first_pair=round(pair_secs[0], 3) if pair_secs else None,  # start-up included
        seconds_per_pair_after_first=(round(float(np.mean(pair_secs[1:])), 3)
                                      if len(pair_secs) > 1 else None),
        reg_mpx_per_s=round(px / float(np.mean(pair_secs)) / 1e6, 3) if pair_secs else None,
        e2e_mpx_per_s=round(image_bytes / wall / 1e6, 3) if rc == 0 else None,
        image_bytes=image_bytes, transform_bytes=tb["total"],
        transform_bytes_by_kind={k: v for k, v in tb.items() if k != "total"},
        transform_percent_of_image=round(100 * tb["total"] / image_bytes, 2),
        aligned_bytes=dir_bytes(out)["total"])
    if row["ok"]:
        print(f"  {wall:.1f} s, {row['seconds_per_pair']} s/pair, peak RSS "
              f"{row['peak_rss_gb']} GB, transforms {human(tb['total'])} "
              f"({row['transform_percent_of_image']} % of the image)", flush=True)
    if clean:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


# --- tables and CLI ---------------------------------------------------------------------------

def human(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def fmt(v, spec) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows) -> None:
    print("| method | size | sections | s/pair | 1st pair s | reg Mpx/s | end-to-end s | "
          "e2e Mpx/s | peak RSS GB | transforms | % of image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        status = "" if r.get("ok") else f" ({r.get('error')})"
        print(f"| {r['method']}{status} | {r['size']} | {r['sections']} | "
              f"{fmt(r.get('seconds_per_pair'), '.2f')} | "
              f"{fmt(r.get('seconds_first_pair'), '.2f')} | "
              f"{fmt(r.get('reg_mpx_per_s'), '.2f')} | "
              f"{fmt(r.get('wall_seconds'), '.1f')} | {fmt(r.get('e2e_mpx_per_s'), '.2f')} | "
              f"{fmt(r.get('peak_rss_gb'), '.2f')} | {human(r.get('transform_bytes'))} | "
              f"{fmt(r.get('transform_percent_of_image'), '.1f')} |")


def sections_for(spec: list[str], size: int) -> int:
    """``--sections``: ``N`` for every size, and/or ``SIZE=N`` for one size; default 20 for
    sizes up to 512, 3 above."""
    n = 20 if size <= 512 else 3
    for item in spec:  # later items win; SIZE=N beats a bare N
        if "=" not in item:
            n = int(item)
    for item in spec:
        if "=" in item and int(item.split("=")[0]) == size:
            n = int(item.split("=")[1])
    return n


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hybridreg"], cwd=ROOT,
                               text=True, capture_output=True).stdout.strip()
        return head + (" (hybridreg/ modified)" if dirty else "")
    except Exception:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 4096, 8192, 16384])
    ap.add_argument("--sections", nargs="+", default=[], metavar="N|SIZE=N",
                    help="sections per stack: N for every size, SIZE=N for one "
                         "(default: 20 up to 512, 3 above)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tile", type=int, default=0,
                    help="--tile PX for sizes above PX (default 0: none given; align plans "
                         "its tiles, --tile auto)")
    ap.add_argument("--extra", default="",
                    help='more `hybridreg align` arguments, e.g. --extra "--threads 2"')
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--source", default="vnc2013_stack2_raw.tif",
                    help="source stack in ../shared/data (square sections)")
    ap.add_argument("--max-shift", type=int, default=4,
                    help="per-section random shift, px (0: none)")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--work-dir", default=str(WORK),
                    help="stacks and runs/ (outside the repository)")
    ap.add_argument("--clean", action="store_true",
                    help="delete each run's outputs once measured (large sizes: disk)")
    ap.add_argument("--build-only", action="store_true", help="build the stacks, run nothing")
    ap.add_argument("--merge", action="store_true",
                    help="keep --out's results for the (method, size) not run now")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args(argv)
    extra = shlex.split(args.extra)
    work = Path(args.work_dir)

    stacks, stack_info = {}, {}
    for size in args.sizes:
        n = sections_for(args.sections, size)
        path, info = build_stack(size, n, work, source=args.source, max_shift=args.max_shift,
                                 seed=args.seed)
        stacks[size] = (path, n)
        stack_info[str(size)] = {"path": str(path), "sections": n,
                                 "build_seconds": info["build_seconds"],
                                 "reused": info["reused"], "shifts_yx": info["shifts_yx"]}
        how = "reused" if info["reused"] else f"built in {info['build_seconds']:.1f} s"
        print(f"stack {size}^2 x {n}: {path} ({how})", flush=True)
    if args.build_only:
        return 0

    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "hybridreg": git_state(), "tile": args.tile, "extra": args.extra,
            "source": args.source, "max_shift_px": args.max_shift, "seed": args.seed,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{ram_gib:.0f} GiB",
            "date": time.strftime("%Y-%m-%d"), "stacks": stack_info}
    results: dict = {}
    out = Path(args.out)
    if args.merge and out.exists():
        results = json.loads(out.read_text()).get("results", {})
    out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        path, n = stacks[size]
        for method in args.methods:
            row = run_one(path, size, n, method, tile=args.tile, extra=extra,
                          timeout=args.timeout, runs_dir=work / "runs", clean=args.clean)
            results[f"{method} {size}"] = row
            out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"results -> {out}\n")
    order = {m: i for i, m in enumerate(METHODS)}
    print_table(sorted(results.values(), key=lambda r: (r["size"], order.get(r["method"], 9))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``hybridreg`` command line: a thin layer over the library.

Every command has ``--help``. Outputs never overwrite an input, and are written atomically.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

#: hybridreg.fields.DEFAULT_STRIDE, without importing numpy and scipy for --help (a test
#: holds them equal)
_DEFAULT_STRIDE = 32

log = logging.getLogger("hybridreg")


# --- helpers ---------------------------------------------------------------------------------

class CLIError(Exception):
    """An error to report to the user in one line, without a traceback."""


def _spacing_xy(stack) -> tuple[float, float]:
    return (float(stack.spacing_xyz[0]), float(stack.spacing_xyz[1]))


def _with_spacing(stack, args):
    """``stack`` with --spacing SX SY [SZ] in place of the file's spacing, if given."""
    given = getattr(args, "spacing", None)
    if not given:
        return stack
    import dataclasses

    if len(given) not in (2, 3) or not all(v > 0 for v in given):
        raise CLIError(f"--spacing takes 2 or 3 positive values (SX SY [SZ]), got {given}")
    xyz = tuple(float(v) for v in given) + tuple(stack.spacing_xyz[len(given):])
    return dataclasses.replace(stack, spacing_xyz=xyz)


def _span(text: str) -> tuple[int | None, int | None]:
    """``START:STOP`` (either may be left out) -> (start, stop), 0-based, stop excluded."""
    a, sep, b = text.partition(":")
    try:
        if sep:
            return (int(a) if a.strip() else None), (int(b) if b.strip() else None)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected START:STOP (0-based, STOP excluded), got "
                                     f"{text!r}")


def _format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


SUMMARY_COLUMNS = ["method", "sections", "epe_mean_px", "epe_p95_px", "folding_fraction",
                   "dice_mean", "pixel_agreement", "ncc_prev", "ncc_ref", "seconds"]


def format_summary(summaries: list[dict]) -> str:
    """The summary table printed by ``metrics`` and ``demo``: one row per method."""
    columns = [c for c in SUMMARY_COLUMNS if any(c in s for s in summaries)]
    return _format_table(summaries, columns)


# --- commands --------------------------------------------------------------------------------

def cmd_phantom(args) -> int:
    from . import io, phantom

    ph = phantom.make_phantom(sections=args.sections, shape_yx=tuple(args.size), seed=args.seed)
    io.write_stack(args.out, ph.stack, overwrite=args.overwrite)
    print(f"phantom: {ph.stack.shape[0]} sections of {ph.stack.shape[1]}x{ph.stack.shape[2]} "
          f"-> {args.out}")
    if args.labels_out:
        io.write_stack(args.labels_out, _labels_for_disk(ph.labels), overwrite=args.overwrite)
        print(f"labels -> {args.labels_out}")
    return 0


def _labels_for_disk(labels):
    import numpy as np

    if labels.max() > np.iinfo(np.uint16).max:
        raise CLIError(f"{int(labels.max())} labels do not fit the uint16 label format")
    return labels.astype(np.uint16)


def cmd_deform(args) -> int:
    import numpy as np

    from . import io, synthetic

    stack = io.read_stack(args.stack)
    labels = None
    if args.labels:
        labels = io.read_stack(args.labels)
        if labels.data.shape != stack.data.shape:
            raise CLIError(f"labels {args.labels} have shape {labels.data.shape}, "
                           f"the stack {args.stack} {stack.data.shape}")
        if not np.issubdtype(labels.data.dtype, np.integer):
            raise CLIError(f"labels {args.labels} must be an integer stack, "
                           f"got {labels.data.dtype}")
    if args.labels_out and labels is None:
        raise CLIError("--labels-out needs --labels")
    defects = [d.strip() for d in (args.defects or "").split(",") if d.strip()]
    if defects and not args.masks_out:
        raise CLIError("--defects needs --masks-out (the defect masks: 0 on a defect, 255 "
                       "on tissue to use)")
    if args.masks_out and not defects:
        raise CLIError("--masks-out needs --defects")
    inputs = [args.stack] + ([args.labels] if args.labels else [])
    spacing_xy = _spacing_xy(stack)
    t0 = time.perf_counter()
    result = synthetic.deform_stack(
        stack.data, seed=args.seed, labels=None if labels is None else labels.data,
        spacing_xy=spacing_xy, max_rotation_deg=args.max_rotation_deg,
        max_shift_px=args.max_shift_px, max_scale=args.max_scale, elastic_px=args.elastic_px,
        elastic_spacing_px=args.elastic_spacing_px, defects=defects,
        defect_fraction=args.defect_fraction)
    io.write_stack(args.out, result.stack, spacing_xyz=stack.spacing_xyz,
                   overwrite=args.overwrite, inputs=inputs)
    io.write_fields(args.fields_out, result.fields, spacing_xy=spacing_xy, origin_xy=(0.0, 0.0),
                    overwrite=args.overwrite)
    if args.labels_out:
        io.write_stack(args.labels_out, result.labels, spacing_xyz=stack.spacing_xyz,
                       overwrite=args.overwrite, inputs=inputs)
    if defects:
        io.write_stack(args.masks_out, result.masks, spacing_xyz=stack.spacing_xyz,
                       overwrite=args.overwrite, inputs=inputs)
        hit = [k for k, d in enumerate(result.defects) if d]
        print(f"defects ({', '.join(defects)}) in sections {hit}; masks -> {args.masks_out}")
    print(f"deformed {result.stack.shape[0]} sections (seed {args.seed}) in "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}; ground-truth recovery fields -> "
          f"{args.fields_out}")
    return 0


def cmd_metrics(args) -> int:
    from . import io, metrics

    aligned = io.read_stack(args.stack)
    spacing_xy = _spacing_xy(aligned)

    def opt_stack(path):
        return None if path is None else io.read_stack(path).data

    fields = true_fields = None
    if args.fields:
        import numpy as np

        from .outputs import read_transforms
        from .stack import DenseFields

        maps, grid = read_transforms(args.fields)
        fields, spacing_xy = np.asarray(DenseFields(maps, grid)), grid.spacing_xy
    if args.truth:
        true_fields, truth_spacing, _ = io.read_fields(args.truth)
        if args.fields and tuple(truth_spacing) != tuple(spacing_xy):
            raise CLIError(f"--truth fields have spacing {truth_spacing}, --fields {spacing_xy}")
        spacing_xy = truth_spacing
        if fields is None:  # nothing registered: the identity
            import numpy as np

            fields = np.zeros_like(true_fields)
    rows = metrics.evaluate_stack(
        aligned=aligned.data, reference=opt_stack(args.reference), fields=fields,
        true_fields=true_fields, labels=opt_stack(args.labels),
        labels_ref=opt_stack(args.reference_labels), spacing_xy=spacing_xy,
        margin_px=args.margin)
    summary = {"method": args.name, **metrics.summarize(rows)}
    if args.csv:
        metrics.write_table_csv(rows, args.csv)
    if args.json:
        metrics.write_json({"summary": summary, "sections": rows}, args.json)
    print(format_summary([summary]))
    return 0


# --- compare and demo ---------------------------------------------------------------------

COMPARE_COLUMNS = ["method", "status", "epe_mean_px", "epe_p95_px", "epe_away_px",
                   "defect_fraction", "ncc_prev", "ssim_prev",
                   "dice_mean", "pixel_agreement", "dice_prev", "folding_fraction", "flagged",
                   "total_seconds", "seconds"]


def format_comparison(comparison) -> str:
    """The summary table of ``compare`` and ``demo``, then each method's failure or note."""
    summaries = comparison.summaries
    columns = [c for c in COMPARE_COLUMNS if any(c in s for s in summaries)
               and (c != "flagged" or any(s.get(c) for s in summaries))]
    lines = [_format_table(summaries, columns)]
    lines += [f"{r.name} ({r.status}): {r.reason}" for r in comparison.runs if r.reason]
    return "\n".join(lines)


def _method_names(values) -> list[str]:
    """``"a,b"`` or ``["a,b", "c"]`` (``--methods``) -> ``["a", "b", "c"]``."""
    if isinstance(values, str):
        values = [values]
    names = [n.strip() for v in values or () for n in str(v).split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise CLIError(f"--methods lists a method twice: {','.join(names)}")
    return names


def _option_value(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _compare_options(args, names: list[str]) -> dict:
    """Per-method options from --params, --model METHOD=PATH and --option METHOD.KEY=VALUE."""
    options: dict = {}

    def put(method, key, value, flag):
        if method not in names:
            raise CLIError(f"{flag} is for method {method!r}, which is not in --methods "
                           f"({','.join(names) or 'none'})")
        options.setdefault(method, {})[key] = value

    if args.params:
        put("elastix", "params", args.params, "--params")
    for item in args.model or ():
        method, sep, path = item.partition("=")
        if not sep or not path:
            raise CLIError(f"--model {item!r}: expected METHOD=PATH, e.g. "
                           f"learned=net.safetensors")
        put(method.strip(), "model", path, "--model")
    for method, key, value in _option_items(args.option):
        put(method, key, value, "--option")
    return options


def _option_items(items) -> list:
    """``[(method, key, value)]`` of --option METHOD.KEY=VALUE (VALUE as JSON or text)."""
    out = []
    for item in items or ():
        lhs, sep, value = item.partition("=")
        method, dot, key = lhs.partition(".")
        if not (sep and dot and method and key):
            raise CLIError(f"--option {item!r}: expected METHOD.KEY=VALUE, e.g. "
                           f"ssemnet.iterations=50")
        out.append((method.strip(), key.strip(), _option_value(value)))
    return out


def _intensity_arg(text: str):
    from .methods.neural import INTENSITY_CHOICES

    if text in INTENSITY_CHOICES:
        return text
    lo, sep, hi = text.partition(":")
    try:
        if sep:
            return float(lo), float(hi)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected {', '.join(INTENSITY_CHOICES)} or LO:HI (the "
                                     f"values that become 0 and 255), got {text!r}")


def _read_labels(path, shape):
    import numpy as np

    from . import io

    labels = io.read_stack(path).data
    if labels.shape != tuple(shape):
        raise CLIError(f"labels {path} have shape {labels.shape}, the stack {tuple(shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise CLIError(f"labels {path} must be an integer stack, got {labels.dtype}")
    return labels


def _cut(data, sections, crop, where: str):
    """``(array, (zs, ys, xs))``: the --sections START:STOP and --crop X Y W H part of a
    lazy stack, read region by region (only what the cut holds)."""
    import numpy as np

    from .io import section_of

    z, h, w = data.shape
    zs = slice(*slice(*(sections or (None, None))).indices(z)[:2])
    if crop is None:
        ys, xs = slice(0, h), slice(0, w)
    else:
        x0, y0, cw, ch = crop
        if cw < 1 or ch < 1 or x0 < 0 or y0 < 0 or x0 + cw > w or y0 + ch > h:
            raise CLIError(f"--crop {x0} {y0} {cw} {ch} is not inside the {w}x{h} (W x H) "
                           f"sections of {where}")
        ys, xs = slice(y0, y0 + ch), slice(x0, x0 + cw)
    if zs.stop - zs.start < 1:
        raise CLIError(f"--sections {sections[0]}:{sections[1]} selects no section of the "
                       f"{z} of {where}")
    out = np.stack([np.asarray(section_of(data, k)[ys, xs]) for k in range(zs.start, zs.stop)])
    return out, (zs, ys, xs)


def cmd_compare(args) -> int:
    from . import compare, io

    from .methods.registry import accepts

    names = _method_names(args.methods)
    options = _compare_options(args, names)
    if args.device:
        for n in names:
            if accepts(n, "device"):
                options.setdefault(n, {}).setdefault("device", args.device)
    tile = None
    if args.tile not in (None, "auto"):
        tile = {"tile_px": args.tile, "overlap_px": args.tile_overlap,
                "coarse": not args.no_coarse}
    elif args.tile_overlap is not None or args.no_coarse:
        raise CLIError("--tile-overlap and --no-coarse need --tile PX")
    compare.check_outputs(args.report, names=names, save_aligned=args.save_aligned,
                          overwrite=args.overwrite)
    stack = _with_spacing(io.read_stack(args.stack, lazy=True), args)
    data, cut = _cut(stack.data, args.sections, args.crop, str(args.stack))
    labels = None
    if args.labels is not None:
        labels = _read_labels(args.labels, stack.data.shape)[cut]
    name = str(args.stack) + ("" if args.sections is None and args.crop is None else
                              f" [sections {cut[0].start}:{cut[0].stop}, rows "
                              f"{cut[1].start}:{cut[1].stop}, columns {cut[2].start}:"
                              f"{cut[2].stop}]")
    case = compare.make_case(data, spacing_xy=_spacing_xy(stack), labels=labels,
                             deform_seed=args.deform_seed, name=name)
    masks = None
    if args.masks == "auto":
        masks = "auto"
    elif args.masks:
        if args.deform_seed is not None:
            raise CLIError("--masks STACK are the given stack's; with --deform-seed the "
                           "methods align a deformed copy: use --masks auto")
        masks = _masks_arg(args.masks, stack.data, str(args.stack))[cut]
    if (args.workers or args.scheduler) and args.mode != "joint":
        raise CLIError("--workers and --scheduler need --mode joint (sequential alignment "
                       "cannot run in parallel)")
    with _dask_client(args) as client:
        comparison = compare.compare_methods(
            case, names, options=options, threads=args.threads, mode=args.mode,
            neighbours=args.neighbours, prior=args.prior, window=args.window,
            margin_px=args.margin, progress=not args.no_progress, client=client,
            intensity=args.intensity, drift_window=args.drift_window, tile=tile,
            masks=masks)
    inputs = [args.stack] + ([args.labels] if args.labels else [])
    written = compare.write_comparison(comparison, args.report, overwrite=args.overwrite,
                                       inputs=inputs, save_aligned=args.save_aligned)
    print(format_comparison(comparison))
    print(f"metrics: {written['csv']}, {written['json']}")
    print(f"report: {Path(written['report']).resolve()}")
    return 0


def cmd_demo(args) -> int:
    """Phantom -> known deformation -> ``compare`` with every method -> report."""
    from . import compare, io, phantom

    out = Path(args.out)
    names = _method_names(args.methods)
    own = [out / n for n in ("phantom.tif", "labels.tif", "deformed.tif",
                             "deformed_labels.tif", "truth")]
    if not args.overwrite:
        for path in own:
            if path.exists():
                raise CLIError(f"{path} exists; pass --overwrite to replace the demo's "
                               f"outputs in {out}")
    compare.check_outputs(out, names=names, save_aligned=True, overwrite=args.overwrite)
    t0 = time.perf_counter()
    ph = phantom.make_phantom(sections=args.sections, shape_yx=(args.size, args.size),
                              seed=args.seed)
    case = compare.make_case(ph.stack, labels=ph.labels, deform_seed=args.seed + 1,
                             name=f"phantom (seed {args.seed})")
    print(f"phantom: {ph.stack.shape[0]} sections of {args.size}x{args.size}, deformed with "
          f"seed {args.seed + 1} ({time.perf_counter() - t0:.1f} s)")
    for path, data in zip(own, (ph.stack, _labels_for_disk(ph.labels), case.stack,
                                _labels_for_disk(case.labels))):
        io.write_stack(path, data, overwrite=args.overwrite)
    io.write_fields(own[-1], case.true_fields, spacing_xy=case.spacing_xy,
                    origin_xy=(0.0, 0.0), overwrite=args.overwrite)
    print(f"methods: {', '.join(names) or 'none'}")
    # ssEMnet without its full-resolution stage: 4x faster (48.6 s -> 10.9 s for a 512 x 512
    # pair on one thread), so that the demo keeps within minutes
    demo_options = {"ssemnet": {"pyramid": (8, 4, 2)}}
    comparison = compare.compare_methods(case, names, threads=args.threads,
                                         options={k: v for k, v in demo_options.items()
                                                  if k in names},
                                         progress=not args.no_progress)
    written = compare.write_comparison(comparison, out, overwrite=args.overwrite,
                                       save_aligned=True)
    print(format_comparison(comparison))
    print("epe: endpoint error against the known deformation (px); total_seconds: the whole "
          "alignment; seconds: registration per section")
    print(f"done in {time.perf_counter() - t0:.0f} s; outputs in {out.resolve()}")
    print(f"report: {Path(written['report']).resolve()}")
    return 0


def _method(args, sample=None):
    """The method of --method with its options; with ``sample`` (the stack, or the two
    sections), the --intensity map of it for the methods that take one (stated on stdout)."""
    from .methods import get_method
    from .methods.registry import accepts, with_intensity

    options = {}
    if args.device:
        if not accepts(args.method, "device"):
            raise CLIError(f"--device is for the learned, ssemnet and hybrid methods, not "
                           f"{args.method}")
        options["device"] = args.device
    for method, key, value in _option_items(args.option):
        if method != args.method:
            raise CLIError(f"--option {method}.{key} is for method {method!r}, not "
                           f"--method {args.method}")
        options[key] = value
    if args.threads:
        options["threads"] = args.threads
    features = getattr(args, "features", None)
    if features and args.method != "hybrid":
        raise CLIError(f"--features is for --method hybrid, not {args.method}")
    preset = getattr(args, "preset", None)
    if preset and args.method != "hybrid":
        raise CLIError(f"--preset is for --method hybrid, not {args.method}")
    if args.method == "elastix":
        if args.params:
            options["params"] = args.params
        if args.model:
            raise CLIError("--model is for the learned, ssemnet and hybrid methods, not "
                           "elastix")
    elif args.method == "hybrid":
        if args.params:
            if len(args.params) != 1:
                raise CLIError("--method hybrid takes one B-spline parameter file in --params "
                               "(it refines the learned field)")
            options["params"] = args.params[0]
        if args.model:
            options["model"] = args.model
        if features:
            options["features"] = features
        if preset:
            options["preset"] = preset
    else:
        if args.params:
            raise CLIError(f"--params is for --method elastix or hybrid, not {args.method}")
        if args.model:
            options["model"] = args.model
    if sample is not None:
        options, imap = with_intensity(args.method, options, sample, args.intensity)
        if imap is not None:
            print(f"intensities: {imap.note} (--intensity "
                  f"{args.intensity if isinstance(args.intensity, str) else 'LO:HI'})")
    return _preflight(get_method(args.method, **options))


def _preflight(method):
    """Load what ``method`` needs (its networks) now, before any work: a corrupt or
    mismatched --model or --features is one line here, not a traceback mid-run."""
    parts = [method, getattr(method, "learned", None)]
    try:
        for part in parts:
            if part is not None and hasattr(part, "network"):
                part.network()
        if hasattr(method, "autoencoder"):
            method.autoencoder()
    except (ValueError, OSError) as exc:
        raise CLIError(f"{exc}") from None
    return method


def _refuse_onto_input(outputs, inputs) -> None:
    """Before any work: no output may overwrite, contain or lie inside an input."""
    from .io.atomic import refuse_inputs
    from .io.base import split_spec

    for out in outputs:
        if out is None:
            continue
        file, inner = split_spec(str(out))
        try:
            refuse_inputs(file, inner, [str(i) for i in inputs if i is not None], str(out))
        except ValueError as exc:
            raise CLIError(str(exc)) from None


def _tiled(args, method, stack=None):
    """Wrap ``method`` in a TiledMethod for --tile PX [--tile-overlap PX] [--no-coarse].

    With ``stack`` (align): --tile auto (the default) tiles sections too large for
    --memory-limit, and a given --tile is checked against it before any work starts."""
    import numpy as np

    tile = args.tile
    if stack is not None:
        from .tiling import plan_tile

        z, h, w = stack.shape
        try:
            tile = plan_tile((h, w), itemsize=np.dtype(stack.dtype).itemsize,
                             method=method.name, limit_bytes=args.memory_limit * 1e9,
                             tile_px=None if tile in (None, "auto") else tile,
                             sections_held=args.neighbours + 2 if args.mode == "joint"
                             else args.window + 2, regions=hasattr(stack, "plane"),
                             sections=z, neighbours=args.neighbours if args.mode == "joint"
                             else 0)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        if tile and args.tile in (None, "auto"):
            log.info("sections of %dx%d px: registered over tiles of %d px (--tile auto, "
                     "--memory-limit %g GB)", h, w, tile, args.memory_limit)
    elif tile == "auto":
        tile = None
    if not tile:
        if args.tile_overlap is not None or args.no_coarse:
            raise CLIError("--tile-overlap and --no-coarse need --tile PX")
        return method
    from .tiling import AUTO_COARSE_PX, AUTO_OVERLAP_PX, TiledMethod

    auto = stack is not None and args.tile in (None, "auto")
    try:
        return TiledMethod(method, tile_px=tile,
                           overlap_px=(AUTO_OVERLAP_PX if auto and args.tile_overlap is None
                                       else args.tile_overlap),
                           coarse=not args.no_coarse,
                           coarse_px=AUTO_COARSE_PX if auto else None)
    except ValueError as exc:
        raise CLIError(f"--tile {tile} --tile-overlap {args.tile_overlap}: {exc}") from None


def _tile_arg(text: str):
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a tile size in pixels or 'auto', got "
                                         f"{text!r}") from None


def _read_section(path):
    from . import io

    stack = io.read_stack(path)
    if stack.data.shape[0] != 1:
        raise CLIError(f"{path} holds {stack.data.shape[0]} sections; register takes one "
                       f"section per image (use align for a stack)")
    return stack


def cmd_register(args) -> int:
    import numpy as np

    from .outputs import write_registration

    _refuse_onto_input([args.out, args.fields_out], [args.fixed, args.moving])
    fixed = _with_spacing(_read_section(args.fixed), args)
    moving = _with_spacing(_read_section(args.moving), args)
    if fixed.data.shape != moving.data.shape:
        raise CLIError(f"fixed {args.fixed} {fixed.data.shape[1:]} and moving {args.moving} "
                       f"{moving.data.shape[1:]} must have the same size")
    spacing_xy = _spacing_xy(fixed)
    from .stack import MIN_USEFUL_PX

    if min(fixed.data.shape[1:]) < MIN_USEFUL_PX:
        log.warning("sections of %dx%d px are too small to register reliably (every method "
                    "needs at least %d px a side); expect little or no alignment",
                    *fixed.data.shape[1:], MIN_USEFUL_PX)
    method = _tiled(args, _method(args, np.concatenate([fixed.data, moving.data])))
    masks = {}
    for key, path in (("fixed_mask", args.fixed_mask), ("moving_mask", args.moving_mask)):
        if path is None:
            continue
        from .methods.base import checked_mask, takes_masks

        flag = "--" + key.replace("_", "-")
        if not takes_masks(method):
            raise CLIError(f"{flag}: the {method.name} method does not take masks")
        mask = _read_section(path).data[0]
        if mask.shape != fixed.data.shape[1:]:
            raise CLIError(f"{flag} {path} is {mask.shape[1]}x{mask.shape[0]} (W x H), the "
                           f"sections {fixed.data.shape[2]}x{fixed.data.shape[1]}")
        masks[key] = checked_mask(mask, mask.shape, f"{flag} {path}")
    res = method.register(fixed.data[0].astype("float32"), moving.data[0].astype("float32"),
                          spacing_xy=spacing_xy, **masks)
    last = write_registration(res, out=args.out, moving=moving, fields_out=args.fields_out,
                              spacing_xy=spacing_xy, overwrite=args.overwrite,
                              inputs=[args.fixed, args.moving])
    if last is not None:
        print(f"transformix chain: transformix -in MOVING -out DIR -tp {last}")
    for warning in res.warnings:
        print(f"warning: {warning}")
    name = getattr(method, "metric_name", None) or "the method's final metric"
    metric = "" if res.metric is None else f"; {name}: {res.metric:.4g}"
    print(f"registered {args.moving} to {args.fixed} with {method.name} in "
          f"{res.seconds:.1f} s{metric} -> {args.out}")
    return 0


def _masks_arg(value, data, where: str):
    """``--masks``: None, the lazy mask stack of a path (checked against the stack's shape),
    or ``auto``: the masks :func:`hybridreg.defects.detect_defects` finds, section by
    section."""
    if not value:
        return None
    if value == "auto":
        from .defects import stack_masks

        return stack_masks(value, data)
    from . import io

    masks = io.read_stack(value, lazy=True).data
    if tuple(masks.shape) != tuple(data.shape):
        raise CLIError(f"--masks {value} holds {masks.shape[0]} sections of "
                       f"{masks.shape[2]}x{masks.shape[1]} (W x H), the stack {where} "
                       f"{data.shape[0]} of {data.shape[2]}x{data.shape[1]}: one mask per "
                       f"section, the same size")
    return masks


def cmd_defects(args) -> int:
    from . import io
    from .defects import DetectedMasks
    from .outputs import write_stack_sections

    _refuse_onto_input([args.out], [args.stack])
    stack = io.read_stack(args.stack, lazy=True)
    if Path(args.out).exists() and not args.overwrite:
        raise CLIError(f"{args.out} exists; pass --overwrite to replace it")
    options = {k: v for k, v in (("percentile", args.percentile),
                                 ("min_area_px", args.min_area),
                                 ("dilate_px", args.dilate)) if v is not None}
    import numpy as np

    masks = DetectedMasks(stack.data, **options)
    write_stack_sections(args.out, masks, shape_zyx=stack.data.shape, dtype=np.uint8,
                         spacing_xyz=stack.spacing_xyz, unit=stack.unit,
                         overwrite=args.overwrite, inputs=[args.stack],
                         progress=not args.no_progress)
    from .defects import mask_fraction

    areas = [1.0 - mask_fraction(io.read_stack(args.out, lazy=True).data[k])
             for k in range(stack.data.shape[0])]
    hit = [k for k, a in enumerate(areas) if a > 0]
    print(f"defects in {len(hit)} of {len(areas)} sections"
          + (": " + ", ".join(f"{k} ({100 * areas[k]:.2f}%)" for k in hit[:20])
             + (" ..." if len(hit) > 20 else "") if hit else "")
          + f"; masks (255 = tissue, 0 = defect) -> {args.out}")
    return 0


def cmd_align(args) -> int:
    import contextlib
    import shutil

    from . import io
    from .stack import align_stack, save_alignment

    # lazily: sections are read when a pair needs them (a bare .zarr output is written
    # section by section), so stacks larger than memory can be aligned
    stack = _with_spacing(io.read_stack(args.stack, lazy=True), args)
    fields_out = Path(args.fields_out)
    _refuse_onto_input([args.out, fields_out], [args.stack, args.masks])
    work = fields_out / "work"
    if work.exists() and not args.resume:
        raise CLIError(f"{work} holds an interrupted run; pass --resume to continue it, or "
                       f"remove it to start over")
    # outputs found next to an interrupted run's work folder are that run's: finish them
    resuming = bool(args.resume and work.exists())
    done = [Path(args.out), fields_out / "section_0000.mha"]
    if args.resume and not resuming and not args.overwrite and all(p.exists() for p in done):
        print(f"nothing to resume: {args.out} and {fields_out} are there and {work} holds no "
              f"interrupted run, so the run is complete (--overwrite runs it again)")
        return 0
    if not resuming:
        for target in (Path(args.out), fields_out / "section_0000.mha"):
            if target.exists() and not args.overwrite:
                raise CLIError(f"{target} exists; pass --overwrite to replace the outputs")
    if (args.workers or args.scheduler) and args.mode != "joint":
        raise CLIError("--workers and --scheduler need --mode joint (sequential alignment "
                       "cannot run in parallel)")
    if args.node_weights and args.mode != "joint":
        raise CLIError("--node-weights needs --mode joint (the sequential chain has no solve "
                       "to weight)")
    method = _tiled(args, _method(args, stack.data), stack.data)
    masks = _masks_arg(args.masks, stack.data, str(args.stack))
    if masks is not None:
        from .methods.base import takes_masks

        if not takes_masks(method):  # (every built-in method takes them; a plug-in may not)
            raise CLIError(f"--masks: the {method.name} method does not take masks")
    t0 = time.perf_counter()
    with _dask_client(args) as client:
        try:
            result = align_stack(stack.data, method, spacing_xy=_spacing_xy(stack),
                                 mode=args.mode, neighbours=args.neighbours, prior=args.prior,
                                 anchor=args.anchor, window=args.window,
                                 drift_window=args.drift_window,
                                 work_dir=work,
                                 progress=not args.no_progress, client=client,
                                 stride=args.stride or _DEFAULT_STRIDE, masks=masks,
                                 max_skip=args.max_skip, node_weights=args.node_weights)
        except ValueError:
            # a user error found on the first pair (a parameter map elastix cannot run):
            # a work folder with nothing finished in it must not block the corrected rerun
            if not resuming and work.is_dir() and not any(
                    p.suffix == ".json" and p.name != "manifest.json" for p in work.iterdir()):
                shutil.rmtree(work, ignore_errors=True)
                with contextlib.suppress(OSError):
                    fields_out.rmdir()  # only when empty
            raise
        # the aligned sections of a zarr output are rendered and written by the workers
        save_alignment(result, out=args.out, fields_out=fields_out, overwrite=args.overwrite,
                       resume=resuming, inputs=[args.stack], dtype=stack.data.dtype,
                       spacing_xyz=stack.spacing_xyz, unit=stack.unit,
                       progress=not args.no_progress, dense_fields=args.dense_fields,
                       client=client)
    shutil.rmtree(work, ignore_errors=True)
    flagged = [r["section"] for r in result.table if r.get("flagged")]
    print(f"aligned {stack.data.shape[0]} sections with {method.name} ({args.mode}) in "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}; fields and transforms -> "
          f"{fields_out}")
    if flagged:
        print(f"flagged sections (see {fields_out / 'sections.csv'}): {flagged}")
    return 0


class _dask_client:
    """A Dask client for --workers N (a local cluster of processes) or --scheduler ADDRESS."""

    def __init__(self, args):
        self.args = args
        self.client = self.cluster = None

    def __enter__(self):
        if self.args.scheduler:
            from dask.distributed import Client

            self.client = Client(self.args.scheduler)
        elif self.args.workers:
            from dask.distributed import Client, LocalCluster

            self.cluster = LocalCluster(n_workers=self.args.workers, threads_per_worker=1,
                                        processes=True, dashboard_address=None)
            self.client = Client(self.cluster)
        return self.client

    def __exit__(self, *exc):
        if self.cluster is not None:
            # the workers leave while the scheduler still listens: closed the other way round,
            # a worker's heartbeat can find the scheduler gone and log an error
            try:
                self.cluster.scale(0)
                deadline = time.monotonic() + 30
                while self.client.scheduler_info()["workers"] and time.monotonic() < deadline:
                    time.sleep(0.1)
            except Exception as err:  # closing below stops them either way
                log.debug("workers did not retire: %s", err)
        for thing in (self.client, self.cluster):
            if thing is not None:
                thing.close()
        return False


def cmd_apply(args) -> int:
    from . import io
    from .outputs import write_stack_sections
    from .stack import AlignedSections

    from .outputs import read_transforms

    _refuse_onto_input([args.out], [args.stack, args.fields])
    # lazily: one section at a time (large ones region by region), into any output
    stack = io.read_stack(args.stack, lazy=True)
    maps, grid = read_transforms(args.fields)
    if len(maps) != stack.data.shape[0] or grid.shape_yx != stack.data.shape[1:]:
        raise CLIError(f"{args.fields} holds the transforms of {len(maps)} sections of "
                       f"{grid.shape_yx[0]}x{grid.shape_yx[1]}, the stack {args.stack} "
                       f"{stack.data.shape[0]} sections of "
                       f"{stack.data.shape[1]}x{stack.data.shape[2]}")
    if bool(args.masks) != bool(args.masks_out):
        raise CLIError("--masks and --masks-out go together")
    if args.masks == "auto":
        raise CLIError("apply --masks takes a mask stack (write one with `hybridreg defects`)")
    masks = _masks_arg(args.masks, stack.data, str(args.stack))
    if masks is not None:
        _refuse_onto_input([args.masks_out], [args.stack, args.fields, args.masks, args.out])
        if Path(args.masks_out).exists() and not args.overwrite:
            raise CLIError(f"{args.masks_out} exists; pass --overwrite to replace it")
    order = 0 if args.nearest else 1
    if (args.workers or args.scheduler) and not io.is_ome_zarr_target(args.out):
        raise CLIError("--workers and --scheduler write a bare .zarr output (each worker "
                       "writes the sections it renders); give --out a store.zarr path")
    # section by section, rendered from the maps chunk by chunk: never the whole volume
    warped = AlignedSections(stack.data, maps, grid, order=order, dtype=stack.data.dtype)
    with _dask_client(args) as client:
        write_stack_sections(args.out, warped, shape_zyx=stack.data.shape,
                             dtype=stack.data.dtype, spacing_xyz=stack.spacing_xyz,
                             unit=stack.unit, overwrite=args.overwrite, inputs=[args.stack],
                             client=client)
    kind = "nearest neighbour" if args.nearest else "linear"
    print(f"applied {len(maps)} transforms ({kind}) -> {args.out}")
    if masks is not None:
        import numpy as np

        # nearest neighbour: a defect stays a defect; outside the section counts as tissue
        # no more than as defect: it is 0, as elastix's masks outside the image
        aligned = AlignedSections(masks, maps, grid, order=0, dtype=np.uint8)
        write_stack_sections(args.masks_out, aligned, shape_zyx=masks.shape, dtype=np.uint8,
                             spacing_xyz=stack.spacing_xyz, unit=stack.unit,
                             overwrite=args.overwrite, inputs=[args.masks])
        print(f"aligned masks -> {args.masks_out}")
    return 0


def _training_stacks(paths):
    from . import io

    return [io.read_stack(p).data for p in paths]


def _print_log(what, log, out):
    final = ", ".join(f"{k} {v:.4g}" for k, v in log.final.items()
                      if isinstance(v, (int, float)))
    print(f"{what}: {log.steps} steps in {log.seconds:.0f} s on {log.device} ({final}) -> {out}")


def cmd_train_features(args) -> int:
    from .training import train_features

    log = train_features(_training_stacks(args.stacks), out=args.out, crop=args.crop,
                         batch=args.batch, steps=args.steps, lr=args.lr, seed=args.seed,
                         device=args.device, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.no_progress)
    _print_log("feature autoencoder", log, args.out)
    return 0


def cmd_train(args) -> int:
    from .training import train_registration

    log = train_registration(
        _training_stacks(args.stacks), out=args.out, features=args.features,
        preset=args.preset, references=args.references, crop=args.crop, batch=args.batch,
        steps=args.steps, lr=args.lr, seed=args.seed, device=args.device, resume=args.resume,
        overwrite=args.overwrite, progress=not args.no_progress)
    _print_log("registration network", log, args.out)
    return 0


def cmd_finetune(args) -> int:
    from .training import finetune
    from .weights import default_weights

    init = args.model or default_weights("faemreg_compact")
    log = finetune(_training_stacks(args.stacks), init=init, out=args.out, steps=args.steps,
                   crop=args.crop, batch=args.batch,
                   seed=args.seed, device=args.device, resume=args.resume,
                   overwrite=args.overwrite, progress=not args.no_progress)
    _print_log("fine-tuned network", log, args.out)
    return 0


# --- parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .methods import ALL_METHODS

    parser = argparse.ArgumentParser(
        prog="hybridreg",
        description="Learned, iterative and hybrid registration of serial-section EM stacks.",
        epilog="Stacks: multi-page TIFF, a folder of TIFF/PNG sections, HDF5 "
               "(file.h5:/dataset), zarr, and to read .mha/.mhd/.nrrd/.nii(.gz). Fields: "
               "one .mha per section, DIR/section_0000.mha.")
    parser.add_argument("--version", action="version", version=f"hybridreg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    # -q and --log on the top level and on every command (before or after its name); the
    # commands' copies default to SUPPRESS so that they never clobber the top level's
    for target, default in ((parser, None), (common := argparse.ArgumentParser(
            add_help=False), argparse.SUPPRESS)):
        target.add_argument("-q", "--quiet", action="store_true",
                            default=False if default is None else default,
                            help="print errors only: no progress bars, no summary lines")
        target.add_argument("--log", metavar="FILE", default=default,
                            help="also write the log (INFO, or DEBUG with -vv) to FILE, "
                                 "appended, with times")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], **k)

    p = sub.add_parser("phantom", help="write a procedural serial-EM phantom stack",
                       description="Write a procedural serial-EM phantom: sections cut through a "
                                   "3D volume of cells, with instance labels.")
    p.add_argument("--out", required=True, help="output stack")
    p.add_argument("--labels-out", help="output instance labels (uint16)")
    p.add_argument("--sections", type=int, default=16, help="number of sections (default 16)")
    p.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                   help="section size in pixels (default 256 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("deform", help="deform a stack with known random deformations",
                       description="Deform every section but the first with an independent random "
                                   "affine + smooth elastic deformation, and save the exact "
                                   "ground-truth recovery fields (pull convention, physical "
                                   "units), one .mha per section; section 0 is the identity.")
    p.add_argument("stack", help="input stack")
    p.add_argument("--out", required=True, help="deformed stack")
    p.add_argument("--fields-out", required=True, help="folder for the ground-truth fields")
    p.add_argument("--labels", help="labels of the input stack, deformed with nearest neighbour")
    p.add_argument("--labels-out", help="deformed labels")
    p.add_argument("--seed", type=int, required=True, help="random seed")
    p.add_argument("--max-rotation-deg", type=float, default=2.0,
                   help="largest rotation in degrees (default 2)")
    p.add_argument("--max-shift-px", type=float, default=12.0,
                   help="largest shift per axis in pixels (default 12)")
    p.add_argument("--max-scale", type=float, default=0.02,
                   help="largest relative scale change (default 0.02)")
    p.add_argument("--elastic-px", type=float, default=6.0,
                   help="largest elastic control-point displacement in pixels (default 6)")
    p.add_argument("--elastic-spacing-px", type=float, default=64.0,
                   help="elastic control-grid spacing in pixels (default 64)")
    p.add_argument("--defects", metavar="KIND[,KIND]",
                   help="also add section defects: folds, cracks, debris (comma-separated); "
                        "the truth fields stay exact (a crack's sides apart, a fold's band "
                        "collapsed onto its line); the same --seed without --defects gives "
                        "the same case without them")
    p.add_argument("--defect-fraction", type=float, default=0.5, metavar="P",
                   help="probability per section and kind of defect (default 0.5)")
    p.add_argument("--masks-out", help="with --defects: the defect masks (uint8; 0 on a "
                                       "defect, 255 on tissue to use: elastix's convention)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(func=cmd_deform)

    p = sub.add_parser("metrics", help="per-section metrics of an aligned stack",
                       description="Per-section metrics of an (aligned) stack: similarity to the "
                                   "previous section, and where given, to a reference stack, "
                                   "endpoint error against ground-truth fields, folding, label "
                                   "overlap. Without --fields, the fields are the identity "
                                   "(the metrics of doing nothing).")
    p.add_argument("stack", help="the aligned (or deformed) stack")
    p.add_argument("--reference", help="the undeformed stack, where known")
    p.add_argument("--fields", help="folder of the estimated recovery fields")
    p.add_argument("--truth", help="folder of the ground-truth recovery fields")
    p.add_argument("--labels", help="labels of the unaligned stack (warped with --fields)")
    p.add_argument("--reference-labels", help="labels of the reference stack")
    p.add_argument("--margin", type=int, default=16,
                   help="pixels left out at each edge (default 16)")
    p.add_argument("--name", default="-", help="method name for the table")
    p.add_argument("--csv", help="write the per-section table as CSV")
    p.add_argument("--json", help="write summary and sections as JSON")
    p.set_defaults(func=cmd_metrics)

    def method_options(p):
        p.add_argument("--method", default="elastix",
                       choices=["elastix", "learned", "ssemnet", "hybrid"],
                       help="registration method (default elastix). Measured per 512 x 512 "
                            "pair on 2 CPU cores (benchmarks/RESULTS.md): learned 0.06 s (one "
                            "pass of the network), elastix's chain em_affine + em_bspline "
                            "4.9 s, hybrid 1.9 s, ssemnet (an optimisation per pair) 3.3 s; "
                            "ssemnet at 1024 x 1024: 21 s and 1.9 GB peak")
        p.add_argument("--model", help="learned, hybrid: the registration network "
                                       "(.safetensors); ssemnet: the feature autoencoder; "
                                       "default: the shipped weights")
        p.add_argument("--features", help="hybrid: the feature autoencoder of the extra "
                                          "similarity channels (default: the shipped one)")
        p.add_argument("--preset", choices=["accurate", "fast"],
                       help="hybrid: accurate (default; a smooth and a detail refinement, "
                            "about 2 s per 512x512 pair on 2 cores) or fast (the learned "
                            "field, then one coarse refinement, about 0.4 s)")
        p.add_argument("--params", nargs="+", metavar="FILE",
                       help="elastix parameter files, applied in order (a chain); also the "
                            "shipped names em_rigid, em_affine, em_bspline or itk's defaults "
                            "translation, rigid, affine, bspline (default: em_affine "
                            "em_bspline); hybrid: one B-spline map to adapt for the "
                            "refinement")
        p.add_argument("--threads", type=int, help="CPU threads of the method")
        p.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE",
                       help="any option of the method, VALUE as JSON or text, e.g. "
                            "learned.references=1 (repeatable; as on compare)")
        shared_options(p)
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    def shared_options(p):
        """What register, align and compare share beyond the method's own options."""
        p.add_argument("--device", metavar="cpu|cuda|auto",
                       help="learned, ssemnet, hybrid: where the networks run (default: the "
                            "method's, auto = CUDA when available)")
        p.add_argument("--spacing", type=float, nargs="+", metavar="S",
                       help="SX SY [SZ]: the physical spacing of the input, in place of the "
                            "file's (fields and transforms are in its units)")
        intensity_option(p)

    def intensity_option(p):
        p.add_argument("--intensity", type=_intensity_arg, default="auto",
                       metavar="auto|percentiles|none|LO:HI",
                       help="learned, ssemnet, hybrid: how intensities are put on the "
                            "networks' 0-255 scale, one map for the whole stack. auto "
                            "(default): uint8 and floats within 0..255 as they are, floats "
                            "within 0..1 times 255, anything else (uint16, ...) by its 0.1 "
                            "and 99.9 percentiles; percentiles: that for any dtype; none: "
                            "as they are; LO:HI: LO to 0 and HI to 255")

    def cluster_options(p):
        p.add_argument("--workers", type=int, help="joint: register the pairs on a local Dask "
                                                   "cluster of this many worker processes")
        p.add_argument("--scheduler", metavar="ADDRESS",
                       help="joint: register the pairs on an existing Dask scheduler "
                            "(docs/cluster.md)")

    def tile_options(p, auto=False):
        p.add_argument("--tile", type=_tile_arg, metavar="PX",
                       help="register large sections coarse-then-fine over tiles of PX "
                            "pixels, blending the tiles' fields (hybridreg.tiling)"
                            + ("; auto (default): tiles only for sections too large for "
                               "--memory-limit" if auto else ""))
        if auto:
            p.add_argument("--memory-limit", type=float, default=4.0, metavar="GB",
                           help="refuse before starting a run that would need more memory "
                                "than this (default 4 GB); --tile auto picks the largest "
                                "tile that fits")
        p.add_argument("--tile-overlap", type=int, metavar="PX",
                       help="least overlap of neighbouring tiles (default: PX / 4)")
        p.add_argument("--no-coarse", action="store_true",
                       help="tiles only, without the coarse whole-section pass first")

    p = sub.add_parser("register", help="register one section to another",
                       description="Register MOVING onto FIXED (single-section images).")
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("--out", required=True, help="the warped moving section")
    p.add_argument("--fields-out", help="folder for the field (section_0000.mha), the ITK "
                                        "transform (.h5) and elastix's transformix chain")
    p.add_argument("--fixed-mask", metavar="MASK",
                   help="elastix, hybrid: where the similarity is measured in FIXED (elastix's "
                        "convention: nonzero = tissue to use, zero = excluded, e.g. a fold)")
    p.add_argument("--moving-mask", metavar="MASK", help="the same for MOVING")
    method_options(p)
    tile_options(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("align", help="align a whole stack",
                       description="Align a stack. joint (default): every section is "
                                   "registered to its --neighbours next sections and all "
                                   "transforms are solved at once, spreading the pairs' "
                                   "errors instead of chaining them. sequential: each section "
                                   "to the aligned one before it (drifts on long stacks). "
                                   "Interrupted runs continue with --resume.")
    p.add_argument("stack")
    p.add_argument("--out", required=True,
                   help="the aligned stack (a bare .zarr: an OME-Zarr image written section "
                        "by section; --resume fills in the sections an interruption left out)")
    p.add_argument("--fields-out", required=True,
                   help="folder for the per-section fields (.mha), ITK transforms (.h5), "
                        "transformix chains and sections.csv")
    p.add_argument("--mode", choices=["joint", "sequential"], default="joint")
    p.add_argument("--neighbours", type=int, default=1,
                   help="joint: pairs per section (default 1)")
    p.add_argument("--prior", type=float, default=0.3,
                   help="joint: weight of the small-distortion prior (default 0.3)")
    p.add_argument("--anchor", type=int, metavar="K",
                   help="joint: keep section K (0-based) where it is, e.g. a section known to "
                        "be undistorted (default: none; the stack stays on average where the "
                        "raw sections were)")
    p.add_argument("--window", type=int, default=1,
                   help="sequential: aligned sections the method sees (default 1)")
    p.add_argument("--drift-window", type=int, default=0, metavar="N",
                   help="sequential: subtract from each field the mean of the fields of the N "
                        "sections centred on it, against accumulated drift (default 0: off)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from FIELDS_OUT/work")
    cluster_options(p)
    p.add_argument("--stride", type=int, metavar="PX",
                   help="pixels between the nodes of the coarse maps that hold every "
                        f"transform (default {_DEFAULT_STRIDE}; 1 = dense fields, 8 bytes a "
                        "pixel per section in memory and on disk)")
    p.add_argument("--masks", metavar="STACK",
                   help="defect masks, one per section (elastix's convention: nonzero = "
                        "tissue to use, zero = a fold, crack, debris), or 'auto' (found by "
                        "`hybridreg defects` on the fly, each section twice: for "
                        "large stacks write them once with `hybridreg defects` and pass "
                        "them): each pair's registration ignores "
                        "its masked pixels, its map trusts no motion near them, and a section "
                        "mostly masked is skipped")
    p.add_argument("--max-skip", type=int, default=3, metavar="N",
                   help="with --masks: bridge at most N skipped sections in a row (default 3)")
    p.add_argument("--node-weights", action="store_true",
                   help="joint mode: weight each pair's map per node in the solve by how "
                        "well it matched there (local NCC after registration; off by "
                        "default: it did not lower the error on the defect benchmark)")
    p.add_argument("--dense-fields", action="store_true",
                   help="also write every dense field to FIELDS_OUT/dense/ (large: 8 bytes "
                        "a pixel before compression)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    method_options(p)
    tile_options(p, auto=True)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("apply", help="apply saved fields to a stack",
                       description="Warp every section of STACK with its saved field "
                                   "(e.g. labels with --nearest).")
    p.add_argument("stack")
    p.add_argument("--fields", required=True, help="folder of section_kkkk.mha fields")
    p.add_argument("--out", required=True)
    p.add_argument("--nearest", action="store_true",
                   help="nearest-neighbour interpolation, keeping the dtype (labels)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--workers", type=int, help="render the sections on a local Dask cluster "
                                               "of this many worker processes (a .zarr --out)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="render the sections on an existing Dask scheduler; each worker "
                        "writes the sections it renders (a .zarr --out; docs/cluster.md)")
    p.add_argument("--masks", metavar="STACK",
                   help="defect masks of STACK, warped with the same fields into --masks-out")
    p.add_argument("--masks-out", metavar="OUT", help="the aligned masks (with --masks)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("defects", help="find defects in a stack and write their masks",
                       description="Find folds, cracks, debris, blank and saturated regions in "
                                   "every section of STACK (flat, extreme grey values) and "
                                   "write masks in elastix's convention: 255 = tissue, 0 = "
                                   "defect (for --masks of align, compare, register).")
    p.add_argument("stack")
    p.add_argument("--out", required=True, help="the mask stack (uint8)")
    p.add_argument("--percentile", type=float,
                   help="grey values at or beyond this percentile of the tissue's count as "
                        "extreme (default 1)")
    p.add_argument("--min-area", type=int, metavar="PX",
                   help="smallest defect kept, pixels of its flat core (default 16)")
    p.add_argument("--dilate", type=int, metavar="PX",
                   help="grow each defect by this much (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_defects)

    def training_options(p, *, steps, crop, batch, lr):
        p.add_argument("stacks", nargs="+", help="aligned training stacks")
        p.add_argument("--out", required=True, help="weights (.safetensors)")
        p.add_argument("--steps", type=int, default=steps, help=f"default {steps}")
        p.add_argument("--crop", type=int, default=crop, help=f"crop size (default {crop})")
        p.add_argument("--batch", type=int, default=batch, help=f"default {batch}")
        if lr is not None:
            p.add_argument("--lr", type=float, default=lr, help=f"default {lr}")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
        p.add_argument("--resume", action="store_true", help="continue from OUT's state file")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("train-features", help="train the feature autoencoder",
                       description="Train the feature autoencoder (ssEMnet/FAEMReg) on sections "
                                   "of the given stacks, unsupervised.")
    training_options(p, steps=2000, crop=128, batch=8, lr=1e-3)
    p.set_defaults(func=cmd_train_features)

    p = sub.add_parser("train", help="train the registration network",
                       description="Train the FAEMReg-style network on aligned stacks: windows "
                                   "of aligned sections, the moving one deformed synthetically; "
                                   "loss: feature similarity (with --features), smoothness and "
                                   "the endpoint error against the known synthetic field.")
    training_options(p, steps=5000, crop=256, batch=4, lr=1e-4)
    p.add_argument("--features", help="a trained feature autoencoder (.safetensors)")
    p.add_argument("--preset", default="compact",
                   choices=["compact", "compact-flownet", "paper", "tiny", "tiny-pyramid"])
    p.add_argument("--references", type=int, default=3, help="aligned sections in the window")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="adapt a registration network to your stack",
                       description="Fine-tune a registration network (default: the shipped "
                                   "one) on your aligned stack(s), a few hundred steps.")
    training_options(p, steps=300, crop=256, batch=4, lr=None)
    p.add_argument("--model", help="the network to start from (default: the shipped weights)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="run several methods on one stack and report",
                       description="Align STACK with every method (the same stack mode and "
                                   "settings for all) and compare them: per-section and "
                                   "overall metrics (endpoint error where the ground truth is "
                                   "known, NCC and SSIM between neighbouring aligned "
                                   "sections, label overlap, folding, time) in "
                                   "REPORT/metrics.csv and metrics.json, and a self-contained "
                                   "HTML report, REPORT/report.html. With --deform-seed the "
                                   "methods align a synthetically deformed copy of STACK "
                                   "whose ground truth is known (as `hybridreg deform`). A "
                                   "method that fails or is unavailable (e.g. missing "
                                   "weights) is reported with the reason; the others run.")
    p.add_argument("stack", help="the stack to align")
    p.add_argument("--masks", metavar="STACK",
                   help="defect masks of STACK (elastix's convention: nonzero = tissue), or "
                        "'auto' (found by `hybridreg defects`, also on a --deform-seed "
                        "copy): every method aligns with them (joint mode), and the metrics "
                        "leave the defects out and add the defect area and the error away "
                        "from defects")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), metavar="M",
                   help=f"methods, by spaces or commas (default {' '.join(ALL_METHODS)})")
    p.add_argument("--report", required=True, metavar="DIR",
                   help="output folder: metrics.csv, metrics.json, report.html")
    p.add_argument("--labels", help="instance labels of STACK (ids consistent across "
                                    "sections): label overlap after warping")
    p.add_argument("--deform-seed", type=int, metavar="S",
                   help="align a copy of STACK deformed with this seed (ground truth known)")
    p.add_argument("--params", nargs="+", metavar="FILE",
                   help="elastix: parameter files or shipped names, applied in order")
    p.add_argument("--model", action="append", metavar="METHOD=PATH",
                   help="weights of a learned method, e.g. learned=net.safetensors or "
                        "ssemnet=ae.safetensors (repeatable; default: the shipped weights)")
    p.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE",
                   help="any method option, VALUE as JSON or text, e.g. "
                        "ssemnet.iterations=50 (repeatable)")
    p.add_argument("--threads", type=int, help="CPU threads of every method that takes them")
    shared_options(p)
    p.add_argument("--sections", type=_span, metavar="START:STOP",
                   help="compare on these sections only (0-based, STOP excluded)")
    p.add_argument("--crop", type=int, nargs=4, metavar=("X", "Y", "W", "H"),
                   help="compare on this part of every section only (pixels; read region by "
                        "region)")
    p.add_argument("--mode", choices=["joint", "sequential"], default="joint",
                   help="stack mode for every method (default joint, see align)")
    p.add_argument("--neighbours", type=int, default=1, help="joint: pairs per section")
    p.add_argument("--prior", type=float, default=0.3, help="joint: prior weight")
    p.add_argument("--window", type=int, default=1, help="sequential: aligned sections seen")
    p.add_argument("--drift-window", type=int, default=0, metavar="N",
                   help="sequential: drift correction over N sections (see align)")
    tile_options(p)
    p.add_argument("--margin", type=int,
                   help="pixels left out at each edge in the metrics (default size/16)")
    p.add_argument("--save-aligned", action="store_true",
                   help="also write each method's aligned stack and fields into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    cluster_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="run the built-in demo on the phantom",
                       description="Generate the phantom, deform it with a known deformation "
                                   "and compare every method on it (as `hybridreg compare`): "
                                   "prints the summary table and writes the HTML report, "
                                   "metrics, aligned stacks and fields into OUT.")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--sections", type=int, default=12, help="default 12")
    p.add_argument("--size", type=int, default=256, help="section size in px (default 256)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed; the deformation uses "
                                                       "seed + 1 (default 0)")
    p.add_argument("--methods", nargs="*", default=list(ALL_METHODS), metavar="M",
                   help=f"methods to run (default: {' '.join(ALL_METHODS)}); none given: "
                        f"only the metrics of doing nothing")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads of every method that takes them (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an "
                                                            "earlier demo in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def _setup_logging(args) -> list:
    """Console logging (-v, -q) and the --log file; returns the handlers added here."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    if args.quiet:
        level = logging.ERROR
    root = logging.getLogger()
    added = []
    console = logging.StreamHandler()
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    added.append(console)
    file_level = logging.DEBUG if args.verbose > 1 else logging.INFO
    if args.log:
        handler = logging.FileHandler(args.log, encoding="utf-8")
        handler.setLevel(file_level)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        added.append(handler)
    for h in added:
        root.addHandler(h)
    root.setLevel(min(level, file_level) if args.log else level)
    return added


def main(argv=None) -> int:
    import contextlib

    from . import __version__

    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = _setup_logging(args)
    log.info("hybridreg %s: %s", __version__, " ".join(sys.argv[:1] + [str(a) for a in (
        argv if argv is not None else sys.argv[1:])]))
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_THREADER", "Pool")
    try:
        with contextlib.ExitStack() as stack:
            if args.quiet:
                stack.enter_context(contextlib.redirect_stdout(
                    stack.enter_context(open(os.devnull, "w"))))
            return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError) as exc:
        if args.verbose > 1:
            raise
        for h in handlers[1:]:  # the --log file: the console gets the line below
            h.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0,
                                    "hybridreg %s: error: %s", (args.command, exc), None))
        print(f"hybridreg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

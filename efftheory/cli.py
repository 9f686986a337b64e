"""Command line: ``efftheory compare | kernels | criticality | train | launch`` (also ``python -m efftheory``).

    efftheory compare --activation tanh --depth 4 --widths 16,32,64,128 --networks 500 --out DIR
        samples ensembles at each width (float32 by default; finished chunks are written atomically to
        DIR/cache or --cache CACHE, so that an interrupted run resumes to the identical report), computes
        the first-order theory once, prints the table of measured
        statistics beside their infinite-width and 1/n-corrected predictions and the width-sweep fits,
        and writes DIR/report.json, DIR/table.txt, DIR/width_sweep.png, DIR/four_point_depth.png.
    efftheory kernels --activation relu --depth 10 [--out DIR]
        infinite-width K and Theta per layer (and DIR/kernels.png, DIR/kernels.json).
    efftheory criticality --activation gelu [--out DIR]
        critical initialization, universality class, susceptibilities and fixed points against C_W
        (and DIR/criticality.png, DIR/universality.png, DIR/criticality.json).
    efftheory train --activation erf --depth 3 --C_W 2 --C_b 0.3 --widths 32,64,128,256,512 --out DIR
        trains ensembles by gradient descent on the circle task at each width (chunks cached in DIR/cache),
        prints the test predictions' ensemble mean and variance beside the infinite-width NTK ensemble,
        width-sweep fits and the NTK's change over training, and writes DIR/report.json, DIR/table.txt,
        DIR/predictions.png, DIR/deviation.png, DIR/ntk_change.png.
    efftheory launch --processes 2 -- compare ...
        runs a command in several local processes (or, with --cluster, as one process of a cluster job):
        efftheory.launch, docs/scaling.md.

Bad arguments give a one-line error on stderr and exit status 2; so does a cache written for another
configuration, or a corrupted chunk file (rerun with another --out/--cache, or delete the cache folder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
import tempfile
import time
from collections.abc import Sequence

from . import _io
from ._validate import MAX_DEPTH, MAX_NETWORKS, MAX_WIDTH

__all__ = ["main"]

PROG = "efftheory"
DEFAULT_INPUTS = 2
INPUT_DIM = 8
PAIR_CORRELATION = 0.6


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block, no SystemExit
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------------ parsing
def _positive_int_list(text: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",")]
    if not text.strip() or all(p == "" for p in parts):
        raise argparse.ArgumentTypeError("expected a comma-separated list of widths such as 16,32,64,128, got an "
                                         "empty list")
    out = []
    for p in parts:
        if p == "":
            raise argparse.ArgumentTypeError(f"empty entry in {text!r}")
        try:
            v = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers, got {p!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"every width must be >= 1, got {v}")
        if v > MAX_WIDTH:
            raise argparse.ArgumentTypeError(f"every width must be <= {MAX_WIDTH}, got {v}")
        out.append(v)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"widths must be distinct, got {text!r}")
    return out


def _int_at_least(minimum: int, what: str, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise argparse.ArgumentTypeError(f"{what} must be <= {maximum}, got {v}")
        return v

    return parse


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _add_network(p, depth_default=None, with_depth=True):
    p.add_argument("--activation", required=True, metavar="NAME",
                   help="activation: relu, tanh, gelu, silu/swish, erf, sin, linear, abs, sigmoid, softplus, "
                        "leaky_relu(a)")
    if with_depth:
        kw = {"required": True} if depth_default is None else {"default": depth_default}
        p.add_argument("--depth", type=_int_at_least(1, "depth", MAX_DEPTH), metavar="L", **kw,
                       help="number of layers L" + ("" if depth_default is None else f" (default {depth_default})"))
    p.add_argument("--C_W", "--cw", dest="C_W", type=_float, default=None, help="weight variance (default 1)")
    p.add_argument("--C_b", "--cb", dest="C_b", type=_float, default=None, help="bias variance (default 0)")
    p.add_argument("--critical", action="store_true", help="use the critical initialization (critical_init)")


def _add_residual(p):
    p.add_argument("--skip", type=_float, default=None, metavar="XI",
                   help="residual MLP: skip weight xi of every hidden layer 2..L-1, z -> xi z + gamma [b + W sigma(z)] "
                        "(default 0: plain)")
    p.add_argument("--branch", type=_float, default=None, metavar="GAMMA",
                   help="residual MLP: branch weight gamma > 0 of every hidden layer 2..L-1 (default 1); with "
                        "--critical, C_W is critical at this xi, gamma")


def _add_inputs(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--inputs", type=_int_at_least(1, "--inputs"), default=None, metavar="N",
                   help=f"number of random inputs drawn from the seed (default {DEFAULT_INPUTS}: a pair at "
                        f"correlation {PAIR_CORRELATION}; n_0 = {INPUT_DIM}, (1/n_0)|x|^2 = 1)")
    g.add_argument("--inputs-file", default=None, metavar="PATH.npy",
                   help="your own inputs: a .npy array of shape (N, n_0)")
    p.add_argument("--seed", type=_int_at_least(0, "--seed", 2**63 - 1), default=0, help="random seed (default 0)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Wide neural networks from first principles, checked against "
                                            "sampled networks.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{compare,kernels,criticality,train,launch}")
    sub.required = True

    c = sub.add_parser("compare", help="finite-width theory beside sampled networks across widths",
                       description="Sample ensembles at several widths, compute the first-order theory once, "
                                   "print measured statistics beside their predictions and write DIR/report.json "
                                   "and PNG plots. Chunks are cached in DIR/cache: rerunning the same command "
                                   "resumes an interrupted run and gives the identical report.")
    _add_network(c, depth_default=None)
    _add_residual(c)
    c.add_argument("--widths", type=_positive_int_list, default=[16, 32, 64, 128],
                   help="comma-separated hidden widths (default 16,32,64,128)")
    c.add_argument("--networks", type=_int_at_least(1, "--networks", MAX_NETWORKS), default=500, metavar="M",
                   help="networks per width (default 500; at least 2 for standard errors)")
    c.add_argument("--output-width", type=_int_at_least(1, "--output-width", MAX_WIDTH), default=1,
                   help="output width n_L (default 1)")
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="arithmetic of the sampled networks (default float32; theory is always float64)")
    _add_inputs(c)
    c.add_argument("--out", required=True, metavar="DIR", help="output folder (report.json, plots, cache/)")
    c.add_argument("--cache", default=None, metavar="DIR",
                   help="folder of the resumable chunk cache (default DIR/cache of --out)")
    c.add_argument("--chunk", type=_int_at_least(1, "--chunk", MAX_NETWORKS), default=None, metavar="M",
                   help="networks per sampled chunk, the unit that is cached (default: from a memory budget). "
                        "Results agree across chunk sizes up to rounding; a resumed run reuses the cache only "
                        "with the same --chunk, and is then bit-identical")
    c.add_argument("--no-plots", action="store_true", help="write report.json and table.txt only")
    c.add_argument("--distribution", action="store_true",
                   help="also compare the output layer's distribution (first two inputs) with the Gaussians and the "
                        "first-order density: KS and TV distances per width into report.json, histograms "
                        "(docs/distribution.md)")
    c.add_argument("--distribution-networks", type=_int_at_least(2, "--distribution-networks", MAX_NETWORKS),
                   default=20000, metavar="M", help="networks per width for --distribution (default 20000)")
    c.add_argument("--all-rows", action="store_true", help="print every entry and layer, not a representative set")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=_cmd_compare)

    k = sub.add_parser("kernels", help="infinite-width kernels K and Theta per layer",
                       description="Infinite-width NNGP kernel K and NTK Theta of every layer on a few inputs.")
    _add_network(k, depth_default=None)
    _add_residual(k)
    _add_inputs(k)
    k.add_argument("--out", default=None, metavar="DIR", help="write kernels.png and kernels.json here")
    k.set_defaults(func=_cmd_kernels)

    r = sub.add_parser("criticality", help="critical initialization, susceptibilities and fixed points",
                       description="Critical initialization and universality class of an activation, chi_parallel "
                                   "and chi_perp at the fixed point against C_W.")
    r.add_argument("--activation", required=True, metavar="NAME", help="activation name")
    r.add_argument("--C_b", "--cb", dest="C_b", type=_float, default=None,
                   help="bias variance held fixed in the C_W scan (default: the critical C_b)")
    r.add_argument("--out", default=None, metavar="DIR",
                   help="write criticality.png, universality.png and criticality.json here")
    r.set_defaults(func=_cmd_criticality)

    t = sub.add_parser("train", help="trained ensembles across widths beside the infinite-width predictions",
                       description="Train ensembles of networks by full-batch gradient descent on the built-in circle "
                                   "regression task (efftheory.datasets) at several widths, print the measured "
                                   "ensemble mean and variance of the test predictions beside the infinite-width "
                                   "NTK predictions with width-sweep extrapolations, and write DIR/report.json, "
                                   "DIR/table.txt and PNG plots. Trained chunks are cached in DIR/cache: rerunning "
                                   "the same command resumes an interrupted run and gives the identical report.")
    _add_network(t, depth_default=None)
    t.add_argument("--widths", type=_positive_int_list, default=[32, 64, 128, 256],
                   help="comma-separated hidden widths (default 32,64,128,256)")
    t.add_argument("--networks", type=_int_at_least(2, "--networks", MAX_NETWORKS), default=100, metavar="M",
                   help="networks per width (default 100)")
    t.add_argument("--steps", type=_int_at_least(1, "--steps", 2**31 - 1), default=100,
                   help="gradient-descent steps (default 100)")
    t.add_argument("--learning-rate", type=_float, default=None, metavar="ETA",
                   help="learning rate (default: half the infinite-width stability bound, 1/lambda_max(Theta_train))")
    t.add_argument("--record-every", type=_int_at_least(1, "--record-every", 2**31 - 1), default=None, metavar="R",
                   help="record predictions every R steps (default: 10 records)")
    t.add_argument("--train-points", type=_int_at_least(1, "--train-points", 1024), default=8, metavar="N",
                   help="training points of the circle task (default 8, at most 1024)")
    t.add_argument("--test-points", type=_int_at_least(1, "--test-points", 1024), default=48, metavar="N",
                   help="test points on an even grid (default 48, at most 1024)")
    t.add_argument("--outputs", type=_int_at_least(1, "--outputs", 64), default=1, metavar="K",
                   help="target components = output width (default 1, at most 64)")
    t.add_argument("--noise", type=_float, default=0.0, help="noise added to the training targets (default 0)")
    t.add_argument("--last-layer", action="store_true",
                   help="train only the last layer: the converged ensemble is then the NNGP posterior")
    t.add_argument("--seed", type=_int_at_least(0, "--seed"), default=0,
                   help="random seed of the networks and of the training points (default 0)")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="arithmetic of the trained networks (default float32; theory is always float64)")
    t.add_argument("--out", required=True, metavar="DIR", help="output folder (report.json, plots, cache/)")
    t.add_argument("--cache", default=None, metavar="DIR",
                   help="folder of the resumable cache of trained chunks (default DIR/cache of --out)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)

    # handled by efftheory.launch before this parser (main); listed here for --help
    sub.add_parser("launch", help="run compare or train in several processes: efftheory launch --processes P -- "
                                  "compare ... (see 'efftheory launch --help')", add_help=False)
    return parser


# ------------------------------------------------------------------------------------------ shared steps
def _err(msg: str) -> None:
    print(f"{PROG}: error: {' '.join(str(msg).split())}", file=sys.stderr)


def _log(msg: str) -> None:
    """A progress line on stderr (process 0 only, with several processes: errors come from all)."""
    from . import distributed

    if distributed.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _out_dir(path: str, option: str = "--out") -> str:
    """Create DIR (and parents) and check that a file can be written there (process 0 only, with
    several processes: the others write nothing)."""
    if not path or not str(path).strip():
        raise UsageError(f"{option}: expected a folder path, got an empty string")
    if "\x00" in path:
        raise UsageError(f"{option}: a path cannot contain a NUL character")
    from . import distributed

    if distributed.process_index() != 0:
        return path
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UsageError(f"{option}: cannot write to {path!r} ({e.strerror or e})") from None
    now = time.time()
    for e in os.scandir(path):  # leftovers of killed runs' atomic writes (a live write lasts seconds)
        try:
            if e.name.startswith(".tmp-") and e.is_file(follow_symlinks=False) and \
                    now - e.stat(follow_symlinks=False).st_mtime > 600:
                os.remove(e.path)
        except OSError:
            pass
    return path


def _network(args, depth: int, width: int = 1, output_width: int = 1):
    from .activations import get_activation
    from .network import MLP
    from .theory.criticality import critical_init

    act = get_activation(args.activation, "--activation")
    skip = getattr(args, "skip", None)
    branch = getattr(args, "branch", None)
    residual = {}
    if skip is not None:
        residual["skip"] = skip
    if branch is not None:
        if branch <= 0:
            raise UsageError(f"--branch: expected a positive number (> 0), got {branch:g}")
        residual["branch"] = branch
    crit = None
    if args.critical:
        if args.C_W is not None or args.C_b is not None:
            raise UsageError("--critical chooses C_W and C_b itself; drop --C_W/--C_b or --critical")
        try:
            crit = critical_init(act, **residual)
        except ValueError as e:
            raise UsageError(f"--critical: {e}".replace(": skip:", " with --skip:")) from None
        if not math.isfinite(crit.C_W):
            raise UsageError(f"--critical: {act.name} has no critical initialization (universality class 'none')")
        C_W, C_b = crit.C_W, crit.C_b
    else:
        C_W = 1.0 if args.C_W is None else args.C_W
        C_b = 0.0 if args.C_b is None else args.C_b
        if C_W <= 0:
            raise UsageError(f"--C_W: expected a positive number, got {C_W:g}")
        if C_b < 0:
            raise UsageError(f"--C_b: expected a non-negative number, got {C_b:g}")
    try:
        net = MLP(depth, width, act, C_W=C_W, C_b=C_b, output_width=output_width, **residual)
    except ValueError as e:
        msg = str(e)
        if msg.startswith(("skip", "branch")):  # the residual arguments, named as the options
            raise UsageError("--" + msg) from None
        raise
    return net, crit


def _inputs(args):
    """(x, description dict) from --inputs-file or --inputs (seeded)."""
    import numpy as np

    from ._io import array_sha256
    from .reports.compare import MAX_INPUTS, default_inputs

    if args.inputs_file is not None:
        path = args.inputs_file
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError as e:
            raise UsageError(f"--inputs-file: cannot read {path!r} ({e.strerror or e})") from None
        if not regular:  # a FIFO would block np.load forever
            raise UsageError(f"--inputs-file: {path!r} is not a regular file (a .npy array is expected)")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise UsageError(f"--inputs-file: cannot read {path!r} as a .npy array ({e})") from None
        if not isinstance(arr, np.ndarray):
            if hasattr(arr, "close"):
                arr.close()
            raise UsageError(f"--inputs-file: {path!r} is not a single .npy array (an .npz archive?)")
        if arr.dtype.kind not in "iuf":
            raise UsageError(f"--inputs-file: expected a real array, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise UsageError(f"--inputs-file: expected an array of shape (N, n_0), got shape {arr.shape}")
        x = arr.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise UsageError("--inputs-file: contains NaN or infinite entries")
        if x.shape[0] > MAX_INPUTS:
            raise UsageError(f"--inputs-file: at most {MAX_INPUTS} inputs, got {x.shape[0]}")
        desc = {"source": f"file {os.path.basename(path)}",
                "sha256": array_sha256(x)}
        return x, desc
    N = DEFAULT_INPUTS if args.inputs is None else args.inputs
    if N > MAX_INPUTS:
        raise UsageError(f"--inputs: at most {MAX_INPUTS} inputs (four-point statistics grow like N^4), got {N}")
    x = default_inputs(N, INPUT_DIM, args.seed, PAIR_CORRELATION)
    src = f"seeded from --seed {args.seed}: (1/n_0)|x|^2 = 1"
    if N >= 2:
        src += f", inputs 0 and 1 at correlation {PAIR_CORRELATION}"
    return x, {"source": src}


def _describe(net, crit) -> str:
    s = f"{net.sigma.name}, depth {net.depth}, C_W = {net.C_Ws[0]:.6g}, C_b = {net.C_bs[0]:.6g}"
    if net.residual:
        s += f", skip = {net.skips[1]:.6g}, branch = {net.branches[1]:.6g} (layers 2..{net.depth - 1})"
    if crit is not None:
        s += f" (critical, {crit.universality_class} class)"
    return s


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------ commands
def _cmd_compare(args) -> int:
    t_start = time.perf_counter()
    if args.networks < 2:
        raise UsageError(f"--networks: standard errors need at least 2 networks per width, got {args.networks}")
    if args.depth < 2:
        raise UsageError(f"--depth: compare needs a hidden layer to vary (depth >= 2), got {args.depth}")
    widths = sorted(args.widths)
    net, crit = _network(args, args.depth, widths[0], args.output_width)
    x, input_desc = _inputs(args)
    out = _out_dir(args.out)
    cache = _out_dir(args.cache, "--cache") if args.cache is not None else os.path.join(out, "cache")

    from . import compare as cmp
    from . import distributed

    lead = distributed.process_index() == 0
    if args.distribution and distributed.active():
        raise UsageError("--distribution: not available with several processes yet (efftheory launch); run it in "
                         "one process")
    if lead:
        _check_cache(cache, _fingerprint(net, x, args))
    extra = {"inputs": input_desc, "critical": bool(args.critical),
             "command": "efftheory " + " ".join(_argv_for_report(args))}
    if crit is not None:
        extra["criticality"] = {"universality_class": crit.universality_class, "C_W": crit.C_W, "C_b": crit.C_b,
                                "K_star": crit.K_star}
        if net.residual:
            extra["criticality"].update(skip=crit.skip, branch=crit.branch)
    if not (len(widths) >= 4 and widths[-1] >= 8 * widths[0]):
        _log("note: docs/theory.md's protocol asks for at least 4 widths spanning a factor of 8; fits are indicative only")
    _log(f"{PROG} compare: {_describe(net, crit)}; widths {','.join(map(str, widths))}; "
         f"{args.networks} networks per width; cache {cache}")
    report = cmp.compare(net, x, widths, args.networks, args.seed, dtype=args.dtype, cache_dir=cache,
                         progress=not args.no_progress and lead, log=_log if lead else None, config_extra=extra,
                         chunk=args.chunk)
    if report is None:  # another process than 0: its share is done, process 0 reports
        return 0
    print(report.header())
    print()
    print(report.table(all_rows=args.all_rows))
    print()
    print(report.fit_table(all_rows=args.all_rows))
    dist = None
    if args.distribution:
        from .empirical.distribution import compare_distribution

        dist = compare_distribution(net, x, widths, args.distribution_networks, args.seed, out,
                                    plots=not args.no_plots, log=_log)
        report.config["distribution"] = dist["report"]  # in report.json beside the moments
        print()
        print(dist["table"])
    t0 = time.perf_counter()
    paths = report.save(out)
    if dist is not None:
        paths.update(dist["paths"])
    if not args.no_plots:
        from .reports import plotting

        paths["width_sweep"] = _save(plotting.plot_width_sweep(report), os.path.join(out, "width_sweep.png"))
        paths["four_point_depth"] = _save(plotting.plot_four_point_depth(report),
                                          os.path.join(out, "four_point_depth.png"))
    t_plots = time.perf_counter() - t0
    print()
    print(cmp.verdict_summary(report.fits) + " (all entries and layers, report.json)")
    print("wrote " + ", ".join(paths[k] for k in ("report", "table", "width_sweep", "four_point_depth") if k in paths))
    if dist is not None:
        print("wrote " + ", ".join(v for k, v in dist["paths"].items()))
    tm = report.timings
    _log(f"time: theory {tm['theory']:.1f} s, sampling {tm['sampling']:.1f} s, estimates and fits "
         f"{tm['estimates']:.1f} s, plots {t_plots:.1f} s, total {time.perf_counter() - t_start:.1f} s")
    return 0


_FINGERPRINT = "compare-config.json"


def _fingerprint(net, x, args) -> dict:
    """What the cached chunks in DIR/cache depend on (not the widths nor the number of networks: those
    only add chunk files)."""
    from ._io import array_sha256
    from .reports._table import net_config

    return {**net_config(net), "inputs_sha256": array_sha256(x), "seed": args.seed, "dtype": args.dtype}


def _check_cache(cache: str, fp: dict) -> None:
    """Refuse at once (before any computation) a DIR/cache written by a compare run of another
    configuration; otherwise record this configuration there.  The empirical module checks every chunk
    again (CacheMismatchError)."""
    path = os.path.join(cache, _FINGERPRINT)
    if os.path.exists(path):
        try:
            with open(path) as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = None
        if old != fp:
            what = ", ".join(k for k in fp if not isinstance(old, dict) or old.get(k) != fp[k]) or "unreadable"
            raise CacheConfigError(f"{cache} holds ensembles of another configuration (differs in: {what}); "
                                   "use another --out or --cache, or delete that cache folder")
        return
    os.makedirs(cache, exist_ok=True)
    _io.atomic_write(path, json.dumps(fp, indent=1))  # unique temporary name: concurrent starts do not collide


class CacheConfigError(Exception):
    """DIR/cache belongs to another configuration: one line, exit status 2."""


def _argv_for_report(args) -> list[str]:
    """The options that define the run (no paths), for the report's config."""
    out = ["compare", "--activation", args.activation, "--depth", str(args.depth), "--widths",
           ",".join(map(str, sorted(args.widths))), "--networks", str(args.networks), "--seed", str(args.seed),
           "--dtype", args.dtype, "--output-width", str(args.output_width)]
    if args.critical:
        out.append("--critical")
    if args.C_W is not None:
        out += ["--C_W", repr(args.C_W)]
    if args.C_b is not None:
        out += ["--C_b", repr(args.C_b)]
    if getattr(args, "skip", None) is not None:
        out += ["--skip", repr(args.skip)]
    if getattr(args, "branch", None) is not None:
        out += ["--branch", repr(args.branch)]
    if args.inputs is not None:
        out += ["--inputs", str(args.inputs)]
    if args.inputs_file is not None:
        out += ["--inputs-file", os.path.basename(args.inputs_file)]
    if args.distribution:
        out += ["--distribution", "--distribution-networks", str(args.distribution_networks)]
    return out


def _cmd_kernels(args) -> int:
    import numpy as np

    net, crit = _network(args, args.depth)
    x, input_desc = _inputs(args)
    out = _out_dir(args.out) if args.out is not None else None
    from .theory.infinite import infinite_width

    inf = infinite_width(net, x)
    K, Th = np.asarray(inf.K), np.asarray(inf.Theta)
    N = K.shape[1]
    print(f"infinite-width kernels: {_describe(net, crit)}; {N} inputs of dimension {x.shape[1]} "
          f"({input_desc['source']})")
    pairs = [(a, b) for a in range(N) for b in range(a, N)]
    if N <= 3:
        head = ["layer"] + [f"K_{a}{b}" for a, b in pairs] + [f"Theta_{a}{b}" for a, b in pairs]
        rows = [[str(l + 1)] + [f"{K[l, a, b]:.6g}" for a, b in pairs] + [f"{Th[l, a, b]:.6g}" for a, b in pairs]
                for l in range(net.depth)]
        wid = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, wid)))
        for r in rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, wid)))
    else:
        with np.printoptions(precision=5, suppress=True, linewidth=160):
            for l in range(net.depth):
                print(f"layer {l + 1}\nK =\n{K[l]}\nTheta =\n{Th[l]}")
    if out is not None:
        from .reports import plotting
        from .reports.compare import versions

        png = _save(plotting.plot_kernels(inf), os.path.join(out, "kernels.png"))
        data = {"config": {**net.to_dict(), "critical": bool(args.critical), "seed": args.seed,
                           "inputs": {**input_desc, "x": x.tolist()}},
                "versions": versions(), "K": K.tolist(), "Theta": Th.tolist()}
        path = os.path.join(out, "kernels.json")
        _io.atomic_write(path, json.dumps(data, indent=1))
        print(f"wrote {path}, {png}")
    return 0


def _cmd_criticality(args) -> int:
    import numpy as np

    from .activations import get_activation
    from .theory.criticality import chi_parallel, chi_perp, critical_init, fixed_point

    act = get_activation(args.activation, "--activation")
    if args.C_b is not None and args.C_b < 0:
        raise UsageError(f"--C_b: expected a non-negative number, got {args.C_b:g}")
    out = _out_dir(args.out) if args.out is not None else None
    crit = critical_init(act)
    print(f"{act.name}: universality class {crit.universality_class!r}")
    if math.isfinite(crit.C_W):
        ks = "every K (a marginal line of fixed points)" if crit.marginal_line else f"{crit.K_star:.6g}"
        print(f"critical initialization: C_b = {crit.C_b:.6g}, C_W = {crit.C_W:.6g}, fixed point K* = {ks}")
        K_ref = 1.0 if crit.K_star is None else crit.K_star
        print(f"at K = {K_ref:.6g}: chi_parallel = {float(chi_parallel(act, K_ref, crit.C_W)):.6g}, "
              f"chi_perp = {float(chi_perp(act, K_ref, crit.C_W)):.6g}")
    else:
        print("no critical initialization exists for this activation")
    from .reports import plotting

    C_b = args.C_b if args.C_b is not None else (crit.C_b if math.isfinite(crit.C_W) else 0.0)
    base = crit.C_W if math.isfinite(crit.C_W) else 1.0
    C_Ws = base * np.array([0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5])
    Ks = [fixed_point(act, cw, C_b, K0=1.0) for cw in C_Ws]
    print(f"\nfixed point reached from K = 1 and susceptibilities there, C_b = {C_b:.6g}:")
    print(f"{'C_W':>10}  {'K*':>12}  {'chi_par':>10}  {'chi_perp':>10}  kind")
    for cw, k in zip(C_Ws, Ks):
        kind = k.kind + (" (every K is a fixed point)" if k.marginal_line else "")
        if math.isfinite(k.chi_parallel):
            print(f"{cw:10.5g}  {k:12.5g}  {k.chi_parallel:10.5g}  {k.chi_perp:10.5g}  {kind}")
        else:
            print(f"{cw:10.5g}  {k:12.5g}  {'—':>10}  {'—':>10}  {kind}")
    if out is not None:
        from .reports.compare import versions

        p1 = _save(plotting.plot_criticality(act, C_b=C_b), os.path.join(out, "criticality.png"))
        names = [act] + [n for n in ("relu", "tanh", "gelu") if n != act.name]
        p2 = _save(plotting.plot_universality(names), os.path.join(out, "universality.png"))
        data = {"activation": act.name, "universality_class": crit.universality_class,
                "C_b": _num(crit.C_b), "C_W": _num(crit.C_W), "K_star": _num(crit.K_star),
                "scan": {"C_b": C_b, "C_W": C_Ws.tolist(), "K_star": [_num(float(k)) for k in Ks],
                         "kind": [k.kind for k in Ks]},
                "versions": versions()}
        path = os.path.join(out, "criticality.json")
        _io.atomic_write(path, json.dumps(data, indent=1))
        print(f"\nwrote {path}, {p1}, {p2}")
    return 0


def _cmd_train(args) -> int:
    """``efftheory train``: a width sweep of trained ensembles on the circle task (efftheory.compare_train)."""
    t_start = time.perf_counter()
    if args.depth < 2:
        raise UsageError(f"--depth: train sweeps a hidden width, so it needs depth >= 2, got {args.depth}")
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise UsageError(f"--learning-rate: expected a positive number, got {args.learning_rate:g}")
    if args.noise < 0:
        raise UsageError(f"--noise: expected a non-negative number, got {args.noise:g}")
    widths = sorted(args.widths)
    net, crit = _network(args, args.depth, widths[0], args.outputs)
    out = _out_dir(args.out)

    from . import datasets
    from .predict import last_layer_net
    from .reports import compare_train as ct
    from .reports import plotting_train as pt

    if args.last_layer:
        net = last_layer_net(net)
    ds = datasets.circle_regression(args.train_points, args.test_points, outputs=args.outputs, noise=args.noise,
                                    seed=args.seed)
    if args.learning_rate is not None:  # against the stability bound, before anything is logged or trained
        from .predict import gradient_descent, train_test_kernels

        gradient_descent(train_test_kernels(net, ds.x_train, ds.x_test), ds.y_train, learning_rate=args.learning_rate,
                         steps=0)
    cache = _out_dir(args.cache, "--cache") if args.cache is not None else os.path.join(out, "cache")
    argv = ["train", "--activation", args.activation, "--depth", str(args.depth), "--widths",
            ",".join(map(str, widths)), "--networks", str(args.networks), "--steps", str(args.steps),
            "--train-points", str(args.train_points), "--test-points", str(args.test_points),
            "--outputs", str(args.outputs), "--seed", str(args.seed), "--dtype", args.dtype]
    for flag, value in (("--C_W", args.C_W), ("--C_b", args.C_b), ("--learning-rate", args.learning_rate),
                        ("--record-every", args.record_every)):
        if value is not None:
            argv += [flag, repr(value)]
    if args.noise:
        argv += ["--noise", repr(args.noise)]
    argv += [f for f, on in (("--critical", args.critical), ("--last-layer", args.last_layer)) if on]
    extra = {"data": ds.name, "critical": bool(args.critical), "command": "efftheory " + " ".join(argv)}
    if not (len(widths) >= 4 and widths[-1] >= 8 * widths[0]):
        _log("note: docs/theory.md's protocol asks for at least 4 widths spanning a factor of 8; fits are indicative only")
    _log(f"{PROG} train: {_describe(net, crit)}{', last layer only' if args.last_layer else ''}; widths "
         f"{','.join(map(str, widths))}; {args.networks} networks per width, {args.steps} steps; cache {cache}")
    from . import distributed

    lead = distributed.process_index() == 0
    try:
        report = ct.train_and_compare(net, ds.x_train, ds.y_train, ds.x_test, widths, args.networks, steps=args.steps,
                                      learning_rate=args.learning_rate, seed=args.seed, record_every=args.record_every,
                                      dtype=args.dtype, cache_dir=cache, progress=not args.no_progress and lead,
                                      log=_log if lead else None, s_train=ds.s_train, s_test=ds.s_test,
                                      config_extra=extra)
    except KeyboardInterrupt:
        _err(f"interrupted; rerun the same command to resume from {cache}")
        return 130
    if report is None:  # another process than 0: its share is done, process 0 reports
        return 0
    print(report.header())
    print()
    print(report.table())
    print()
    print(report.fit_table())
    t0 = time.perf_counter()
    paths = report.save(out)
    for name, fig in (("predictions", pt.plot_predictions(report)), ("deviation", pt.plot_deviation(report)),
                      ("ntk_change", pt.plot_ntk_change(report))):
        paths[name] = _save(fig, os.path.join(out, f"{name}.png"))
    print()
    print("wrote " + ", ".join(paths[k] for k in ("report", "table", "predictions", "deviation", "ntk_change")))
    tm = report.timings
    _log(f"time: training {tm['training']:.1f} s, estimates and fits {tm['estimates']:.1f} s, plots "
         f"{time.perf_counter() - t0:.1f} s, total {time.perf_counter() - t_start:.1f} s")
    return 0


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else (None if math.isnan(v) else ("inf" if v > 0 else "-inf"))


# ------------------------------------------------------------------------------------------ entry point
def _cache_of(args) -> str:
    cache = getattr(args, "cache", None)
    return cache if cache else os.path.join(getattr(args, "out", "") or ".", "cache")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad arguments or cache mismatch)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # its own parser: everything after "--" is the command to run
        from . import launch

        return launch.main(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        _err(e)
        return 2
    except SystemExit as e:  # --help, --version
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    from . import distributed

    try:  # several processes (efftheory launch, EFFTHEORY_* or Slurm variables): before any JAX work
        distributed.initialize()
    except ValueError as e:
        _err(e)
        return 2
    import jax

    from .empirical import CacheMismatchError

    try:
        with jax.enable_x64(True):  # every command computes in float64 (a local context: no global setting)
            return args.func(args)
    except (UsageError, CacheConfigError) as e:
        _err(e)
        return 2
    except CacheMismatchError as e:
        _err(f"{e} (the cache in {_cache_of(args)} does not belong to this run: use another --out or --cache, or "
             f"delete that folder)")
        return 2
    except (ValueError, FloatingPointError) as e:
        if os.environ.get("EFFTHEORY_DEBUG"):
            raise
        _err(e)
        return 2
    except OSError as e:
        _err(f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""))
        return 1
    except KeyboardInterrupt:
        _err("interrupted" + (f"; rerun the same command to resume from {_cache_of(args)}"
                              if args.command == "compare" else ""))
        return 130
    except distributed.DistributedError as e:
        _err(f"process {distributed.process_index()}: {e}" + (f"; rerun the same command to resume from "
                                                               f"{_cache_of(args)}" if args.command in ("compare", "train")
                                                               else ""))
        distributed.abort(e)  # not through jax.distributed's shutdown, which would wait for the dead process


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`fusion-node bench WHAT`: the parser and the dispatch to `fusion_node/bench/WHAT.py`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_bench_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="measure transport, pipeline or engine "
                                "performance")
    bench.add_argument("what", choices=("transport", "pipeline", "engines", "record",
                                               "clock", "client", "fuzz", "soak", "scale"))
    bench.add_argument("--json", action="store_true", help="one-line JSON")
    bench.add_argument("--count", type=int, default=2000,
                       help="messages per kind, and frames per path up to 500 (transport: "
                       "raw pyzmq, inline, shared memory by copy and by loan, and Zenoh SHM "
                       "where eclipse-zenoh is installed)")
    bench.add_argument("--duration", type=float, default=20.0,
                       help="seconds (pipeline, record, clock; scale: per configuration)")
    bench.add_argument("--iterations", type=int, default=200,
                       help="timed calls per backend (engines)")
    bench.add_argument("--inputs", type=int, default=1_000_000,
                       help="protocol decoder inputs (fuzz)")
    bench.add_argument("--seconds", type=float, default=20.0,
                       help="seconds for each other target: shm, launch, calibration, "
                            "mcap (fuzz)")
    bench.add_argument("--seed", type=int, default=0, help="mutation seed (fuzz)")
    bench.add_argument("--minutes", type=float, default=30.0,
                       help="minutes of the default node under injected faults (soak)")
    bench.add_argument("--faults",
                       default="camera,stall,overrun,flood,raise,hang,shm_attack,future",
                       help="comma-separated faults the soak injects (soak; to find which "
                       "one a figure comes from)")
    bench.add_argument("--plot", metavar="DIR", help="also write PNG plots and the JSON "
                       "into DIR (transport, pipeline, engines, scale; needs matplotlib)")


def run_bench_command(args: argparse.Namespace) -> None:
    # With --plot, the benches also hand back their raw samples (never printed).
    samples: dict[str, Any] | None = None
    if args.plot:
        from fusion_node.bench.plots import check_plot_request

        check_plot_request(args.what, args.plot)
        samples = {}
    if args.what == "transport":
        from fusion_node.bench.transport import run_transport_bench

        result = run_transport_bench(count=args.count, samples=samples)
    elif args.what == "engines":
        from fusion_node.bench.engines import run_engine_bench

        result = run_engine_bench(iterations=args.iterations, samples=samples)
    elif args.what == "clock":
        from fusion_node.bench.clock import run_clock_bench

        result = run_clock_bench(duration_s=args.duration)
    elif args.what == "client":
        from fusion_node.bench.client import run_client_bench

        result = run_client_bench(duration_s=args.duration)
    elif args.what == "fuzz":
        from fusion_node.bench.fuzz import run_fuzz_bench

        result = run_fuzz_bench(inputs=args.inputs, seconds=args.seconds, seed=args.seed)
    elif args.what == "record":
        from fusion_node.bench.record import run_record_bench

        result = run_record_bench(duration_s=args.duration)
    elif args.what == "scale":
        from fusion_node.bench.scale import run_scale_bench

        result = run_scale_bench(duration_s=args.duration)
    elif args.what == "soak":
        from fusion_node.bench.soak import run_soak_bench

        result = run_soak_bench(minutes=args.minutes, faults=tuple(args.faults.split(",")))
    else:
        from fusion_node.bench.pipeline import run_pipeline_bench

        result = run_pipeline_bench(duration_s=args.duration, samples=samples)
    print(json.dumps(result, indent=None if args.json else 2))
    if args.plot and samples is not None:
        from fusion_node.bench.plots import plot_bench

        for path in plot_bench(args.what, result, samples, args.plot):
            print(f"wrote {path}", file=sys.stderr)

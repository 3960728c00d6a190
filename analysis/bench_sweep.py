"""``micrography bench sweep``: what a local Dask cluster of two workers buys over a serial sweep.

One guidance sweep (eight sessions: four default-layout specimens x the guided and
random policies, 5 % of the stage each) runs twice in fresh folders: serially in
this process, then on a :class:`~distributed.LocalCluster` of two single-threaded
workers started (and warmed up: imports) before the clock starts. Reported:

- ``speedup_2_workers``: serial wall time over the cluster's wall time (target >= 1.8x);
  ``speedup_with_start``: the same with the cluster's start-up counted;
- ``task_overhead_s``: mean time per task that is neither the task's own work nor waiting
  for a free worker — scheduling, pickling the task and its result, storing the result
  (target <= 0.5 s), from the worker's start stamp and the client's submit and arrival times;
- ``peak_worker_memory_mb``: the largest peak resident memory of a worker process;
- ``equal_to_serial``: whether the gathered guidance report equals the serial one, timings aside.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.benchmarking import machine_info
from analysis.sweep import (
    TASK_MEMORY_MB,
    ResultStore,
    SweepRun,
    SweepTask,
    dask_client,
    gather,
    guidance_sweep_tasks,
    run_tasks,
    warm_up,
)

TARGETS = {"speedup_2_workers": 1.8, "task_overhead_s": 0.5}
SEEDS: tuple[int, ...] = (3, 4, 5, 6)
POLICIES: tuple[str, ...] = ("guided", "random")
BUDGET = 0.05
TIMING_KEYS = ("latency", "timing", "machine", "target_results")
"""Report entries that hold wall-clock measurements: they differ between any two runs."""


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """A guidance or anomaly report without its timings, for comparing two runs of the same tasks."""
    return {key: value for key, value in report.items() if key not in TIMING_KEYS}


def task_overheads(tasks: Sequence[SweepTask], run: SweepRun) -> list[float]:
    """Per task run: time spent neither working nor queued for a worker, s.

    A task's wait starts when it is submitted or when its worker finished its previous
    task, whichever is later; its overhead is the wait up to its start on the worker plus
    the time from its end there to the client holding (and having stored) its result.

    Parameters
    ----------
    tasks : sequence of SweepTask
        The sweep.
    run : SweepRun
        Its run (outcomes with ``started_at`` and ``seconds``; the client's timeline).

    Returns
    -------
    list of float
        One per task that ran now.
    """
    ran = [
        (task.key, outcome)
        for task, outcome in zip(tasks, run.outcomes, strict=True)
        if outcome is not None and task.key in run.timeline
    ]
    by_worker: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, outcome in ran:
        by_worker.setdefault(outcome["worker"], []).append((key, outcome))
    overheads = []
    for items in by_worker.values():
        items.sort(key=lambda item: item[1]["started_at"])
        free_at = None
        for key, outcome in items:
            submitted, arrived = run.timeline[key]
            ready = submitted if free_at is None else max(submitted, free_at)
            finished = outcome["started_at"] + outcome["seconds"]
            overheads.append(max(0.0, outcome["started_at"] - ready) + max(0.0, arrived - finished))
            free_at = finished
    return overheads


def benchmark_sweep(
    seeds: Sequence[int] = SEEDS, policies: Sequence[str] = POLICIES, budget: float = BUDGET, workers: int = 2
) -> dict[str, Any]:
    """Run one guidance sweep serially and on a local cluster; compare time, memory and results.

    Parameters
    ----------
    seeds : sequence of int
        Default-layout specimen seeds.
    policies : sequence of str
        Policies.
    budget : float
        Budget of each session, as a fraction of the tiles covering the stage.
    workers : int
        Workers of the local cluster.

    Returns
    -------
    dict
        ``speedup_2_workers``, ``speedup_with_start``, ``task_overhead_s``,
        ``peak_worker_memory_mb``, ``equal_to_serial``, ``serial_s``, ``cluster_s``,
        ``cluster_start_s``, ``client_and_scheduler_cpu_s``, ``tasks`` (label, seconds, worker), ``targets``,
        ``target_results``, ``machine``.
    """
    import os

    tasks = guidance_sweep_tasks(
        seeds=list(seeds),
        policies=list(policies),
        control_seed=None,
        budgets=[budget],
        instrument="realistic",
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="micrography-bench-sweep-") as scratch:
        serial_out, cluster_out = Path(scratch) / "serial", Path(scratch) / "cluster"
        serial = run_tasks(tasks, ResultStore(serial_out), None, progress=True)
        serial_report = gather("guidance", tasks, serial, serial_out)["report"]
        started = time.perf_counter()
        with dask_client(workers=workers, memory_per_task_mb=TASK_MEMORY_MB["guidance"]) as client:
            warm_up(client, ["guidance"])
            cluster_start_s = time.perf_counter() - started
            cpu_before = time.process_time()
            cluster = run_tasks(tasks, ResultStore(cluster_out), client, progress=True)
            # The scheduler and the client share this process: what they take from the two cores.
            client_cpu_s = time.process_time() - cpu_before
        cluster_report = gather("guidance", tasks, cluster, cluster_out)["report"]
    overheads = task_overheads(tasks, cluster)
    peak_by_worker: dict[str, float] = {}
    for outcome in cluster.outcomes:
        if outcome is not None:
            peak_by_worker[outcome["worker"]] = max(
                peak_by_worker.get(outcome["worker"], 0.0), outcome["peak_memory_mb"]
            )
    speedup = serial.wall_s / cluster.wall_s
    overhead = statistics.fmean(overheads) if overheads else None
    equal = (
        serial_report is not None
        and cluster_report is not None
        and comparable(serial_report) == comparable(cluster_report)
    )
    return {
        "benchmark": "sweep",
        "sweep": {"kind": "guidance", "seeds": list(seeds), "policies": list(policies), "budget": budget},
        "workers": workers,
        "serial_s": serial.wall_s,
        "cluster_s": cluster.wall_s,
        "cluster_start_s": cluster_start_s,
        "client_and_scheduler_cpu_s": client_cpu_s,
        "speedup_2_workers": speedup,
        "speedup_with_start": serial.wall_s / (cluster.wall_s + cluster_start_s),
        "task_overhead_s": overhead,
        "task_overhead_max_s": max(overheads) if overheads else None,
        "peak_worker_memory_mb": max(peak_by_worker.values()) if peak_by_worker else None,
        "peak_memory_by_worker_mb": peak_by_worker,
        "equal_to_serial": equal,
        "failures": serial.failures + cluster.failures,
        "tasks": [
            {"label": task.label, "serial_s": s["seconds"], "cluster_s": c["seconds"], "worker": c["worker"]}
            for task, s, c in zip(tasks, serial.outcomes, cluster.outcomes, strict=True)
            if s is not None and c is not None
        ],
        "load_average_before": load_before,
        "targets": TARGETS,
        "target_results": {
            "speedup_2_workers": {
                "target": TARGETS["speedup_2_workers"],
                "measured": speedup,
                "met": speedup >= TARGETS["speedup_2_workers"],
            },
            "task_overhead_s": {
                "target": TARGETS["task_overhead_s"],
                "measured": overhead,
                "met": None if overhead is None else overhead <= TARGETS["task_overhead_s"],
            },
            "equal_to_serial": {"target": True, "measured": equal, "met": equal},
        },
        "machine": machine_info(),
    }


def format_report(report: dict[str, Any]) -> str:
    """The sweep benchmark as text: times, speed-up, overhead, memory, equality, targets."""
    sweep = report["sweep"]
    lines = [
        f"guidance sweep: {len(report['tasks'])} sessions (seeds {sweep['seeds']} x {sweep['policies']}, "
        f"{sweep['budget'] * 100:g} % of the stage each); "
        f"1-min load before {report['load_average_before']:.2f}",
        f"serial (this process)        {report['serial_s']:7.1f} s",
        f"local cluster, {report['workers']} workers     {report['cluster_s']:7.1f} s "
        f"(+ {report['cluster_start_s']:.1f} s to start and import; scheduler and client used "
        f"{report['client_and_scheduler_cpu_s']:.1f} s of CPU meanwhile)",
        f"speed-up {report['speedup_2_workers']:.2f}x ({report['speedup_with_start']:.2f}x with the start); "
        f"overhead per task {report['task_overhead_s']:.3f} s mean, "
        f"{report['task_overhead_max_s']:.3f} s max",
        f"peak memory per worker {report['peak_worker_memory_mb']:.0f} MB; "
        f"results equal to the serial run: {'yes' if report['equal_to_serial'] else 'NO'}",
    ]
    for name, result in report["target_results"].items():
        measured = result["measured"]
        shown = f"{measured:.3f}" if isinstance(measured, float) else str(measured)
        lines.append(
            f"target {name}: {result['target']}, measured {shown}: {'met' if result['met'] else 'NOT met'}"
        )
    return "\n".join(lines)

"""``micrography sweep``: benchmarks and batch analyses as tasks on a Dask cluster.

A sweep is a list of independent tasks — one guidance session, one anomaly training
seed, one journal replayed, one image analysed — each a call of the same function
that the serial command uses (:func:`analysis.bench_guidance.run_guidance_task`,
:func:`analysis.bench_anomaly.run_anomaly_task`, :func:`analysis.replay.run_replay`,
:func:`analysis.analyze.run_analysis`). The tasks run on ``dask.distributed``: a
:class:`~distributed.LocalCluster` sized to the machine by default, or an existing
scheduler (``--scheduler tcp://HOST:PORT`` or ``--scheduler-file``), such as one that
dask-jobqueue starts on a SLURM or PBS cluster. ``dask.distributed`` was chosen over a
home-made process pool because the same code then runs on a laptop, a batch cluster
or a cloud deployment, it reschedules the tasks of a worker that dies, and it watches
worker memory.

Resumable: the result of a task is written, as JSON under ``OUT/tasks/``, by the
client the moment it arrives, named by a key that hashes the task's inputs (its
parameters, the size and modification time of each input file, the Micrography
version). A rerun of the same sweep loads what is there and runs only the rest; a
killed worker or client loses only the tasks in flight. A task that raises is
reported with its error and retried by the next rerun; it never stops the others.

Deterministic: every task seeds its own randomness from its parameters and runs
with a fixed number of torch and BLAS threads (``threads_per_task``, default 1), so
a sweep gives the numbers of the serial run with the same threads, whatever the
number of workers or the order in which they finish. Results are gathered in task
order, never in completion order.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.benchmarking import peak_memory_mb
from agent.errors import MicrographyError
from agent.protocol.messages import jsonable

SWEEP_KINDS: tuple[str, ...] = ("guidance", "anomaly", "replay", "analyze")

TASK_FUNCTIONS: dict[str, str] = {
    "guidance": "analysis.bench_guidance:run_guidance_task",
    "anomaly": "analysis.bench_anomaly:run_anomaly_task",
    "replay": "analysis.sweep:replay_task",
    "analyze": "analysis.sweep:analyze_task",
}
"""The function that runs one task of each kind, as ``module:function`` (imported on the worker)."""

TASK_MEMORY_MB: dict[str, float] = {
    "guidance": 2500.0,
    "anomaly": 2500.0,
    "replay": 1000.0,
    "analyze": 1500.0,
}
"""Peak resident memory of one task of each kind, MB, with a margin over what was measured
(docs/sweeps.md): a worker's peak over the 93 sessions of a 25 % family sweep 2.3 GB; one
anomaly training seed with its five specimen graphs cached 2.0 GB; the replay of the 40-tile main
job 0.85 GB; ``analyze`` of a 4096^2 image 0.85 GB. Sizes the local cluster."""

_SCHEDULER_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss|inproc)://\S+$")


class SweepError(MicrographyError, ValueError):
    """A sweep cannot start or run as asked (bad input, no cluster to reach)."""


@dataclass(frozen=True)
class SweepTask:
    """One task of a sweep: what to run, with which inputs.

    Parameters
    ----------
    kind : str
        One of :data:`SWEEP_KINDS`.
    label : str
        Short readable name (``guided/default/3``, the journal's or image's name).
    params : dict
        JSON-able arguments of the kind's task function.
    input_files : tuple of str
        Files the task reads; their size and modification time enter the key, so a
        changed input is run again.

    Attributes
    ----------
    key : str
        16 hex characters hashing kind, parameters, input fingerprints and the Micrography
        version: equal inputs, equal key.
    """

    kind: str
    label: str
    params: dict[str, Any] = field(hash=False)
    input_files: tuple[str, ...] = ()
    key: str = field(default="", init=False)

    def __post_init__(self) -> None:
        # The key is fixed where the task is made (the client), so a worker that sees the
        # input files through another mount still reports the client's key.
        fingerprints = []
        for name in self.input_files:
            path = Path(name)
            stat = path.stat() if path.exists() else None
            fingerprints.append([str(path), None if stat is None else [stat.st_size, stat.st_mtime_ns]])
        text = json.dumps(
            {"kind": self.kind, "params": self.params, "inputs": fingerprints, "version": __version__},
            sort_keys=True,
            default=str,
        )
        object.__setattr__(self, "key", hashlib.sha256(text.encode()).hexdigest()[:16])


def _task_function(kind: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    module, _, name = TASK_FUNCTIONS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def _import_task_modules(kinds: Sequence[str]) -> None:
    for kind in kinds:
        _task_function(kind)


def warm_up(client: Any, kinds: Sequence[str]) -> None:
    """Import the task functions of ``kinds`` on every worker now, not inside the first tasks.

    Importing torch, Pyro and the pipeline takes a few seconds per worker process.

    Parameters
    ----------
    client : distributed.Client
        The cluster's client.
    kinds : sequence of str
        Sweep kinds.
    """
    client.run(_import_task_modules, list(kinds))


def execute_task(task: SweepTask, threads_per_task: int = 1) -> dict[str, Any]:
    """Run one task with a fixed thread count and return its outcome; never raises for a task error.

    This runs on a Dask worker (or in this process for a serial sweep).

    Parameters
    ----------
    task : SweepTask
        The task.
    threads_per_task : int
        Torch and BLAS threads while it runs.

    Returns
    -------
    dict
        ``key``, ``kind``, ``label``, ``params``, ``result`` (None on error), ``error`` (one
        line, None on success), ``seconds`` (the task's own run time), ``started_at`` (Unix
        time, s), ``peak_memory_mb`` (of the process that ran it), ``worker`` (``host:pid``).
    """
    import torch
    from threadpoolctl import threadpool_limits

    started_at = time.time()
    started = time.perf_counter()
    previous = torch.get_num_threads()
    result, error = None, None
    try:
        torch.set_num_threads(threads_per_task)
        with threadpool_limits(limits=threads_per_task):
            result = jsonable(_task_function(task.kind)(task.params))
    except Exception as exc:  # one failing task is reported, never fatal to the sweep
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        torch.set_num_threads(previous)
    return {
        "key": task.key,
        "kind": task.kind,
        "label": task.label,
        "params": task.params,
        "result": result,
        "error": error,
        "seconds": time.perf_counter() - started,
        "started_at": started_at,
        "peak_memory_mb": peak_memory_mb(),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }


class ResultStore:
    """Finished task outcomes, one JSON file per task key under ``folder/tasks``.

    Parameters
    ----------
    folder : str or pathlib.Path
        The sweep's output folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder) / "tasks"

    def path(self, key: str) -> Path:
        """The file of one task's outcome."""
        return self.folder / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored outcome of a task, or None when it has not finished (or its file is unreadable)."""
        path = self.path(key)
        try:
            outcome = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return outcome if isinstance(outcome, dict) and outcome.get("key") == key else None

    def save(self, outcome: dict[str, Any]) -> None:
        """Write a finished outcome atomically (a crash leaves the old file or none, never half of one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(outcome["key"])
        partial = final.with_suffix(f".{os.getpid()}.partial")
        with partial.open("w", encoding="utf-8") as handle:
            json.dump(outcome, handle, allow_nan=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, final)


@dataclass
class SweepRun:
    """What a sweep did.

    Parameters
    ----------
    outcomes : list of dict
        One per task, in task order (None for a task that did not finish).
    cached : int
        Tasks loaded from earlier runs.
    ran : int
        Tasks run now and finished.
    failures : list of dict
        ``label``, ``key`` and ``error`` of each task that failed.
    wall_s : float
        Wall time of the run, s (cluster start excluded).
    workers : int
        Workers that ran tasks (1 for a serial sweep).
    scheduler : str
        ``serial`` or the scheduler's address.
    timeline : dict
        Per task run now: (submitted, arrived) Unix times, s, as the client saw them.
    """

    outcomes: list[dict[str, Any] | None]
    cached: int
    ran: int
    failures: list[dict[str, Any]]
    wall_s: float
    workers: int
    scheduler: str
    timeline: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def results(self) -> list[dict[str, Any]]:
        """The results of the finished tasks, in task order."""
        return [outcome["result"] for outcome in self.outcomes if outcome is not None]

    @property
    def complete(self) -> bool:
        """True when every task has a result."""
        return all(outcome is not None for outcome in self.outcomes)


def default_workers(memory_per_task_mb: float, threads_per_task: int = 1) -> int:
    """Workers for a local cluster: one per core's worth of threads, as many as memory allows.

    Parameters
    ----------
    memory_per_task_mb : float
        Peak memory of one task, MB.
    threads_per_task : int
        Threads each task uses.

    Returns
    -------
    int
        At least 1.
    """
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    usable_mb = 0.8 * psutil.virtual_memory().total / 2**20
    return max(1, min(cores // max(1, threads_per_task), int(usable_mb // memory_per_task_mb)))


def check_scheduler(scheduler: str | None, scheduler_file: str | None) -> None:
    """Refuse a malformed scheduler address or a missing scheduler file before anything starts.

    Raises
    ------
    SweepError
        Naming the option and the value.
    """
    if scheduler is not None and scheduler_file is not None:
        raise SweepError("give --scheduler or --scheduler-file, not both")
    if scheduler is not None and not _SCHEDULER_ADDRESS.match(scheduler):
        raise SweepError(f"--scheduler {scheduler!r}: expected an address such as tcp://10.0.0.5:8786")
    if scheduler_file is not None and not Path(scheduler_file).is_file():
        raise SweepError(
            f"--scheduler-file {scheduler_file}: no such file (dask scheduler --scheduler-file writes it)"
        )


@contextmanager
def dask_client(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    memory_per_task_mb: float = 1000.0,
    threads_per_task: int = 1,
    connect_timeout_s: float = 10.0,
) -> Iterator[Any]:
    """A ``distributed.Client``: on an existing cluster, or on a local one that closes afterwards.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://HOST:PORT``).
    scheduler_file : str, optional
        Scheduler file written by ``dask scheduler --scheduler-file`` (or dask-jobqueue).
    workers : int, optional
        Workers of the local cluster (default: :func:`default_workers`).
    memory_per_task_mb : float
        Peak memory of one task, MB: sizes the local cluster and each worker's memory limit.
    threads_per_task : int
        Threads per task; a local worker runs one task at a time with this many threads.
    connect_timeout_s : float
        How long to try reaching an existing scheduler, s.

    Yields
    ------
    distributed.Client

    Raises
    ------
    SweepError
        If the scheduler cannot be reached within ``connect_timeout_s``.
    """
    import logging

    import dask
    from distributed import Client, LocalCluster

    check_scheduler(scheduler, scheduler_file)
    if scheduler is not None or scheduler_file is not None:
        try:
            client = Client(scheduler, scheduler_file=scheduler_file, timeout=f"{connect_timeout_s}s")
        except (OSError, TimeoutError) as exc:
            where = scheduler or f"the address in {scheduler_file}"
            raise SweepError(
                f"cannot reach the Dask scheduler at {where} ({' '.join(str(exc).split())}); start one with "
                "`dask scheduler`, or leave out --scheduler for a local cluster"
            ) from None
        try:
            yield client
        finally:
            client.close()
        return
    import psutil

    count = workers or default_workers(memory_per_task_mb, threads_per_task)
    total_mb = psutil.virtual_memory().total / 2**20
    # Each worker gets its fair share of memory (never less than one task's peak), so that
    # Dask's memory manager pauses or restarts a runaway worker before the machine swaps.
    limit_mb = max(memory_per_task_mb, 0.9 * total_mb / count)
    threads = str(threads_per_task)
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 before spawning a worker; that also pins
    # glibc's mmap threshold, and the per-tile numpy work then runs twice as slow in page
    # faults (measured: a guidance session 9.3 s against 4.5 s). Workers keep glibc's default.
    # The worker's statistical profiler samples every thread's stack each 10 ms, holding the
    # GIL: 8 % of a session's time (measured, 5.4 s against 5.0 s). A sweep has no dashboard
    # to show the profile.
    settings = {
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        "distributed.worker.profile.enabled": False,
    }
    with dask.config.set(settings):
        cluster = LocalCluster(
            n_workers=count,
            threads_per_worker=1,
            processes=True,
            memory_limit=f"{limit_mb:.0f}MB",
            # No dashboard (bokeh is not installed); the scheduler's HTTP routes (health,
            # metrics) listen on loopback at a free port instead of 8787 on the scheduler host.
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
            env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads},
        )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def run_tasks(
    tasks: Sequence[SweepTask],
    store: ResultStore,
    client: Any | None = None,
    threads_per_task: int = 1,
    progress: bool = True,
) -> SweepRun:
    """Run the tasks not yet in ``store`` — in this process, or on a Dask cluster — and store each result.

    Parameters
    ----------
    tasks : sequence of SweepTask
        The sweep, in the order its results are gathered.
    store : ResultStore
        Where finished outcomes are kept (and found again by a rerun).
    client : distributed.Client, optional
        Runs the tasks on its cluster; None runs them one after another here.
    threads_per_task : int
        Torch and BLAS threads of each task.
    progress : bool
        Show a progress bar over the tasks on stderr.

    Returns
    -------
    SweepRun
    """
    from analysis.replay import progress_bar

    keys = [task.key for task in tasks]
    outcomes: dict[str, dict[str, Any] | None] = {key: store.load(key) for key in keys}
    todo = [task for task in tasks if outcomes[task.key] is None]
    # Duplicate tasks (same inputs) run once.
    todo = list({task.key: task for task in todo}.values())
    cached = len(tasks) - sum(outcomes[key] is None for key in keys)
    failures: list[dict[str, Any]] = []
    timeline: dict[str, tuple[float, float]] = {}
    ran = 0
    started = time.perf_counter()
    kind = tasks[0].kind if tasks else ""
    bar = progress_bar(f"{kind} sweep ({cached} done before)", progress)

    def finish(outcome: dict[str, Any], submitted: float) -> None:
        nonlocal ran
        timeline[outcome["key"]] = (submitted, time.time())
        if outcome["error"] is None:
            store.save(outcome)
            outcomes[outcome["key"]] = outcome
            ran += 1
        else:
            failures.append({"label": outcome["label"], "key": outcome["key"], "error": outcome["error"]})
        bar.advance(tracker)

    with bar:
        tracker = bar.add_task("", total=len(todo))
        if client is None:
            for task in todo:
                finish(execute_task(task, threads_per_task), time.time())
            workers, scheduler = 1, "serial"
        else:
            from distributed import as_completed

            warm_up(client, sorted({task.kind for task in todo}))
            submitted = time.time()
            futures = {
                client.submit(
                    execute_task, task, threads_per_task, key=f"micrography-{task.kind}-{task.key}"
                ): task
                for task in todo
            }
            for future in as_completed(futures):
                task = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # a lost worker fails its task, not the sweep
                    outcome = {"key": task.key, "label": task.label, "error": f"{type(exc).__name__}: {exc}"}
                finish(outcome, submitted)
                future.release()
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
            scheduler = client.scheduler.address
    return SweepRun(
        outcomes=[outcomes[key] for key in keys],
        cached=cached,
        ran=ran,
        failures=failures,
        wall_s=time.perf_counter() - started,
        workers=workers,
        scheduler=scheduler,
        timeline=timeline,
    )


# ----------------------------------------------------------------------------------------------
# Task lists of each kind, and the task functions of replay and analyze.


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Distinct readable folder names for inputs: the file stem, with its parent folder where stems repeat."""
    stems = [path.stem for path in paths]
    names = []
    for path, stem in zip(paths, stems, strict=True):
        name = stem if stems.count(stem) == 1 else f"{path.parent.name}-{stem}"
        names.append(re.sub(r"[^A-Za-z0-9._-]+", "_", name))
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def replay_tasks(
    journals: Sequence[str | Path],
    out: str | Path,
    *,
    every: int | None = None,
    steps: str | None = None,
    model: str | Path | None = None,
    config: str | Path | None = None,
    top_k: int = 5,
) -> list[SweepTask]:
    """One replay (and re-scoring, given a model or config) per journal.

    Each task writes what ``micrography replay`` writes, into ``out/replay/NAME``.

    Parameters
    ----------
    journals : sequence of path
        Session journals (``journal.h5``), checked to exist.
    out : path
        The sweep folder.
    every, steps, model, config, top_k
        As for ``micrography replay``.

    Returns
    -------
    list of SweepTask

    Raises
    ------
    SweepError
        If a journal, the model or the config does not exist.
    """
    import h5py

    # A journal named twice (as its file and as its session folder) is replayed once.
    files = list(dict.fromkeys(Path(journal).resolve() for journal in journals))
    for path in files:
        if not path.is_file():
            raise SweepError(f"journal {path}: no such file")
        # The signature only: a hundred journals are checked in well under a second.
        if not h5py.is_hdf5(path):
            raise SweepError(f"journal {path}: not an HDF5 file (a journal is the journal.h5 of a session)")
    model_path = None if model is None else Path(model).resolve()
    config_path = None if config is None else Path(config).resolve()
    extras = [path for path in (model_path, config_path) if path is not None]
    for path in extras:
        if not path.is_file():
            raise SweepError(f"{path}: no such file")
    names = _unique_names([path.parent if path.name == "journal.h5" else path for path in files])
    tasks = []
    for path, name in zip(files, names, strict=True):
        params = {
            "journal": str(path),
            "out": str(Path(out).resolve() / "replay" / name),
            "every": every,
            "steps": steps,
            "model": None if model_path is None else str(model_path),
            "config": None if config_path is None else str(config_path),
            "top_k": top_k,
        }
        tasks.append(SweepTask("replay", name, params, (str(path), *map(str, extras))))
    return tasks


def replay_task(params: dict[str, Any]) -> dict[str, Any]:
    """Replay one journal with :func:`analysis.replay.run_replay`; return its one-row summary.

    Parameters
    ----------
    params : dict
        From :func:`replay_tasks`.

    Returns
    -------
    dict
        ``journal``, ``out``, ``policy``, ``seed``, ``steps``, ``tiles``, ``mean_dose_e_per_a2``,
        the reproduction check, ground-truth counts and, when re-scored, ``spearman``,
        ``kendall`` and ``top_k_overlap``.
    """
    from analysis.replay import run_replay

    report = run_replay(
        params["journal"], params["out"], every=params["every"], steps=params["steps"],
        checkpoint=params["model"], config_path=params["config"], top_k=params["top_k"], progress=False,
    )  # fmt: skip
    reproduction = report["reproduction"]
    truth = report["ground_truth"]
    rescore = report["rescore"] or {}
    return {
        "journal": params["journal"],
        "out": params["out"],
        "policy": report["policy"],
        "seed": report["seed"],
        "steps": reproduction["steps"],
        "tiles": report["summary"]["tiles"],
        "mean_dose_e_per_a2": report["summary"]["mean_dose_e_per_a2"],
        "scores_reproduced": reproduction["scores_reproduced"],
        "nodes_reproduced": reproduction["nodes_reproduced"],
        "max_abs_score_difference": reproduction["max_abs_score_difference"],
        "planted_features": truth["planted_features"],
        "imaged_features": truth["imaged_features"],
        "detected_features": truth["detected_features"],
        "spearman": rescore.get("spearman"),
        "kendall": rescore.get("kendall"),
        "top_k_overlap": rescore.get("top_k_overlap"),
    }


def analyze_tasks(images: Sequence[str | Path], out: str | Path, options: dict[str, Any]) -> list[SweepTask]:
    """One full-frame analysis per image, each writing what ``micrography analyze`` writes.

    Parameters
    ----------
    images : sequence of path
        Images (any format ``analyze`` reads), checked to exist.
    out : path
        The sweep folder; image NAME goes to ``out/analyze/NAME``.
    options : dict
        :class:`analysis.analyze.AnalyzeConfig` fields, validated here.

    Returns
    -------
    list of SweepTask

    Raises
    ------
    SweepError, ConfigError
        If an image does not exist or an option is invalid. An image that exists but cannot
        be analysed fails its own task only.
    """
    from agent.config import validate_config
    from agent.materials import resolve_material
    from analysis.analyze import AnalyzeConfig

    validated = validate_config(options, AnalyzeConfig, "options")
    resolve_material(validated.material)  # an unknown material is refused before any image is read
    config = validated.model_dump(mode="json")
    if config.get("model"):
        config["model"] = str(Path(config["model"]).resolve())
    files = list(dict.fromkeys(Path(image).resolve() for image in images))
    for path in files:
        if not path.exists():
            raise SweepError(f"image {path}: no such file or folder")
    extras = [config["model"]] if config.get("model") else []
    tasks = []
    for path, name in zip(files, _unique_names(files), strict=True):
        params = {"image": str(path), "out": str(Path(out).resolve() / "analyze" / name), "config": config}
        tasks.append(SweepTask("analyze", name, params, (str(path), *extras)))
    return tasks


def analyze_task(params: dict[str, Any]) -> dict[str, Any]:
    """Analyse one image with :func:`analysis.analyze.run_analysis`; return its one-row summary.

    Parameters
    ----------
    params : dict
        From :func:`analyze_tasks`.

    Returns
    -------
    dict
        ``image``, ``out``, ``pixel_size_nm``, column counts, vacancy sites, lattice spacing,
        embedding clusters, anomalous columns, ``seconds`` and ``peak_memory_mb`` of the analysis.
    """
    from analysis.analyze import AnalyzeConfig, run_analysis

    outputs = run_analysis(params["image"], params["out"], AnalyzeConfig.model_validate(params["config"]))
    summary = outputs.summary
    columns = summary["columns"]
    return {
        "image": params["image"],
        "out": params["out"],
        "pixel_size_nm": summary["image"]["pixel_size_nm"],
        "columns": columns["total"],
        "A_columns": columns["counts"]["A"],
        "B_columns": columns["counts"]["B"],
        "O_columns": columns["counts"]["O"],
        "A_vacancy_sites": columns["vacancy_sites"]["A"],
        "B_vacancy_sites": columns["vacancy_sites"]["B"],
        "lattice_spacing_nm": columns["lattice_spacing_nm"],
        "embedding_clusters": summary["embedding"]["clusters"],
        "anomalous_columns": summary["anomaly"]["anomalous_columns"],
        "seconds": summary["timings_s"]["total"],
        "peak_memory_mb": summary["peak_memory_mb"],
    }


def guidance_sweep_tasks(**options: Any) -> list[SweepTask]:
    """The sessions of :func:`analysis.bench_guidance.guidance_tasks`, as sweep tasks."""
    from analysis.bench_guidance import guidance_tasks

    return [
        SweepTask("guidance", f"{t['policy']}/{t['layout']}/{t['seed']}", t)
        for t in guidance_tasks(**options)
    ]


def anomaly_sweep_tasks(**options: Any) -> list[SweepTask]:
    """The training seeds of :func:`analysis.bench_anomaly.anomaly_tasks`, as sweep tasks."""
    from analysis.bench_anomaly import anomaly_tasks

    return [SweepTask("anomaly", f"training seed {t['training_seed']}", t) for t in anomaly_tasks(**options)]


# ----------------------------------------------------------------------------------------------
# Gathering: the serial commands' reports, and tables for the batch kinds.


def _write_table(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["label", *[c for c in columns if c != "label"]])
        writer.writeheader()
        writer.writerows(rows)


def gather(kind: str, tasks: Sequence[SweepTask], run: SweepRun, out: Path) -> dict[str, Any]:
    """Write the sweep's report — the serial command's JSON (and table) — from the finished tasks.

    Parameters
    ----------
    kind : str
        The sweep kind.
    tasks : sequence of SweepTask
        The tasks, in order.
    run : SweepRun
        What ran.
    out : pathlib.Path
        The sweep folder.

    Returns
    -------
    dict
        ``report`` (the gathered report, None while a guidance or anomaly sweep is incomplete),
        ``text`` (the printed table) and ``files`` (paths written).
    """
    from agent.benchmarking import write_report

    files: dict[str, str] = {}
    report: dict[str, Any] | None = None
    text = ""
    if kind in ("guidance", "anomaly"):
        if run.complete:
            if kind == "guidance":
                from analysis.bench_guidance import format_report, guidance_report

                first = tasks[0].params
                report = guidance_report(run.results, first["budgets"], first["instrument"])
            else:
                from analysis.bench_anomaly import anomaly_report, format_report

                report = anomaly_report(run.results, [task.params for task in tasks])
            text = format_report(report)
            path = out / f"{kind}.json"
            write_report(report, path)
            files["report"] = str(path)
    else:
        rows = [
            {"label": task.label, **outcome["result"]}
            for task, outcome in zip(tasks, run.outcomes, strict=True)
            if outcome is not None
        ]
        rows += [{"label": failure["label"], "error": failure["error"]} for failure in run.failures]
        table = out / ("replays.csv" if kind == "replay" else "analyses.csv")
        _write_table(rows, table)
        files["table"] = str(table)
        report = {"rows": rows}
        text = format_rows(kind, rows)
    return {"report": report, "text": text, "files": files}


def format_rows(kind: str, rows: list[dict[str, Any]]) -> str:
    """The batch table of a replay or analyze sweep, one line per input."""

    def number(value: Any, digits: int = 3) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    if kind == "replay":
        lines = [
            f"{'journal':<28} {'policy':<8} {'tiles':>5} {'reproduced':>10} {'imaged':>7} {'spearman':>8}"
        ]
        for row in rows:
            if "error" in row:
                lines.append(f"{row['label']:<28} failed: {row['error']}")
                continue
            reproduced = "yes" if row["scores_reproduced"] and row["nodes_reproduced"] else "NO"
            imaged = (
                "-"
                if row["planted_features"] is None
                else f"{row['imaged_features']}/{row['planted_features']}"
            )
            lines.append(
                f"{row['label']:<28} {row['policy']:<8} {row['tiles']:>5} {reproduced:>10} {imaged:>7} "
                f"{number(row['spearman']):>8}"
            )
        return "\n".join(lines)
    lines = [
        f"{'image':<28} {'columns':>9} {'A vac':>6} {'B vac':>6} {'anomalous':>9} {'time s':>7} {'MB':>6}"
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['label']:<28} failed: {row['error']}")
            continue
        lines.append(
            f"{row['label']:<28} {row['columns']:>9,} {row['A_vacancy_sites']:>6} "
            f"{row['B_vacancy_sites']:>6} {row['anomalous_columns']:>9,} {row['seconds']:>7.1f} "
            f"{row['peak_memory_mb']:>6.0f}"
        )
    return "\n".join(lines)


def sweep_summary(
    kind: str, tasks: Sequence[SweepTask], run: SweepRun, files: dict[str, str]
) -> dict[str, Any]:
    """What ``sweep.json`` holds: counts, failures, per-task time, memory and worker, the files written."""
    return {
        "kind": kind,
        "tasks": len(tasks),
        "cached": run.cached,
        "ran": run.ran,
        "failed": run.failures,
        "complete": run.complete,
        "scheduler": run.scheduler,
        "workers": run.workers,
        "wall_s": run.wall_s,
        "memory_per_task_mb": TASK_MEMORY_MB[kind],
        "per_task": [
            {
                "label": task.label,
                "key": task.key,
                "seconds": None if outcome is None else outcome["seconds"],
                "peak_memory_mb": None if outcome is None else outcome["peak_memory_mb"],
                "worker": None if outcome is None else outcome["worker"],
            }
            for task, outcome in zip(tasks, run.outcomes, strict=True)
        ],
        "files": files,
        "version": __version__,
    }


def run_sweep(
    kind: str,
    tasks: Sequence[SweepTask],
    out: str | Path,
    *,
    serial: bool = False,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    threads_per_task: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a sweep (or its missing tasks), gather its report and write ``sweep.json``.

    Parameters
    ----------
    kind : str
        One of :data:`SWEEP_KINDS`.
    tasks : sequence of SweepTask
        From :func:`guidance_sweep_tasks`, :func:`anomaly_sweep_tasks`, :func:`replay_tasks`
        or :func:`analyze_tasks`.
    out : path
        The sweep folder (results under ``tasks/``, the report, ``sweep.json``).
    serial : bool
        Run the tasks here, one after another, without Dask.
    scheduler, scheduler_file : str, optional
        An existing Dask cluster; neither starts a local one.
    workers : int, optional
        Workers of the local cluster.
    threads_per_task : int
        Torch and BLAS threads of each task.
    progress : bool
        Progress bar on stderr.

    Returns
    -------
    dict
        :func:`sweep_summary`, plus ``text`` (the report table) and ``report``.

    Raises
    ------
    SweepError
        For a bad option, before any task runs.
    """
    if kind not in SWEEP_KINDS:
        raise SweepError(f"unknown sweep {kind!r}; choose one of {', '.join(SWEEP_KINDS)}")
    if not tasks:
        raise SweepError(f"the {kind} sweep has no tasks")
    if threads_per_task < 1:
        raise SweepError(f"--threads-per-task must be at least 1, got {threads_per_task}")
    if workers is not None and workers < 1:
        raise SweepError(f"--workers must be at least 1, got {workers}")
    if serial and (scheduler or scheduler_file or workers):
        raise SweepError(
            "--serial runs here without Dask: leave out --scheduler, --scheduler-file and --workers"
        )
    check_scheduler(scheduler, scheduler_file)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out)
    if serial:
        run = run_tasks(tasks, store, None, threads_per_task, progress)
    else:
        with dask_client(
            scheduler, scheduler_file, workers, TASK_MEMORY_MB[kind], threads_per_task
        ) as client:
            run = run_tasks(tasks, store, client, threads_per_task, progress)
    gathered = gather(kind, tasks, run, out)
    summary = sweep_summary(kind, tasks, run, gathered["files"])
    (out / "sweep.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n", encoding="utf-8")
    return summary | {"text": gathered["text"], "report": gathered["report"]}

"""`drpo train` (without --local): the actor–learner runtime on Ray, with the local trainer's outputs and errors.

On a machine with no cluster it starts an embedded one; under ``ray job submit`` (RAY_ADDRESS set) it
joins the job's cluster. Placement is checked before any actor starts; a bad model path, checkpoint
or resource plan ends with one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rich.console import Console

from drpo_core.training.stopping import GracefulStop, StopRequested
from services.observability.progress import StepProgress
from services.runtime.train_local import check_output_dir, print_run_summary, stopped


def run_ray(cfg, resume: Path | None, fail: Callable[[str], None]) -> dict:
    import ray
    import torch

    from drpo_core.training.checkpoint import CheckpointError
    from drpo_core.models.generator import ModelLoadError, resolve_model_path
    from drpo_core.training.precision import format_precision, precision_report
    from drpo_core.training.tracking import TrackerError
    from services.runtime.controller import Controller
    from services.observability.metrics import MetricsExporter
    from services.runtime.roles import PlacementError
    from services.runtime.cluster import LearnerStartError, PoolExhaustedError, RayRuntime, connect

    console = Console(stderr=True, soft_wrap=True)  # log files: one line per message
    out = Path(cfg.output.dir)
    resume = check_output_dir(out, resume, fail)
    try:
        resolve_model_path(cfg.model.path, cfg.model.revision)  # fail here in one line, not in every actor's constructor
    except ModelLoadError as e:
        fail(str(e))
    try:
        started = connect(cfg)
    except (ConnectionError, RuntimeError, ValueError) as e:
        fail(f"cannot reach the Ray cluster ({cfg.runtime.address or 'RAY_ADDRESS'}): {str(e).splitlines()[0]}")
    exporter, runtime = None, None
    try:
        if cfg.runtime.metrics_port:
            exporter = MetricsExporter(run=cfg.output.run_name or out.name)
            try:
                exporter.serve(cfg.runtime.metrics_port, cfg.runtime.metrics_host)
            except OSError as e:
                fail(f"runtime.metrics_port {cfg.runtime.metrics_port}: {e.strerror or e}")
            console.print(f"metrics on http://{cfg.runtime.metrics_host}:{cfg.runtime.metrics_port}/metrics")
        try:
            runtime = RayRuntime.start(cfg, out, resume=resume)
        except (PlacementError, PoolExhaustedError, LearnerStartError) as e:
            fail(str(e))
        rt, have = cfg.runtime, ray.cluster_resources()
        console.print(f"ray: {rt.generator.replicas} generator, {rt.reward.replicas} reward, {rt.learner.replicas} learner replica(s); "
                      f"max_staleness {rt.max_staleness}; cluster {have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU, "
                      f"{len([n for n in ray.nodes() if n.get('Alive')])} node(s)")
        console.print("devices: " + ", ".join(f"{k.split('/', 1)[1]} ×{v:g}" for k, v in runtime.placement().items()))
        exports = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n.get("Alive")]
        console.print("actor metrics (ray_drpo_actor_*, Ray's export): " + ", ".join(exports))
        learner_device = torch.device("cuda" if rt.learner.num_gpus > 0 else "cpu")  # the device the roles' precision is for
        console.print(format_precision(precision_report(cfg, learner_device)), highlight=False)
        controller = Controller(cfg, runtime, out, exporter)
        with StepProgress(console, cfg.trainer.steps, "DrPO·ray", cfg.trainer.log_every) as progress, \
                GracefulStop(cfg.runtime.stop_grace_s) as stop:
            try:
                result = controller.run(on_step=lambda stats: progress.update(stats, f"lag {stats['lag/mean']:.1f}"),
                                        resume=resume, stop=stop)
            except StopRequested as e:  # the actors stop below, in `finally`
                stopped(console, e, out)
            except (CheckpointError, TrackerError) as e:
                fail(str(e))
        print_run_summary(console, controller.step, out.resolve(), result)
        return result
    finally:
        if runtime is not None:
            runtime.shutdown()
        if exporter is not None:
            exporter.close()
        if started:
            ray.shutdown()

"""The ``mergeflow`` command line."""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from merge_ops import sizes
from merge_ops.adapter_merge import AdapterMergePlan, ModuleJob, merge_adapters, plan_adapter_merge
from merge_ops.engine import Piece, check_device, merge_model, peak_memory_estimate
from merge_ops.errors import OutputExistsError
from merge_ops.leftovers import clean_leftovers, find_leftovers
from merge_ops.methods.registry import METHODS
from merge_ops.output_folder import check_replaceable, check_unlocked, recipe_inputs
from merge_ops.plan import MergePlan, plan_merge
from merge_ops.recipe import Recipe
from merge_ops.recipe_file import load_recipe
from mergeflow import settings
from mergeflow.cli.console_errors import Interrupted, console, friendly_errors
from mergeflow.cli.stage import stage_app

app = typer.Typer(help="Merge fine-tuned LLMs that share a base, reproducibly.", no_args_is_help=True, add_completion=False)


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5000000000."""
    try:
        return sizes.parse_size(text)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _size_option(text: str) -> str:
    """Check a size option as it is read, before the command does anything."""
    parse_size(text)
    return text


ShardSize = Annotated[str, typer.Option("--shard-size", callback=_size_option, help="Maximum output shard size, e.g. 5GB, 500MB, 2GiB.")]
AllowNonfinite = Annotated[
    bool, typer.Option("--allow-nonfinite", help="Merge sources holding NaN or infinite values, and write such results (an error by default).")
]
AllowCrimes = Annotated[
    bool, typer.Option("--allow-crimes", help="Merge models of another architecture or model_type than the reference (mergekit's flag); shapes must still agree.")
]
ComputeDtype = Annotated[
    str,
    typer.Option("--compute-dtype", help="Arithmetic dtype: float32 (default), bfloat16, float16, or mergekit (the dtype mergekit uses for the method)."),
]


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return ""


def _plan(recipe: Recipe, shard_size: str, compute_dtype: str, allow_crimes: bool) -> MergePlan:
    return plan_merge(recipe, shard_size=parse_size(shard_size), compute_dtype=compute_dtype, allow_crimes=allow_crimes)


def _show_adapter_plan(plan: AdapterMergePlan) -> None:
    """Modules by kind (the last part of their names): how many, how many adapters have them, output rank, bytes."""
    kinds: dict[str, list[ModuleJob]] = {}
    for module in plan.modules:
        kinds.setdefault(module.name.rsplit(".", 1)[-1], []).append(module)
    table = Table(title=f"{plan.combination} merge of {len(plan.adapters)} adapter(s) into one adapter of {plan.base_model}")
    for column in ("module", "count", "adapters", "rank", "bytes"):
        table.add_column(column, justify="right" if column != "module" else "left")

    def span(values: set[int]) -> str:
        return f"{min(values)}-{max(values)}" if len(values) > 1 else str(min(values))

    for kind, modules in kinds.items():
        table.add_row(kind, str(len(modules)), span({len(m.inputs) for m in modules}), span({m.rank for m in modules}),
                      human(sum(plan.module_size(m) for m in modules)))
    Console().print(table)
    Console().print(f"modules: {len(plan.modules)}   r: {plan.config['r']}   read: {human(plan.input_bytes)}   write: {human(plan.total_size)}")


@app.command()
@friendly_errors
def plan(recipe: Path, shard_size: ShardSize = "5GB", compute_dtype: ComputeDtype = "float32", allow_crimes: AllowCrimes = False) -> None:
    """Show what a recipe will do: shards, tensor count, bytes to read and write, expected peak memory
    (for `output: adapter`: modules, ranks and bytes)."""
    loaded = load_recipe(recipe)
    if loaded.output == "adapter":
        _show_adapter_plan(plan_adapter_merge(loaded))
        return
    merge_plan = _plan(loaded, shard_size, compute_dtype, allow_crimes)
    table = Table(title=f"{merge_plan.method} merge of {len(merge_plan.sources)} model(s), {merge_plan.num_layers} layers")
    for column in ("shard", "tensors", "bytes"):
        table.add_column(column, justify="right" if column != "shard" else "left")
    for shard in merge_plan.shards:
        table.add_row(shard.file, str(len(shard.tensors)), human(shard.nbytes))
    Console().print(table)
    Console().print(
        f"tensors: {merge_plan.tensor_count}   read: {human(merge_plan.input_bytes)}   write: {human(merge_plan.total_size)}   "
        f"expected peak memory: ~{human(peak_memory_estimate(merge_plan))} above the interpreter"
    )


@app.command()
@friendly_errors
def merge(
    recipe: Path,
    out: Path,
    shard_size: ShardSize = "5GB",
    threads: Annotated[int, typer.Option(min=1, help="Torch threads for the arithmetic; reading and writing run on another thread.")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    compute_dtype: ComputeDtype = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_nonfinite: AllowNonfinite = False,
    allow_crimes: AllowCrimes = False,
) -> None:
    """Merge the models of RECIPE into the folder OUT (written atomically); with `output: adapter`, its adapters
    into one adapter folder."""
    torch.set_num_threads(threads)
    check_device(device)
    loaded = load_recipe(recipe)
    started = time.perf_counter()
    if loaded.output == "adapter":
        adapter_plan = plan_adapter_merge(loaded)
        digest = merge_adapters(adapter_plan, out, device=device, force=force, inputs=recipe_inputs(loaded), allow_nonfinite=allow_nonfinite)
        Console().print(f"merged {len(adapter_plan.adapters)} adapter(s) ({adapter_plan.combination}) into {out}: {len(adapter_plan.modules)} modules, "
                        f"r {adapter_plan.config['r']}, {human(adapter_plan.total_size)} written in {time.perf_counter() - started:.1f} s\n"
                        f"adapter_model.safetensors sha256 {digest}")
        return
    merge_plan = _plan(loaded, shard_size, compute_dtype, allow_crimes)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TextColumn("{task.fields[tensors]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"merging ({merge_plan.method})", total=merge_plan.total_size, tensors="")
        done = [0]

        def advance(piece: Piece) -> None:
            done[0] += piece.completes_tensor
            bar.update(task, advance=piece.nbytes, tensors=f"{done[0]}/{merge_plan.tensor_count} tensors")

        try:
            hashes = merge_model(merge_plan, out, device=device, force=force, progress=advance, inputs=recipe_inputs(loaded), allow_nonfinite=allow_nonfinite)
        except KeyboardInterrupt:
            raise Interrupted(f"nothing was written to {out} (its staging folder is removed)") from None
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = Table(title=f"merged into {out}")
    summary.add_column("shard")
    summary.add_column("sha256")
    for file, digest in hashes.items():
        summary.add_row(file, digest)
    Console().print(summary)
    Console().print(
        f"{merge_plan.tensor_count} tensors, {human(merge_plan.total_size)} written in {elapsed:.1f} s "
        f"({human(merge_plan.total_size / max(elapsed, 1e-9))}/s), peak RSS {human(peak)}"
    )


@app.command()
@friendly_errors
def demo() -> None:
    """Run the DVC pipeline (dvc.yaml) on the embedded default, then show the scores and where to look.

    family (built offline, cached) -> merge (a local Hub server: push, download, check, merge the shards) ->
    evaluate (lm-eval) -> publish (card, MLflow run, gate, Hub). Run it in the project folder; stages whose
    inputs did not change are skipped.
    """
    from mergeflow.cli.demo_report import print_demo_report, run_dvc_repro

    run_dvc_repro(Path.cwd(), console)
    print_demo_report(Path.cwd(), Console())


@app.command("demo-models")
def demo_models(
    out: Path,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if OUT holds this family already.")] = False,
) -> None:
    """Build the offline demo family in OUT: a tokenizer, a small base model, fine-tunes and LoRA adapters of skills (cached)."""
    from mergeflow.demo_family.adapters import build_adapters
    from mergeflow.demo_family.build import build_family

    with console.status("building the demo model family (first time: a few minutes)"):
        family = build_family(out, force=force)
    with console.status("training its LoRA adapters (first time: a few minutes)"):
        adapters = build_adapters(family, force=force)
    for what, summary in (("demo family", family), ("its LoRA adapters", adapters)):
        state = "reused (cached)" if summary.cached else f"built in {summary.seconds:.0f} s"
        Console().print(f"{what} {state}: " + ", ".join(f"{name} -> {path}" for name, path in summary.models.items()))


@app.command("extract-lora")
@friendly_errors
def extract_lora(
    model: Annotated[Path, typer.Argument(help="The fine-tuned model folder (safetensors).")],
    base: Annotated[Path, typer.Argument(help="The base model folder it was fine-tuned from; written as the adapter's base_model_name_or_path.")],
    out: Annotated[Path, typer.Argument(help="The adapter folder to write (written atomically).")],
    rank: Annotated[int | None, typer.Option("--rank", min=1, help="The rank of every module (capped by its smaller dimension).")] = None,
    max_error: Annotated[float | None, typer.Option("--max-error", help="Instead of --rank: the relative error each module may keep, in [0, 1); each gets the smallest rank that fits.")] = None,
    max_rank: Annotated[int | None, typer.Option("--max-rank", min=1, help="The largest rank --max-error may pick.")] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Also extract the embeddings and lm_head (PEFT embedding / linear adapters).")] = False,
    modules_to_save: Annotated[bool, typer.Option("--modules-to-save", help="Store modules with other changed tensors (norms, biases, embeddings without --embeddings) whole.")] = False,
    dtype: Annotated[str | None, typer.Option(help="dtype of the factors: float32, bfloat16 or float16 (default: the model's).")] = None,
    device: Annotated[str, typer.Option(help="Where the SVDs run: cpu, cuda or cuda:N.")] = "cpu",
    show: Annotated[int, typer.Option(min=1, help="Rows per table; with more modules, the worst by error.")] = 20,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Write a PEFT LoRA adapter OUT from MODEL - BASE: a truncated SVD of each linear module's task vector, one module at a time.

    Prints each module's rank and relative error ||D - BA|| / ||D||, the changed tensors the adapter does not capture,
    and the overall error.
    """
    from merge_ops.lora_extract import extract_lora as run_extraction
    from mergeflow.cli.lora_report import print_extraction

    if (rank is None) == (max_error is None):
        raise typer.BadParameter("give exactly one of --rank R (a fixed rank) and --max-error E (a relative error budget)", param_hint="--rank / --max-error")
    if max_error is not None and not 0 <= max_error < 1:
        raise typer.BadParameter(f"{max_error} is not in [0, 1)", param_hint="--max-error")
    if max_rank is not None and max_error is None:
        raise typer.BadParameter("--max-rank caps the ranks --max-error picks; with --rank it has no use", param_hint="--max-rank")
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tensors"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("extracting LoRA", total=None)
        report = run_extraction(
            model, base, out, rank=rank, max_error=max_error, max_rank=max_rank, embeddings=embeddings, modules_to_save=modules_to_save,
            dtype=dtype, device=device, force=force, progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    footer = f"{human(report.adapter_bytes)} written in {elapsed:.1f} s, peak RSS {human(peak)}"
    print_extraction(report, Console(), show=show, max_error=max_error, footer=footer)


@app.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    table = Table(title="merge methods")
    for column in ("method", "base model", "parameters", "what it does"):
        table.add_column(column)
    for m in METHODS.values():
        params = "\n".join(f"{name}: {p.describe()}" for name, p in m.params.items())
        table.add_row(m.name, m.base, params, m.summary)
    Console().print(table)


# -- the Prefect pipeline: run, check, serve ---------------------------------------------------------

Workers = Annotated[int, typer.Option(min=1, help="Shards merged at once by the thread-pool task runner (default MERGEFLOW_WORKERS).")]
DaskAddress = Annotated[str | None, typer.Option(help="Run the tasks on this Dask scheduler, e.g. tcp://host:8786 (default MERGEFLOW_DASK_ADDRESS).")]
DaskWorkers = Annotated[int, typer.Option(min=0, help="Run the tasks on a local Dask cluster of N worker processes (default MERGEFLOW_DASK_WORKERS).")]
Endpoint = Annotated[str | None, typer.Option(help="Hub URL (default HF_ENDPOINT).")]


@app.command()
@friendly_errors
def run(
    recipe: Path,
    out: Path,
    shard_size: ShardSize = "5GB",
    compute_dtype: ComputeDtype = "float32",
    workers: Workers = settings.WORKERS,
    dask_address: DaskAddress = settings.DASK_ADDRESS,
    dask_workers: DaskWorkers = settings.DASK_WORKERS,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    endpoint: Endpoint = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    allow_nonfinite: AllowNonfinite = False,
    allow_crimes: AllowCrimes = False,
) -> None:
    """Run the Prefect pipeline: resolve and check the models, download them, merge the shards in parallel into OUT.

    A run stopped midway and started again merges only the shards that are missing.
    """
    from flows.merge_pipeline import merge_pipeline
    from flows.runners import make_task_runner, share_api_with_worker_processes
    from mergeflow.cli.staging_progress import StagingProgress

    if out.exists() and not force:
        raise OutputExistsError(str(out))
    check_replaceable(out, recipe_inputs(load_recipe(recipe)))  # before the flow resolves and downloads; it checks again holding the lock
    check_unlocked(out)
    runner = make_task_runner(workers=workers, dask_address=dask_address, dask_workers=dask_workers)
    if dask_workers and not dask_address:
        share_api_with_worker_processes()
    with StagingProgress(out, console):
        try:
            summary = merge_pipeline.with_options(task_runner=runner)(
                recipe=recipe.absolute(), out=out.absolute(), shard_size=parse_size(shard_size), compute_dtype=compute_dtype,
                force=force, device=device, endpoint=endpoint, allow_nonfinite=allow_nonfinite, allow_crimes=allow_crimes,
            )
        except KeyboardInterrupt:
            raise Interrupted(interrupted_run_note(out)) from None
    table = Table(title=f"merged into {summary.out}")
    for column in ("shard", "MB", "seconds", "sha256"):
        table.add_column(column)
    for shard in summary.shards:
        resumed = " (resumed)" if shard.index in summary.resumed else ""
        table.add_row(shard.file + resumed, f"{shard.nbytes / 1e6:.1f}", f"{shard.seconds:.1f}", shard.sha256)
    Console().print(table)
    for warning in summary.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    Console().print(
        f"{summary.tensor_count} tensors, {human(summary.total_size)} written; pipeline {summary.pipeline_seconds:.1f} s, "
        f"shards {summary.merge_seconds:.1f} s ({human(summary.throughput)}/s)"
    )


def interrupted_run_note(out: Path) -> str:
    """What an interrupted ``run`` leaves: the staging folder a rerun resumes from, if any."""
    kept = [path for path, _, kind in find_leftovers(out) if kind == "staging"]
    if not kept:
        return f"nothing was written to {out}"
    return (f"{out} was not written; the shards finished so far are kept in {kept[0]}: run the same command again to resume, "
            f"or `mergeflow clean {out}` to remove them")


@app.command()
@friendly_errors
def clean(
    paths: Annotated[list[Path] | None, typer.Argument(help="Output folders, or folders holding outputs (default: the current folder).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed or restored.")] = False,
) -> None:
    """Remove what killed merges left beside their outputs (staging folders), and put back an output a killed `--force`
    merge had moved aside; leftovers of merges still running are left alone."""
    items = [item for path in paths or [Path(".")] for item in clean_leftovers(path, dry_run=dry_run)]
    if not items:
        Console().print("nothing to clean")
        return
    table = Table(title="leftovers of killed merges")
    for column in ("path", "output", "size", "action"):
        table.add_column(column)
    for item in items:
        table.add_row(str(item.path), str(item.out), human(item.nbytes), item.action)
    Console().print(table)
    freed = sum(item.nbytes for item in items if item.action == "removed")
    Console().print(f"{human(freed)} freed" if not dry_run else f"{len(items)} leftover(s); run without --dry-run to clean them")


@app.command()
@friendly_errors
def check(recipe: Path, endpoint: Endpoint = None) -> None:
    """Check that the models of RECIPE can be merged, from configs and safetensors headers (no weights downloaded).

    When every model is a local folder, also checks in weight space that each was fine-tuned from the base.
    Exits with 1 when the models are not compatible.
    """
    load_recipe(recipe)  # a broken recipe fails here, before Prefect is imported and started
    from rich.markdown import Markdown

    from flows.check import check_models

    report = check_models(recipe=recipe.absolute(), endpoint=endpoint)
    Console().print(Markdown(report.markdown()))
    if not report.compatible:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def serve(
    recipe: Path,
    cron: Annotated[str, typer.Option(help='Cron schedule, e.g. "0 3 * * *" (03:00 every day).')],
    out: Annotated[Path | None, typer.Option(help="Output folder, replaced by each run (default merged/RECIPE-NAME).")] = None,
    name: Annotated[str | None, typer.Option(help="Deployment name (default merge-RECIPE-NAME).")] = None,
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    shard_size: ShardSize = "5GB",
    compute_dtype: ComputeDtype = "float32",
    workers: Workers = settings.WORKERS,
    dask_address: DaskAddress = settings.DASK_ADDRESS,
    dask_workers: DaskWorkers = settings.DASK_WORKERS,
) -> None:
    """Serve the pipeline for RECIPE as a Prefect deployment on a cron schedule (runs until interrupted).

    Needs a Prefect server (PREFECT_API_URL); each run re-resolves the Hub revisions and replaces OUT when complete.
    """
    from prefect import serve as prefect_serve
    from prefect.schedules import Cron

    from flows.merge_pipeline import merge_pipeline
    from flows.runners import make_task_runner

    load_recipe(recipe)
    runner = make_task_runner(workers=workers, dask_address=dask_address, dask_workers=dask_workers)
    deployment = merge_pipeline.with_options(task_runner=runner).to_deployment(
        name=name or f"merge-{recipe.stem}",
        schedule=Cron(cron, timezone=timezone),
        parameters={
            "recipe": str(recipe.absolute()),
            "out": str((out or Path("merged") / recipe.stem).absolute()),
            "shard_size": parse_size(shard_size),
            "compute_dtype": compute_dtype,
            "force": True,
        },
        description=f"Merge {recipe.name} on the schedule {cron} ({timezone}).",
    )
    prefect_serve(deployment)  # type: ignore[arg-type]  # to_deployment is sync here (no running event loop)


# -- sweep: a grid of recipe variants, merged, evaluated, ranked; the best through the gate --------------


@app.command()
@friendly_errors
def sweep(
    recipe: Path,
    grid: Annotated[list[str], typer.Option("--grid", help="KEY=V1,V2,...: merge methods (method=ties,dare_ties) or a recipe parameter's values (density=0.3,0.5); repeat for each key.")],
    out: Annotated[Path | None, typer.Option(help="Folder of the candidates' recipes and merged models (default sweeps/RECIPE-NAME).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Candidates merged at once.")] = settings.WORKERS,
    publish: Annotated[str | None, typer.Option(help="Hub repo id: send the best candidate through the gate and publish it there if it passes.")] = None,
    endpoint: Endpoint = None,
    params: Annotated[Path, typer.Option("--params", help="params.yaml with the eval: and gate: sections.")] = settings.PARAMS_FILE,
    force: Annotated[bool, typer.Option("--force", help="Merge into OUT even if it exists, replacing candidates of the same name.")] = False,
) -> None:
    """Merge every candidate of the grid over RECIPE, evaluate and rank them, and optionally publish the best.

    The candidates are the cartesian product of the --grid values; parameters a candidate's method does not
    have are left out (task_arithmetic has no density). Each is an MLflow child run of the sweep's run.
    """
    import yaml

    from flows.runners import make_task_runner
    from flows.sweep import sweep as sweep_flow
    from merge_ops.sweep_grid import expand_grid, parse_grid
    from mergeflow.evaluation import mean_score

    parsed = parse_grid(grid)
    expand_grid(yaml.safe_load(recipe.read_text()), parsed, source=str(recipe))  # grid errors before Prefect starts
    out = out or Path("sweeps") / recipe.stem
    if out.exists() and not force:
        raise OutputExistsError(str(out))
    result = sweep_flow.with_options(task_runner=make_task_runner(workers=workers))(
        recipe=recipe.absolute(), grid=parsed, out=out.absolute(), publish_repo=publish, params_file=params, force=force, endpoint=endpoint,
    )
    tasks = list(dict.fromkeys(t for c in result.candidates for t in c.scores))
    table = Table(title=f"sweep of {recipe.name}: {len(result.candidates)} candidate(s), best first (mean of each task's primary metric)")
    table.add_column("rank", justify="right")
    table.add_column("candidate", no_wrap=True)
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    table.add_column("MLflow run", overflow="fold")
    for c in result.candidates:
        table.add_row(str(c.rank), c.name, *(f"{c.scores[t]:.3f}" if t in c.scores else "-" for t in tasks), f"{c.mean:.3f}", c.run_id)
    for key, scores in result.references.items():
        cells = [f"{scores[t]:.3f}" if t in scores else "-" for t in tasks]
        table.add_row("", f"source {key}", *cells, f"{mean_score(scores):.3f}", "", style="dim")
    Console().print(table)
    outcome = result.publish
    if outcome is None:
        verdict = "not sent through the gate (pass --publish REPO to publish the best)"
    elif outcome.published:
        verdict = f"published: {outcome.published.url} (commit {outcome.published.commit_sha})"
    else:
        verdict = "gate failed, not published: " + "; ".join(outcome.gate.reasons)
    Console().print(
        f"best: {result.best.name} in {result.best.folder}; {verdict}\n"
        f"candidates and their recipes: {result.out}\n"
        f"MLflow parent run {result.parent_run_id}: mlflow ui --backend-store-uri {result.tracking_uri}",
        highlight=False,
    )


# -- lineage, read from MLflow ----------------------------------------------------------------------


@app.command()
@friendly_errors
def lineage(
    name: Annotated[str, typer.Argument(help="Registered model name in MLflow (a repo id's '/' reads as '--').")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store (default MLFLOW_TRACKING_URI, else ./mlruns).")] = None,
) -> None:
    """Print the lineage of every version of NAME: sources -> merged -> published, read from MLflow."""
    from rich.tree import Tree

    from mergeflow.tracking import lineage as read_lineage

    found = read_lineage(name, tracking_uri=tracking_uri)
    root = Tree(f"[bold]{found.name}[/bold] ({len(found.versions)} version(s) in {found.tracking_uri})")
    for v in found.versions:
        branch = root.add(f"version {v.version}  run {v.run_id}")
        sources = branch.add("sources")
        for s in sorted(v.sources, key=lambda s: not s.is_base):
            sources.add(f"{'base    ' if s.is_base else 'source  '}{s.pinned}" + (f"  (asked: {s.revision})" if s.revision else ""))
        merged = branch.add(f"merged  {v.method} -> content sha256 {v.output_hash}  (recipe sha256 {v.recipe_sha256})")
        gate = "passed" if v.gate == "passed" else f"failed: {v.gate_reasons}" if v.gate == "failed" else "not recorded"
        merged.add(f"gate    {gate}")
        if v.hub_commit:
            merged.add(f"published  {v.hub_repo_id} @ {v.hub_commit}  ({v.hub_url})")
        else:
            merged.add(f"not published ({v.outcome or 'no outcome recorded'})")
    Console(width=200).print(root, highlight=False)


app.add_typer(stage_app, name="stage")


def main() -> None:
    app(prog_name="mergeflow")


if __name__ == "__main__":
    main()

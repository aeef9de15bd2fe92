"""The ``edgeq`` command line: a thin layer over :mod:`edgeq.api`.

Exit codes: 0 success / within thresholds, 1 a validation or legality check failed, 2 bad input or usage,
130 interrupted. User errors print one line (``error: ...``); ``--verbose`` shows tracebacks and debug logs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click

from edgeq.errors import EdgeqError

_STATE = {"verbose": False}


def _fail_usage(msg: str) -> None:
    raise click.UsageError(msg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.version_option(package_name="edgeq", message="edgeq %(version)s")
def cli(verbose: bool) -> None:
    """Quantize ONNX models for TensorRT, QNN and Core ML, and validate them against FP32."""
    _STATE["verbose"] = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _write_extra_reports(rep: dict, html_out: Path | None, junit_out: Path | None) -> None:
    if html_out is not None:
        from edgeq.html_report import write_html

        write_html(rep, html_out)
    if junit_out is not None:
        from edgeq.junit import write_junit

        write_junit(rep, junit_out)


def _thresholds_table(rep: dict) -> str:
    from edgeq.report import summary_table

    return summary_table(rep["validation"])


def _print_quantize(rep: dict) -> None:
    q = rep["quantization"]
    out = rep["output"]
    click.echo(f"wrote {out['path']}  ({rep['model']['size_bytes'] / 1e6:.2f} MB -> {out['size_bytes'] / 1e6:.2f} MB, "
               f"opset {out['opset']})")
    frac = q["quantized_compute_fraction"]
    click.echo(f"quantized {q['compute_ops_quantized']}/{q['compute_ops']} Conv/MatMul/Gemm"
               f"{f' ({frac:.0%})' if frac is not None else ''}, {q['quantize_nodes']} activation Q/DQ, "
               f"{q['dequantize_nodes'] - q['quantize_nodes']} weight DQ"
               f"{f', {wo} with weight-only int weights' if (wo := q.get('compute_ops_weight_only')) else ''}"
               f"{f', {n16} in float16' if (n16 := q.get('compute_ops_float16')) else ''}; "
               f"{len(rep['skipped'])} skipped (see report)")
    fb = rep.get("fallback")
    if fb:
        click.echo(f"fallback: {fb['stopped']}; kept in float: {', '.join(fb['float_nodes']) or 'none'} "
                   f"(calibration-data cosine {fb['best']['cosine']:.4f}, {fb['evaluations']} evaluations, "
                   f"{fb['seconds']:.0f}s)")
    if rep.get("lint") and rep["lint"]["errors"]:
        click.echo(f"check: {rep['lint']['errors']} legality errors for {rep['lint']['target']} "
                   f"(run 'edgeq check')")
    if "validation" in rep:
        v = rep["validation"]
        click.echo(_thresholds_table(rep))
        lat = v.get("latency_ms") or {}
        if lat:
            click.echo(f"latency (ORT CPU, median): fp32 {_ms(lat.get('reference'))}, "
                       f"quantized {_ms(lat.get('candidate'))}" + (f" ({lat['note']})" if lat.get("note") else ""))
        click.echo("PASSED" if v["passed"] else "FAILED: " + "; ".join(v["failures"]))


def _ms(latency: dict | None) -> str:
    return f"{latency['median']:.2f} ms" if latency else "not measured"


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", required=True, help="Built-in target name (edgeq targets) or a profile .yaml.")
@click.option("--calib", required=True, help="Calibration data: .npz, folder of .npz, folder of images, or module:function.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output .onnx path.")
@click.option("--eval", "eval_data", default=None, help="Evaluation data (kept apart from calibration).")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--stats", type=click.Path(path_type=Path), default=None,
              help="Calibration statistics file: reused if it exists, written otherwise.")
@click.option("--preprocess", type=click.Path(path_type=Path), default=None, help="Image preprocessing YAML.")
@click.option("--max-calib-samples", type=click.IntRange(min=1), default=None)
@click.option("--min-cosine", type=float, default=None, help="Override the profile's cosine threshold.")
@click.option("--min-sqnr", type=float, default=None, help="Override the profile's SQNR threshold (dB).")
@click.option("--keep-float", multiple=True, help="Keep nodes in float: an op type (Softmax) or a node name.")
@click.option("--auto-fallback", is_flag=True,
              help="Keep the fewest most sensitive layers in float until the thresholds hold (scored on the "
                   "calibration data, never on --eval).")
@click.option("--fallback-time-limit", type=click.FloatRange(min=1), default=None,
              help="Seconds the automatic fallback may spend (default 300); the best model found is kept.")
@click.option("--fallback-metric", default=None,
              help="Task metric for --auto-fallback: module:function or file.py:function called as "
                   "fn(reference_outputs, candidate_outputs) -> float, higher is better.")
@click.option("--fallback-min-metric", type=float, default=None,
              help="Value --fallback-metric must reach (required with it).")
@click.option("--dump-dir", type=click.Path(path_type=Path), default=None, help="Save the graph after each pass.")
@click.option("--html", "html_out", type=click.Path(path_type=Path), default=None, help="Self-contained HTML report.")
@click.option("--junit", "junit_out", type=click.Path(path_type=Path), default=None, help="JUnit XML for CI systems.")
def quantize(model, target, calib, output, eval_data, report, stats, preprocess, max_calib_samples, min_cosine,
             min_sqnr, keep_float, auto_fallback, fallback_time_limit, fallback_metric, fallback_min_metric,
             dump_dir, html_out, junit_out):
    """Canonicalise, calibrate, insert Q/DQ for TARGET, save, check, and validate when --eval is given."""
    import dataclasses

    from edgeq import api
    from edgeq.profiles import Override

    profile = api.resolve_profile(target)
    if keep_float:
        extra = tuple(Override(op_type=k, precision="float") if k[:1].isupper() and "/" not in k
                      else Override(node=k, precision="float") for k in keep_float)
        profile = dataclasses.replace(profile, overrides=profile.overrides + extra)
    result = api.quantize(model, target=profile, calib=calib, output=output, eval_data=eval_data, report=report,
                          stats=stats, preprocess=preprocess, max_calib_samples=max_calib_samples,
                          min_cosine=min_cosine, min_sqnr=min_sqnr, progress=True, dump_dir=dump_dir,
                          fallback=_fallback_options(auto_fallback, fallback_metric, fallback_min_metric),
                          time_limit_s=fallback_time_limit)
    _write_extra_reports(result.report, html_out, junit_out)
    _print_quantize(result.report)
    if result.passed is False:
        sys.exit(1)


def _fallback_options(enabled: bool, metric: str | None, min_metric: float | None):
    if not enabled:
        if metric is not None or min_metric is not None:
            _fail_usage("--fallback-metric/--fallback-min-metric need --auto-fallback")
        return False
    if metric is None and min_metric is None:
        return True
    if metric is None or min_metric is None:
        _fail_usage("--fallback-metric and --fallback-min-metric go together")
    from edgeq.precision import FallbackOptions

    return FallbackOptions(metric=metric, min_metric=min_metric)


@cli.command()
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Evaluation data (same formats as --calib).")
@click.option("-t", "--target", default=None, help="Take thresholds from this target profile.")
@click.option("--report", type=click.Path(path_type=Path), default=None)
@click.option("--backend", type=click.Choice(["ort", "qnn", "coreml", "tensorrt"]), default="ort",
              help="Where the candidate runs (ort = exact QDQ simulation on CPU).")
@click.option("--soc", default=None, help="QNN: SoC model / HTP architecture for --backend qnn.")
@click.option("--min-cosine", type=float, default=None)
@click.option("--min-sqnr", type=float, default=None)
@click.option("--preprocess", type=click.Path(path_type=Path), default=None)
@click.option("--html", "html_out", type=click.Path(path_type=Path), default=None, help="Self-contained HTML report.")
@click.option("--junit", "junit_out", type=click.Path(path_type=Path), default=None, help="JUnit XML for CI systems.")
def validate(reference, candidate, data, target, report, backend, soc, min_cosine, min_sqnr, preprocess, html_out,
             junit_out):
    """Compare CANDIDATE with REFERENCE; exit 0 within thresholds, 1 outside, 2 on bad input."""
    from edgeq import api
    from edgeq.report import summary_table

    result = api.validate(reference, candidate, data=data, target=target, report=report, backend=backend,
                          min_cosine=min_cosine, min_sqnr=min_sqnr, preprocess=preprocess, soc=soc, progress=True)
    _write_extra_reports(result.report, html_out, junit_out)
    click.echo(summary_table(result.as_dict()))
    lat = result.latency_ms
    if lat:
        click.echo(f"latency median: reference {_ms(lat.get('reference'))}, candidate {_ms(lat.get('candidate'))} ({backend})"
                   + (f"; {lat['note']}" if lat.get("note") else ""))
    click.echo("PASSED" if result.passed else "FAILED: " + "; ".join(result.failures))
    sys.exit(0 if result.passed else 1)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--tensors", is_flag=True, help="List every quantized tensor.")
def inspect(model, as_json, tensors):
    """Opset, inputs/outputs, op histogram, size, and which tensors are quantized."""
    from edgeq.inspect import describe, format_description

    d = describe(model)
    click.echo(json.dumps(d, indent=2) if as_json else format_description(d, all_tensors=tensors))


def _parse_input_shapes(specs) -> dict[str, list[int]] | None:
    shapes = {}
    for spec in specs:
        name, _, dims = spec.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            _fail_usage(f"--input-shape {spec!r}: expected name=1,3,224,224")
        if not name or not dims:
            _fail_usage(f"--input-shape {spec!r}: expected name=1,3,224,224")
    return shapes or None


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", required=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--input-shape", "input_shapes", multiple=True,
              help="name=1,3,224,224: check the model as 'edgeq compile --input-shape' would compile it.")
def check(model, target, as_json, input_shapes):
    """Check that MODEL is legal for TARGET; exit 0 when legal, 1 otherwise."""
    from edgeq import api
    from edgeq.lint import format_result

    result = api.check(model, target=target, input_shapes=_parse_input_shapes(input_shapes))
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else format_result(result))
    sys.exit(0 if result.passed else 1)


@cli.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", required=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--soc", default=None, help="QNN: SoC model or HTP architecture (e.g. 60, v73).")
@click.option("--backend", "backend_name", default=None, type=click.Choice(["tensorrt", "qnn", "coreml", "ort"]),
              help="Override the profile's compile backend (ort = ORT Mobile .ort file).")
@click.option("--input-shape", "input_shapes", multiple=True, help="name=1,3,224,224 to fix a dynamic input.")
def compile_cmd(model, target, output, soc, backend_name, input_shapes):
    """Compile a quantized model for its target (QNN context binary, Core ML package, TensorRT engine, .ort)."""
    from edgeq import api

    result = api.compile_model(model, target=target, output=output, soc=soc, backend=backend_name,
                               input_shapes=_parse_input_shapes(input_shapes))
    for line in result.get("summary", []):
        click.echo(line)


@cli.group(invoke_without_command=True)
@click.pass_context
def targets(ctx):
    """List the built-in target profiles (or 'targets show NAME')."""
    if ctx.invoked_subcommand is None:
        from edgeq.profiles import list_targets

        profiles = list_targets()
        width = max((len(p.name) for p in profiles), default=0)
        for p in profiles:
            click.echo(f"{p.name:<{width}}  {p.description}")


@targets.command("show")
@click.argument("name")
def targets_show(name):
    """Print the resolved profile NAME (built-in or a YAML path) as YAML."""
    from edgeq.profiles import load_profile, profile_yaml

    click.echo(profile_yaml(load_profile(name)), nl=False)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", required=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Statistics file (.npz).")
@click.option("--preprocess", type=click.Path(path_type=Path), default=None)
@click.option("--max-samples", type=click.IntRange(min=1), default=None)
def calibrate(model, calib, output, preprocess, max_samples):
    """Run calibration alone and save the statistics for reuse (quantize --stats FILE)."""
    from edgeq import api
    from edgeq.model_io import check_output_path

    check_output_path(output, model)
    stats = api.calibrate(model, calib, stats_out=output, preprocess=preprocess, max_samples=max_samples,
                          progress=True)
    click.echo(f"wrote {output}: {len(stats.tensors)} tensors over {stats.samples} samples")


@cli.command()
@click.option("-t", "--target", default="tensorrt", show_default=True)
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the quantized model and report here.")
def demo(target, output_dir):
    """Quantize and validate the bundled digits CNN, showing FP32 vs INT8 accuracy and size."""
    from edgeq import api

    rep = api.demo(output_dir=output_dir, target=target, progress=True)
    d = rep["demo"]
    click.echo(f"edgeq demo: digits CNN (scikit-learn digits, {rep['validation']['samples']} held-out images), "
               f"target {target}")
    _print_quantize(rep)
    click.echo(f"accuracy  fp32 {d['fp32_accuracy']:.4f}  int8 {d['int8_accuracy']:.4f}")
    click.echo(f"size      fp32 {d['fp32_size_bytes'] / 1024:.1f} KiB  int8 {d['int8_size_bytes'] / 1024:.1f} KiB")
    if output_dir is None:
        click.echo("(the quantized model and report above were temporary; use -o DIR to keep them)")
    if not rep["passed"]:
        sys.exit(1)


@cli.command()
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="Evaluation data (same formats as --calib).")
@click.option("--max-samples", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the layer table as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a PNG plot of error by layer.")
@click.option("--top", type=int, default=20, show_default=True, help="Rows to print.")
def debug(reference, candidate, data, max_samples, json_out, plot, top):
    """Compare every quantized tensor with its FP32 counterpart and name where the error jumps."""
    from edgeq.debug import debug as run_debug

    result = run_debug(reference, candidate, data=data, max_samples=max_samples, json_out=json_out, plot=plot)
    click.echo(result.table(top=top))


@cli.command(name="run")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the quantized models and report.json (default: out/<pipeline name>).")
@click.option("-t", "--target", default=None,
              help="Replace the pipeline's default target (stages that name their own keep it).")
def run_cmd(pipeline, output_dir, target):
    """Quantize a multi-model pipeline (PIPELINE.yaml, see docs/pipelines.md) and validate it end to end."""
    from edgeq.pipeline import format_summary, run_pipeline

    result = run_pipeline(pipeline, output_dir=output_dir, target=target, progress=True)
    click.echo(format_summary(result.report))
    if result.passed is False:
        sys.exit(1)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="edgeq", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line, like every other error
        where = exc.ctx.command_path if exc.ctx is not None else "edgeq"
        click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C (and our SIGTERM) into Abort
        interrupted = isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)
        click.echo("error: interrupted; no output was written" if interrupted else "error: aborted", err=True)
        sys.exit(130)
    except EdgeqError as exc:
        if _STATE["verbose"]:
            import traceback

            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; no output was written", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("error: out of memory", err=True)
        sys.exit(2)
    except OSError as exc:
        if _STATE["verbose"]:
            raise
        click.echo(f"error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}", err=True)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()

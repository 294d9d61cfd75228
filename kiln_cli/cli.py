"""The `kiln` command-line tool: environments, training runs, model rollout, prompts, status."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kiln import registry
from kiln.config import CONFIG_DIR, ConfigError, available_environments, load_settings
from kiln.contract import Outputs
from kiln.settings import Settings, Tier
from kiln_cli import local, training_job

# The operating commands import boto3 only when they run, so `kiln envs` stays light.
from kiln_cli.operate import deploy, gpu_cluster, invoke, models, status, train
from kiln_cli.operate.aws import Aws, OperateError, explain
from kiln_cli.operate.progress import Progress
from kiln_policy import diagram

TIER_ORDER: tuple[Tier, ...] = ("dev", "staging", "prod")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, item in enumerate(value):
                flat.update(flatten(item, f"{prefix}{key}[{index}]."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(settings: Sequence[Settings]) -> list[tuple[str, list[Any]]]:
    """The dotted fields whose values are not the same in every environment, in schema order."""
    flats = [flatten(s.model_dump(exclude={"name"})) for s in settings]
    return [
        (key, [flat.get(key) for flat in flats])
        for key in flats[0]
        if len({repr(flat.get(key)) for flat in flats}) > 1
    ]


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def cmd_envs(args: argparse.Namespace) -> int:
    """Validates every environment file, lists them, and prints where they differ."""
    config_dir = Path(args.config_dir)
    names = available_environments(config_dir)
    if not names:
        print(f"kiln: no environment files (*.yaml) in {config_dir}", file=sys.stderr)
        return 1
    loaded: list[Settings] = []  # shown in tier order: dev, staging, prod
    failures = 0
    for name in names:
        try:
            loaded.append(load_settings(name, config_dir))
        except ConfigError as err:
            failures += 1
            print(f"INVALID {err}", file=sys.stderr)
    loaded.sort(key=lambda s: (TIER_ORDER.index(s.tier), s.name))
    if loaded:
        print(f"{'environment':<14}{'tier':<9}{'region':<16}{'account':<15}zones")
        for s in loaded:
            print(
                f"{s.name:<14}{s.tier:<9}{s.region:<16}{s.account or '(current)':<15}"
                f"{len(s.availability_zones)}"
            )
    if len(loaded) > 1:
        rows = differences(loaded)
        table = [["differs", *(s.name for s in loaded)]]
        table += [[key, *(_show(v) for v in values)] for key, values in rows]
        widths = [max(len(row[i]) for row in table) + 2 for i in range(len(table[0]))]
        print()
        for row in table:
            print("".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if failures:
        print(f"\n{failures} of {len(names)} environment files are invalid", file=sys.stderr)
        return 1
    return 0


def _aws(args: argparse.Namespace) -> Aws:
    config_dir = Path(args.config_dir)
    return Aws(load_settings(args.env, config_dir), config_dir=config_dir)


def _rows(rows: Sequence[tuple[str, str]], indent: str = "  ") -> str:
    width = max((len(key) for key, _ in rows), default=0) + 2
    return "".join(f"{indent}{key:<{width}}{value}\n" for key, value in rows)


def _kubectl() -> gpu_cluster.Kubectl | None:
    """kubectl on the cluster, where it is installed (the GPU section of `kiln status`)."""
    return gpu_cluster.Kubectl() if shutil.which("kubectl") else None


def cmd_status(args: argparse.Namespace) -> int:
    """Stacks, endpoint and latest training jobs of one environment."""
    report = status.gather(_aws(args), jobs=args.jobs, kube=_kubectl())
    sys.stdout.write(status.render(report))
    return 1 if report.problems else 0


def _train_here(aws: Aws, options: train.TrainOptions, args: argparse.Namespace) -> int:
    """`kiln train --on local`: the trainer on this machine, with this shell's AWS credentials
    (they need what the training roles have, and MLflow's actions when tracking is on)."""
    if args.wait or args.apply:
        raise OperateError("--wait and --apply apply to --on sagemaker and eks", exit_code=2)
    missing = local.missing_workload_packages()
    if missing and not args.dry_run:
        raise OperateError(
            f"this Python lacks the trainer's packages ({', '.join(missing)}): "
            "pip install -e '.[ml,tracking]'",
            exit_code=2,
        )
    aws.check_identity()
    started = train.local_run(aws, options)
    assert started.command is not None and started.environment is not None
    if args.dry_run:
        variables = " ".join(f"{k}={shlex.quote(v)}" for k, v in started.environment.items())
        print(f"{variables} {shlex.join(started.command)}")
        return 0
    print(f"training {started.job} on this machine")
    sys.stdout.write(_rows(started.summary))
    sys.stdout.flush()
    environment = {**os.environ, **started.environment}
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(local.REPO), environment.get("PYTHONPATH", "")) if p
    )
    code = subprocess.run(started.command, cwd=local.REPO, env=environment, check=False)
    if code.returncode != 0:
        raise OperateError(f"training {started.job} failed (exit {code.returncode})")
    print(f"completed: model {started.artifact}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Starts a training run on SageMaker, or renders (and applies) it for EKS."""
    aws = _aws(args)
    options = train.TrainOptions(
        on=args.on,
        name=args.name,
        instance_type=args.instance_type,
        instance_count=args.instance_count,
        data=args.data,
        val_data=args.val_data,
        max_hours=args.max_hours,
        max_wait_hours=args.max_wait_hours,
        volume_gib=args.volume_gib,
        capacity=args.capacity,
        trainer_args=tuple(args.trainer_args),
        model=args.model,
        team=args.team,
        operator=args.operator,
        register=not args.no_register,
        register_model=args.register_model,
    )
    env = aws.settings.name
    if args.on == "local":
        return _train_here(aws, options, args)
    if args.on == "eks":
        if args.wait or args.dry_run:
            raise OperateError(
                "--wait applies to --on sagemaker, --dry-run to --on sagemaker and local",
                exit_code=2,
            )
        aws.check_identity()
        started = train.eks_manifests(aws, options)
        if not args.apply:
            sys.stdout.write(started.manifests or "")
            sys.stderr.write(
                f"kiln train: rendered {started.job} (pipe it to kubectl apply -f -)\n"
            )
            sys.stderr.write(_rows(started.summary))
            return 0
        train.apply_manifests(aws, started)
        print(f"applied training run {started.job} on EKS")
        sys.stdout.write(_rows(started.summary))
        namespace, queue = train.team_queue(aws.settings, args.team)
        # Queue, admission, nodes, pods, until the pods run (and their first GPU reading).
        if args.follow_hours > 0:
            gpu_cluster.follow_run(
                gpu_cluster.RunWatch(
                    gpu_cluster.Kubectl(),
                    namespace=namespace,
                    queue=queue,
                    job=started.job,
                    started=datetime.now(UTC) - timedelta(seconds=5),
                ),
                aws=aws,
                cluster=aws.output(Outputs.CLUSTER_NAME),
                emit=print,
                sleep=time.sleep,
                until="running",
                timeout=args.follow_hours * 3600,
            )
        print(
            f"follow it: kubectl logs -f -n {namespace} -l {training_job.JOB_LABEL}={started.job}"
        )
        kinds = "trainjob,trainingruntime" if args.operator == "trainer" else "job,service"
        print(
            f"remove it: kubectl delete {kinds} -n {namespace} "
            f"-l {training_job.JOB_LABEL}={started.job}"
        )
        return 0
    if args.apply:
        raise OperateError("--apply applies to --on eks", exit_code=2)
    aws.check_identity()
    started = train.start_sagemaker(aws, options, dry_run=args.dry_run)
    if args.dry_run:
        print(json.dumps(started.request, indent=2))
        return 0
    print(f"started SageMaker training job {started.job}")
    sys.stdout.write(_rows(started.summary))
    if not args.wait:
        print(f"follow it: kiln status --env {env}")
        return 0
    request = started.request or {}
    stopping = request.get("StoppingCondition", {})
    limit = stopping.get("MaxWaitTimeInSeconds") or stopping.get("MaxRuntimeInSeconds", 0)
    final = train.follow_sagemaker(
        aws, started.job, progress=Progress(), timeout=limit + 3600, sleep=time.sleep
    )
    if final["TrainingJobStatus"] != "Completed":
        reason = final.get("FailureReason") or final.get("SecondaryStatus", "")
        raise OperateError(f"training job {started.job} {final['TrainingJobStatus']}: {reason}")
    artifact = final.get("ModelArtifacts", {}).get("S3ModelArtifacts", started.artifact)
    if request.get("OutputDataConfig", {}).get("CompressionType") == "NONE":
        # An uncompressed model is the prefix of its files: deployable as S3Prefix model data.
        artifact = artifact.rstrip("/") + "/"
    billable, seconds = final.get("BillableTimeInSeconds"), final.get("TrainingTimeInSeconds")
    print(f"completed: model {artifact}")
    if billable and seconds and billable < seconds:
        print(f"  managed spot saved {100 * (1 - billable / seconds):.0f}% of the training time")
    if (request.get("Environment") or {}).get("KILN_MODEL_PACKAGE_GROUP"):
        print(f"registered for approval: kiln models list --env {env}")
    else:
        print(f"deploy it: kiln deploy-model --env {env} --artifact {artifact}")
    return 0


def cmd_deploy_model(args: argparse.Namespace) -> int:
    """Rolls a model artifact, or a registry version, out through the serving stack and
    reports the outcome."""
    aws = _aws(args)
    if args.artifact is not None:
        outcome = deploy.deploy_model(aws, args.artifact, runner=deploy.run_cdk, sleep=time.sleep)
    else:
        reg = models.Registry(aws)
        version = (
            reg.describe(args.model_package)
            if args.model_package
            else models.latest_or_explain(reg, args.latest_approved)
        )
        outcome = deploy.deploy_version(aws, version, runner=deploy.run_cdk, sleep=time.sleep)
    sys.stdout.write(deploy.render(outcome, aws.settings.name))
    return outcome.exit_code


def cmd_models(args: argparse.Namespace) -> int:
    """The registry: list, show, approve, reject, register, add-engine, resolve."""
    from datetime import UTC, datetime

    if args.models_command == "resolve":
        config_dir = Path(args.config_dir)
        names = [n for n in args.environments.split(",") if n]
        found = models.resolve(
            [load_settings(n, config_dir) for n in names],
            lambda settings: Aws(settings, config_dir=config_dir),
        )
        models.write_resolved(found, Path(args.out))
        for name in names:
            chosen = found.get(name)
            print(f"{name}: {chosen['model_package'] if chosen else 'no approved version'}")
        return 0
    aws = _aws(args)
    reg = models.Registry(aws)
    env = aws.settings.name
    if args.models_command == "list":
        for index, model in enumerate([args.model] if args.model else reg.models):
            if index:
                print()
            sys.stdout.write(models.render_list(model, reg.versions(model, limit=args.limit)))
        return 0
    if args.models_command == "show":
        sys.stdout.write(models.render_show(reg.describe(args.version)))
        return 0
    if args.models_command in ("approve", "reject"):
        decide = reg.approve if args.models_command == "approve" else reg.reject
        version = decide(args.version, env, args.reason, now=datetime.now(UTC))
        verb = "approved" if args.models_command == "approve" else "rejected"
        print(f"{verb} {version.ref} for {env} ({version.status})")
        print(f"  {version.approval_description}")
        if verb == "approved":
            print(f"deploy it: kiln deploy-model --env {env} --latest-approved {reg.models[0]}")
        return 0
    if args.models_command == "add-engine":
        version = reg.add_engine(args.version, args.engine)
        held = ", ".join(f"{s.label}: {s.engine}" for s in version.specifications)
        print(f"{version.ref} serves with {args.engine} ({held})")
        return 0
    run = registry.RunRecord(
        job=args.job,
        artifact=args.artifact,
        data=args.data or "-",
        steps=args.steps,
        tokens=args.tokens,
        val_loss=args.val_loss,
    )
    arn = reg.register(run, args.model or reg.models[0], engine=args.engine)
    print(f"registered {arn} (PendingManualApproval)")
    return 0


def _conversation(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The messages `--message`/`--messages-file` give; None for a plain `--prompt`."""
    if args.messages_file is not None:
        source = args.messages_file
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        except OSError as err:
            raise OperateError(f"--messages-file {source}: {err.strerror or err}", 2) from err
        return invoke.read_messages(text, "standard input" if source == "-" else source)
    if args.message:
        return [invoke.parse_message(m) for m in args.message]
    return None


def cmd_change_instance_type(args: argparse.Namespace) -> int:
    """Moves the endpoint to the configured instance type: deregister, update, register."""
    from kiln_cli.operate import resize

    aws = _aws(args)
    outcome = resize.change_instance_type(aws, runner=deploy.run_cdk, sleep=time.sleep)
    sys.stdout.write(resize.render(outcome))
    return outcome.exit_code


def cmd_invoke(args: argparse.Namespace) -> int:
    """Sends one prompt (or a conversation) to the environment's endpoint; prints the answer."""
    aws = _aws(args)
    messages = _conversation(args)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if messages is not None:
        if args.top_k is not None:
            raise OperateError(
                "--top-k is not a Messages API field: leave it out with --message", exit_code=2
            )
        options = {
            "max_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "stop": args.stop or None,
        }
        if args.stream:
            answer = invoke.chat_stream(aws, messages, options, write)
            sys.stdout.write("\n")
        else:
            answer = invoke.chat(aws, messages, options)
            if args.json:
                print(json.dumps(answer.body, ensure_ascii=False))
            else:
                print(answer.text)
    else:
        parameters = {
            "max_new_tokens": args.max_new_tokens,
            # Greedy unless asked: kiln's default, said out loud so that LMI (which samples
            # with the model's generation_config by default) answers the same way.
            "temperature": 0.0 if args.temperature is None else args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
            "stop": args.stop or None,
        }
        if args.stream:
            answer = invoke.stream(aws, args.prompt, parameters, write)
            sys.stdout.write("\n")
        else:
            answer = invoke.invoke(aws, args.prompt, parameters)
            if args.json:
                body = {
                    "generated_text": answer.text,
                    "finish_reason": answer.finish_reason,
                    "usage": answer.usage,
                }
                print(json.dumps(body, ensure_ascii=False))
            else:
                print(answer.text)
    tokens = answer.usage.get("completion_tokens", "?")
    print(
        f"[{answer.finish_reason or '?'}, {tokens} tokens, {answer.seconds:.2f} s]",
        file=sys.stderr,
    )
    return 0


def _config_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-dir",
        default=str(CONFIG_DIR),
        help="the folder of environment files, e.g. a fork's (default: %(default)s)",
    )


def _environment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env", required=True, help="the environment, i.e. the file config/<env>.yaml"
    )
    _config_dir_option(parser)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_train(commands: Any) -> None:
    run = commands.add_parser(
        "train",
        help="start a training run on SageMaker, or render/apply it on EKS",
        description="Start a training run. Trainer arguments (--flag value pairs of "
        "`python -m training.train`) follow `--`. Names and ARNs come from the deployed "
        "compute and data-lake stacks.",
    )
    _environment_options(run)
    run.add_argument(
        "--on",
        required=True,
        choices=("sagemaker", "eks", "local"),
        help="where it runs (local: this machine, with your AWS credentials)",
    )
    run.add_argument(
        "--name",
        default="train",
        help="run name; the job is <project>-<env>-<name>-<timestamp> (default: %(default)s)",
    )
    run.add_argument(
        "--instance-type",
        help="default: the first of compute.gpu_nodes.instance_types (ml. is added for SageMaker)",
    )
    run.add_argument(
        "--instance-count",
        type=_positive_int,
        default=1,
        help="instances (SageMaker) or nodes (EKS) (default: %(default)s)",
    )
    run.add_argument(
        "--data",
        default="train/",
        help="curated-zone prefix of the training text (default: %(default)s)",
    )
    run.add_argument(
        "--val-data",
        help="curated-zone prefix of validation text (default: none, "
        "the trainer holds out a share of --data)",
    )
    run.add_argument(
        "--max-hours",
        type=float,
        default=24.0,
        help="the run's wall-time limit (default: %(default)s)",
    )
    run.add_argument(
        "--max-wait-hours",
        type=float,
        help="SageMaker spot: runtime plus waiting for capacity (default: 2 x max)",
    )
    run.add_argument(
        "--volume-gib",
        type=_positive_int,
        default=100,
        help="SageMaker instance storage (default: %(default)s)",
    )
    run.add_argument(
        "--capacity",
        choices=("spot", "on_demand"),
        help="SageMaker capacity (default: spot where compute.gpu_nodes.capacity is spot, "
        "else on_demand)",
    )
    run.add_argument("--wait", action="store_true", help="SageMaker: follow the job to its end")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="SageMaker: print the CreateTrainingJob request; local: the trainer's command "
        "line; start nothing",
    )
    run.add_argument(
        "--model",
        help="EKS: model for the memory plan (a shape such as llama-3-8b, a trainer preset, or a "
        "local Hugging Face directory); a preset or s3:// directory also goes to the trainer "
        "(default: what the trainer arguments name, else the trainer's preset, small)",
    )
    training_job.add_operator_argument(run, prefix="EKS: ")
    run.add_argument(
        "--no-register",
        action="store_true",
        help="do not register the finished run in the model registry",
    )
    run.add_argument(
        "--register-model",
        help="the registry model (registry.models) the run is a version of (default: the first)",
    )
    run.add_argument(
        "--apply",
        action="store_true",
        help="EKS: kubectl apply -f - the objects instead of printing them, then follow the "
        "run's queue position, admission, nodes and pods until it runs",
    )
    run.add_argument(
        "--team",
        help="EKS: the team whose namespace, queue and GPU quota the run uses "
        "(default: the first of compute.teams)",
    )
    run.add_argument(
        "--follow-hours",
        type=float,
        default=6.0,
        help="EKS --apply: how long to follow a queued run before handing back; 0: do not "
        "follow (default: %(default)s)",
    )
    run.add_argument(
        "trainer_args",
        nargs="*",
        metavar="TRAINER_ARG",
        help="trainer flags after --, e.g. -- --model small --max-steps 2000 (default: none)",
    )
    run.set_defaults(handler=cmd_train)


def _add_invoke(commands: Any) -> None:
    call = commands.add_parser(
        "invoke",
        help="send a prompt or a conversation to the environment's endpoint",
        description="Send one prompt (continued by the model) or one conversation (the "
        "Messages API, rendered by the model's chat template) to the serving stack's endpoint "
        "and print the answer (the text on stdout; finish reason, tokens and time on stderr). "
        "Parameters not given are the server's defaults.",
    )
    _environment_options(call)
    what = call.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="a plain prompt, continued by the model")
    what.add_argument(
        "--message",
        action="append",
        metavar="ROLE:TEXT",
        help='a chat message (repeatable, in order), e.g. --message system:"Be brief." '
        '--message user:"Hello"; sent as the Messages API, rendered by the model\'s chat template',
    )
    what.add_argument(
        "--messages-file",
        metavar="FILE",
        help='a JSON list of {"role", "content"} messages (or a {"messages": [...]} body); '
        "- reads standard input",
    )
    call.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        help="tokens to generate at most (a conversation's max_tokens; default: the server's, "
        "what the context leaves)",
    )
    call.add_argument(
        "--temperature",
        type=float,
        help="sampling temperature; 0 is greedy (default: the server's: 0 for a prompt, 1.0 for "
        "a conversation, as OpenAI's)",
    )
    call.add_argument(
        "--top-k",
        type=_positive_int,
        help="sample among this many most likely tokens (default: all)",
    )
    call.add_argument(
        "--top-p",
        type=float,
        help="sample from the most likely tokens holding this share of probability, 0 to 1 "
        "(default: 1)",
    )
    call.add_argument(
        "--seed",
        type=int,
        help="same seed, prompt and model: same text (default: a random seed)",
    )
    call.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")
    mode = call.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    mode.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    call.set_defaults(handler=cmd_invoke)


def _add_models(commands: Any) -> None:
    group = commands.add_parser(
        "models",
        help="the model registry: list, show, approve or reject versions per environment",
        description="One SageMaker model package group per model (registry.models), in the "
        "registry's home environment. A version is approved for one environment at a time "
        "(who, from STS, and why are recorded); promotion dev -> staging -> prod is an "
        "approval in each, and the delivery pipeline deploys the latest approved version.",
    )
    sub = group.add_subparsers(
        dest="models_command",
        required=True,
        metavar="SUBCOMMAND",
        help="list, show, approve, reject, register, add-engine or resolve",
    )
    listing = sub.add_parser("list", help="the newest versions, their approvals and metrics")
    _environment_options(listing)
    listing.add_argument("--model", help="one model of registry.models (default: all)")
    listing.add_argument("--limit", type=_positive_int, default=10, help="default: %(default)s")
    show = sub.add_parser("show", help="one version: artifact, image, metrics, approvals")
    _environment_options(show)
    show.add_argument("version", help="<model>/<n> or the version's ARN")
    for verb, meaning in (
        ("approve", "approve a version for --env (after the environments before it)"),
        ("reject", "withdraw or refuse a version for --env"),
    ):
        decide = sub.add_parser(verb, help=meaning)
        _environment_options(decide)
        decide.add_argument("version", help="<model>/<n> or the version's ARN")
        decide.add_argument("--reason", required=True, help="why (recorded with who and when)")
    register = sub.add_parser(
        "register", help="register an artifact as a version pending approval (by hand)"
    )
    _environment_options(register)
    register.add_argument("--artifact", required=True, help="s3://.../model.tar.gz")
    register.add_argument("--job", required=True, help="the training run that made it")
    register.add_argument("--model", help="of registry.models (default: the first)")
    register.add_argument("--data", help="the data's S3 prefix")
    register.add_argument("--steps", type=int, default=0)
    register.add_argument("--tokens", type=int, default=0)
    register.add_argument("--val-loss", type=float, help="its validation loss (default: none)")
    register.add_argument(
        "--engine",
        choices=("kiln", "lmi"),
        default="kiln",
        help="the server of the version's primary specification: kiln's image or the pinned "
        "LMI container; the other engine's is an additional specification named by it, so "
        "the version serves with either (default: %(default)s)",
    )
    add = sub.add_parser(
        "add-engine",
        help="add an engine's specification to a version registered without one",
    )
    _environment_options(add)
    add.add_argument("version", help="<model>/<n> or the version's ARN")
    add.add_argument("--engine", required=True, choices=("kiln", "lmi"), help="serving.engine")
    resolve = sub.add_parser(
        "resolve",
        help="write each environment's latest approved version (the pipeline's synth step)",
    )
    resolve.add_argument("--environments", required=True, help="comma-separated, e.g. dev,prod")
    resolve.add_argument("--out", required=True, help="the JSON file `-c approvedModels` reads")
    resolve.add_argument("--config-dir", default=str(CONFIG_DIR), help="default: %(default)s")
    group.set_defaults(handler=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Operate the kiln ML platform.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    envs = commands.add_parser(
        "envs",
        help="list environments, validate every config file, show their differences",
        description="Validate every environment file in the config folder, list the "
        "environments (tier, region, account, zones) and print a table of the fields whose "
        "values differ between them. Works offline; exit 1 if a file is invalid.",
    )
    _config_dir_option(envs)
    envs.set_defaults(handler=cmd_envs)
    job = commands.add_parser(
        "training-job",
        help="render a multi-node torchrun training run as Kubernetes YAML",
        description="Print the Kubernetes objects of a torchrun training run (an Indexed Job "
        "and a headless Service, or a Kubeflow PyTorchJob) for `kubectl apply -f -`. Works "
        "offline.",
    )
    training_job.add_arguments(job)
    job.set_defaults(handler=training_job.render_command)
    show = commands.add_parser(
        "status",
        help="an environment's stacks, endpoint and latest training jobs",
        description="Show the environment's stacks, its endpoint (what it serves, its last "
        "deployment, its rollback alarms) and its latest SageMaker training jobs. Needs AWS "
        "credentials.",
    )
    _environment_options(show)
    show.add_argument(
        "--jobs",
        type=_positive_int,
        default=5,
        help="training jobs to list (default: %(default)s)",
    )
    show.set_defaults(handler=cmd_status)
    _add_train(commands)
    roll = commands.add_parser(
        "deploy-model",
        help="roll a model artifact out through the guarded endpoint deployment",
        description="Deploys the serving stack with -c modelArtifact=<uri>, follows the "
        "endpoint and reports: promoted (exit 0), rolled back (exit 3, with the alarm that "
        "fired) or failed (exit 1).",
    )
    _environment_options(roll)
    what = roll.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--artifact",
        help="the model to serve: s3://<bucket>/<key>.tar.gz as training writes it, or an "
        "uncompressed model directory s3://<bucket>/<prefix>/ (not in prod: it serves registry "
        "versions)",
    )
    what.add_argument(
        "--model-package",
        metavar="VERSION",
        help="a registry version approved for this environment: its ARN or <model>/<n>",
    )
    what.add_argument(
        "--latest-approved",
        metavar="MODEL",
        help="the newest version of MODEL (registry.models) approved for this environment",
    )
    roll.set_defaults(handler=cmd_deploy_model)
    _add_models(commands)
    resize_cmd = commands.add_parser(
        "change-instance-type",
        help="move the endpoint to serving.instance_type (deregister autoscaling, update, "
        "register)",
        description="SageMaker refuses to change the instance type of an autoscaled variant. "
        "This deregisters the variant's autoscaling, deploys the serving stack with the "
        "instance type of config/<env>.yaml and the artifact the endpoint serves, and "
        "registers the same autoscaling again: resized (exit 0), rolled back (exit 3) or "
        "failed (exit 1).",
    )
    _environment_options(resize_cmd)
    resize_cmd.set_defaults(handler=cmd_change_instance_type)
    _add_invoke(commands)
    loop = commands.add_parser(
        "local",
        help="the whole loop on this machine: train, package, serve, ask, stop",
        description="Train a small model on this machine's CPU for a few minutes (on the "
        "Python standard library's sources), package model.tar.gz, serve it on 127.0.0.1, "
        "send prompts and print the answers and figures; or, with --model DIR, serve and ask a "
        "Hugging Face model directory you bring, without training. No AWS account needed; "
        "needs `make install-dev` (or `make test`).",
    )
    local.add_arguments(loop)
    loop.set_defaults(handler=local.run_command)
    picture = commands.add_parser(
        "diagram",
        help="draw an environment's architecture (SVG, PNG) from its templates",
        description="Synthesize an environment (offline, about half a minute) and draw its "
        "stacks, main resources and data flows as <env>-architecture.svg and .png.",
    )
    diagram.add_arguments(picture)
    picture.set_defaults(handler=diagram.run_command)
    return parser


# Commands that start nothing in AWS: an interrupt leaves nothing running.
LOCAL_COMMANDS = frozenset({"envs", "training-job", "local", "diagram"})


def _region(args: argparse.Namespace) -> str:
    """The environment's region for advice, or words for it when it cannot be read."""
    try:
        return _aws(args).region
    except Exception:
        return "<your region>"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    try:
        return int(handler(args))
    except OperateError as err:
        print(f"kiln {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except ConfigError as err:
        print(f"kiln {args.command}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A folder that cannot be written (--out, --work-dir), a full disk: said, not traced.
        where = f": {err.filename}" if err.filename else ""
        print(f"kiln {args.command}: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command in LOCAL_COMMANDS:
            print(f"\nkiln {args.command}: interrupted; nothing was left running", file=sys.stderr)
        else:
            print(
                f"\nkiln {args.command}: interrupted; what was already started in AWS goes on "
                f"(`kiln status --env {getattr(args, 'env', '<env>')}` shows it)",
                file=sys.stderr,
            )
        return 130
    except Exception as err:
        # A botocore failure outside the wrapped calls still gets advice, not a traceback.
        if not type(err).__module__.startswith("botocore"):
            raise
        advice = explain(err, action="an AWS call", region=_region(args))
        print(f"kiln {args.command}: {advice or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

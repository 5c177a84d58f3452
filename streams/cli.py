"""The ``switchboard`` command line: up, worker, replay, demo, topics, check-config."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streams.settings import ConfigError, Settings, load_config

__all__ = ["app", "main"]

app = typer.Typer(
    name="switchboard",
    help="Kafka-native conversational and notification messaging.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()


def _setup_logging(level: str, fmt: str = "console") -> None:
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    else:
        logging.basicConfig(
            level=level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,
        )


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when installed (less CPU per record), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _settings(**overrides: Any) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)


def _load(settings: Settings) -> Any:
    try:
        return load_config(settings.config_path())
    except ConfigError as exc:
        err.print(f"[bold red]config error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def worker() -> None:
    """Run the stream workers against SWITCHBOARD_KAFKA_BROKERS and SWITCHBOARD_REDIS_URL."""
    from aiokafka.errors import KafkaConnectionError

    from connectors.errors import ConnectorError
    from streams.collector import tune_gc
    from streams.metrics import serve_metrics
    from streams.topics import TopicLayoutError, create_topics

    settings = _settings()
    _setup_logging(settings.log_level, settings.log_format)
    config = _load(settings)
    try:
        asyncio.run(create_topics(settings))
    except (TopicLayoutError, KafkaConnectionError) as exc:
        err.print(
            f"[bold red]cannot prepare topics on {settings.kafka_brokers}:[/] {exc}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    from streams.worker import run_worker

    serve_metrics(settings.metrics_port)
    tune_gc()
    loop = _new_event_loop()
    try:
        status = loop.run_until_complete(run_worker(settings, config))
    except (KafkaConnectionError, ConnectorError) as exc:
        err.print(f"[bold red]worker cannot start:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        loop.close()
    raise typer.Exit(status)


@app.command()
def up(
    workers: Annotated[int, typer.Option(help="Worker processes to start.")] = 1,
    data_dir: Annotated[Path, typer.Option(help="Logs, outbox and state.")] = Path("var"),
    broker_port: Annotated[int, typer.Option(help="Broker port (0 = any free port).")] = 9092,
    redis_port: Annotated[int, typer.Option(help="Redis port (0 = any free port).")] = 6379,
) -> None:
    """Start the embedded stack (Tansu broker, redis-server, workers) in the foreground."""
    from streams.stack import EmbeddedStack

    _setup_logging("WARNING")
    _load(_settings())
    stack = EmbeddedStack(
        workers=workers,
        data_dir=data_dir,
        broker_port=broker_port or None,
        redis_port=redis_port or None,
    )
    with stack:
        assert stack.broker is not None
        assert stack.redis is not None
        out.print(f"broker   kafka://{stack.broker.address}   (tansu, memory storage)")
        out.print(f"redis    redis://{stack.redis.address}/0")
        for w in stack.worker_procs:
            out.print(f"worker-{w.index} pid {w.process.pid}   log {w.log_path}")
        out.print(f"outbox   {data_dir / 'outbox.jsonl'}")
        if workers:
            ready_s = stack.wait_ready()
            out.print(f"pipeline answered a warm-up message in {ready_s:.1f} s")
        out.print("Ready. Publish to 'switchboard.inbound'; Ctrl-C stops everything.")
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        try:
            while not stop:
                stack.check_workers()
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        out.print("stopping…")


def _progress_replay(
    settings: Settings, lines: list[dict[str, Any]], timeout_s: float, keep_ids: bool
) -> Any:
    from streams.replay import replay

    with Progress(
        TextColumn("[bold]replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("replay", total=len(lines))

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return asyncio.run(
            replay(settings, lines, timeout_s=timeout_s, keep_ids=keep_ids, on_progress=on_progress)
        )


@app.command(name="replay")
def replay_cmd(
    file: Annotated[Path, typer.Argument(help="JSON Lines file of InboundMessage objects.")],
    brokers: Annotated[str | None, typer.Option(help="Bootstrap servers host:port,…")] = None,
    topic_prefix: Annotated[str | None, typer.Option(help="Topic prefix.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for outcomes.")] = 120.0,
    keep_ids: Annotated[bool, typer.Option(help="Keep the file's message ids.")] = False,
) -> None:
    """Publish FILE to the inbound topic and wait until every record is accounted for.

    Prints a one-line JSON summary; exits 0 only when nothing is unaccounted.
    """
    from aiokafka.errors import KafkaConnectionError

    from streams.replay import load_jsonl

    settings = _settings(kafka_brokers=brokers, topic_prefix=topic_prefix)
    _setup_logging("WARNING")
    if not file.exists():
        err.print(f"[red]no such file:[/] {file}")
        raise typer.Exit(2)
    lines, errors = load_jsonl(file)
    for problem in errors:
        err.print(f"[yellow]skipped[/] {problem}", highlight=False)
    try:
        result = _progress_replay(settings, lines, timeout, keep_ids)
    except KafkaConnectionError as exc:
        err.print(
            f"[bold red]cannot reach the brokers {settings.kafka_brokers}:[/] {exc}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    for problem in result.invalid_lines:
        err.print(f"[yellow]invalid[/] {problem}", highlight=False)
    summary = result.summary()
    summary["invalid_lines"] += len(errors)
    print(json.dumps(summary))
    raise typer.Exit(0 if summary["unaccounted"] == 0 else 1)


@app.command()
def demo(
    users: Annotated[int, typer.Option(help="Simulated users (one conversation each).")] = 1000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    samples: Annotated[int, typer.Option(help="Sample exchanges to print.")] = 6,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for outcomes.")] = 300.0,
    data_dir: Annotated[Path | None, typer.Option(help="Logs and outbox (default: temp).")] = None,
) -> None:
    """The main job: embedded stack + real corpus conversations replayed by many users."""
    from streams.corpus import simulated_users
    from streams.stack import EmbeddedStack

    _setup_logging("WARNING")
    _load(_settings())
    lines = simulated_users(users)
    directory = data_dir or Path(tempfile.mkdtemp(prefix="switchboard-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "demo.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8"
    )
    err.print(f"demo: {users} users, {len(lines)} messages; logs and outbox in {directory}")
    with EmbeddedStack(workers=workers, data_dir=directory) as stack:
        assert stack.broker is not None
        assert stack.redis is not None
        err.print(
            f"broker kafka://{stack.broker.address} · redis redis://{stack.redis.address}"
            f" · {workers} worker(s)"
        )
        ready_s = stack.wait_ready()
        err.print(f"pipeline ready in {ready_s:.1f} s (consumer group joined, warm-up answered)")
        result = _progress_replay(stack.settings(), lines, timeout, False)
        _print_samples(result, samples)
    summary = result.summary()
    print(json.dumps(summary))
    raise typer.Exit(0 if summary["unaccounted"] == 0 else 1)


def _print_samples(result: Any, count: int) -> None:
    by_conv: dict[str, list[Any]] = {}
    for outcome in result.outcomes.values():
        by_conv.setdefault(outcome.message.conversation_id or "", []).append(outcome)
    table = Table(title="sample exchanges", show_lines=True)
    for column in ("conversation", "user", "persona", "reply"):
        table.add_column(column, overflow="fold")
    seen_langs: set[str] = set()
    for conv, outcomes in sorted(by_conv.items()):
        lang = outcomes[0].message.metadata.get("lang", "")
        if lang in seen_langs or len(table.rows) >= count:
            continue
        seen_langs.add(lang)
        for o in sorted(outcomes, key=lambda o: o.message.message_id)[:2]:
            reply = (
                o.report.content
                if o.report
                else f"(dead letter: {o.dead_letter.reason})"
                if o.dead_letter
                else "(unaccounted)"
            )
            persona = o.report.persona if o.report else "-"
            table.add_row(conv, o.message.content, persona or "-", reply)
    err.print(table)


bench = typer.Typer(help="Benchmarks; each prints one JSON line with a same-run ratio.")
app.add_typer(bench, name="bench")


@bench.command("llm")
def bench_llm_cmd(
    conversations: Annotated[int, typer.Option(help="Simulated conversations.")] = 2000,
    turns: Annotated[int, typer.Option(help="Turns per conversation.")] = 4,
    latency: Annotated[float, typer.Option(help="Engine latency L (s).")] = 0.5,
    in_flight: Annotated[int, typer.Option(help="LLM calls in flight C per worker.")] = 512,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """I/O-bound: turns/s against the ideal C/L, and against one turn in flight per partition."""
    from streams.bench import bench_llm

    _setup_logging("WARNING")
    print(
        json.dumps(
            bench_llm(
                conversations=conversations,
                turns=turns,
                latency_s=latency,
                in_flight=in_flight,
                workers=workers,
            )
        )
    )


@bench.command("pipeline")
def bench_pipeline_cmd(
    conversations: Annotated[int, typer.Option(help="Simulated conversations.")] = 2000,
    turns: Annotated[int, typer.Option(help="Turns per conversation.")] = 3,
    workers: Annotated[
        int, typer.Option(help="Worker processes; as many raw chains run side by side.")
    ] = 1,
) -> None:
    """CPU-bound: the whole pipeline against raw aiokafka chains with as many topic hops, one
    chain per worker process."""
    from streams.bench import bench_pipeline

    _setup_logging("WARNING")
    print(json.dumps(bench_pipeline(conversations=conversations, turns=turns, workers=workers)))


@app.command()
def topics() -> None:
    """List the pipeline's topics with key, schema and purpose."""
    from streams.topics import topic_table

    table = Table("topic", "key", "schema", "purpose")
    table.columns[0].no_wrap = True
    for row in topic_table(_settings()):
        table.add_row(*row)
    out.print(table)


@app.command(name="check-config")
def check_config(
    file: Annotated[Path | None, typer.Argument(help="YAML config (default: bundled).")] = None,
) -> None:
    """Validate a config file and print what it declares."""
    settings = _settings(config=file)
    config = _load(settings)
    out.print(
        f"{settings.config_path()}: OK — {len(config.personas)} personas, "
        f"{len(config.routing.rules)} rules, {len(config.channels)} channels"
    )


def main() -> None:
    """Entry point of the ``switchboard`` script."""
    app()


if __name__ == "__main__":
    main()

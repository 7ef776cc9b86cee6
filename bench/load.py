"""Load: ``POST /notification`` then ``GET /auth`` under locust, against ``connector serve --workers 1`` and then
``--workers 2`` on PostgreSQL, side by side.

What runs:

* the Sage emulator (Sage ID's JWKS) in this process, on loopback;
* for each worker count, a fresh PostgreSQL database and ``connector serve --workers N`` on a throwaway config, in its
  own process (migrations applied at start, as in production);
* locust, headless, in its own process (``--users``, ``--spawn-rate``, ``--run-time``; CSV stats, and the final
  figures from its ``--json-file``; users finish the task in hand when time is up). Each locust user
  loops without pause: a signed notification announcing a new authorisation id (custom header, an RS256 Sage ID token
  from a pool larger than the verifier's cache, so every request pays the RSA check), then the ``/auth`` page for that
  id, which counts only when it answers 200 with the bank's sign-in page.

It prints, per worker count and per request, requests, req/s, p50 and p99 (ms) and errors, checks that the database
holds one notification and one journey per successful request, and exits 1 on any error.

Run (needs ``pip install -e '.[bench]'`` for locust, and a PostgreSQL server, ``--postgres`` or
``CONNECTOR_TEST_POSTGRES``, default ``postgres://postgres@127.0.0.1:5432``)::

    python bench/load.py                       # 32 users, 20 s per worker count, workers 1 then 2
    python bench/load.py --users 64 --run-time 30s --workers 1 2 4
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("BENCH_LOAD_ROLE") == "locust":  # this file is also the locustfile, imported by locust
    import itertools
    from urllib.parse import urlencode

    from locust import FastHttpUser, constant, task

    _PLAN = json.loads(Path(os.environ["BENCH_LOAD_PLAN"]).read_text(encoding="utf-8"))
    _TOKENS = itertools.cycle(_PLAN["tokens"])

    class SageAndBrowser(FastHttpUser):
        """Sage announcing an authorisation, then the person's browser opening ``/auth`` for it."""

        wait_time = constant(0)

        @task
        def notify_then_auth(self) -> None:
            authorisation_id = str(uuid.uuid4())
            body = json.dumps({"type": "resourceCreated",
                               "resource": {"id": authorisation_id, "type": "authorisation", "url": "NA"},
                               "additionalData": {"bankId": _PLAN["bank_id"]}})
            headers = {"Authorization": f"Bearer {next(_TOKENS)}", "Content-Type": "application/json",
                       _PLAN["header_name"]: _PLAN["header_value"]}
            with self.client.post("/notification", data=body, headers=headers, name="POST /notification",
                                  catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}")
                    return
            query = urlencode({"bank": _PLAN["bank_id"], "authorisation_id": authorisation_id,
                               "redirect_uri": f"{_PLAN['redirect_base']}{uuid.uuid4()}",
                               "state": uuid.uuid4().hex})
            with self.client.get(f"/auth?{query}", name="GET /auth", catch_response=True,
                                 allow_redirects=False) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}")
                elif "Sign in to Demo Bank" not in (resp.text or ""):
                    resp.failure("200 without the sign-in page")


REPO = Path(__file__).resolve().parents[1]
BANK_ID = "10aaeee6-4691-4443-8198-df39aaa8007c"
HEADER_NAME = "X-Connector-Key"
REDIRECT_PATH = "/api/v1/indirectredirect/"
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432"
ENDPOINTS = ("POST /notification", "GET /auth")


@dataclass
class Row:
    name: str
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    p50: float = float("nan")
    p99: float = float("nan")


@dataclass
class Run:
    workers: int
    rows: dict[str, Row] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stored_notifications: int = 0
    stored_journeys: int = 0
    server_cpu: float = 0.0
    loader_cpu: float = 0.0
    machine_busy: float = 0.0  # share of all CPUs busy (server, locust, PostgreSQL, anything else)
    seconds: float = 0.0

    @property
    def errors(self) -> int:
        return sum(r.failures for r in self.rows.values())


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children that were waited for (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (Linux /proc/stat)."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants (Sanic's worker processes)."""
    total = process_cpu(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(tree_cpu(int(c)) for c in children)


async def create_database(server: str) -> str:
    import asyncpg

    name = f"connector_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{server.rstrip('/')}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name


async def drop_database(server: str, name: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(f"{server.rstrip('/')}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def count_rows(url: str) -> tuple[int, int]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return (int(await conn.fetchval("SELECT COUNT(*) FROM notification")),
                int(await conn.fetchval("SELECT COUNT(*) FROM journey")))
    finally:
        await conn.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def seconds(run_time: str) -> float:
    """Locust's ``--run-time`` (``20s``, ``1m30s``, ``1h``, or plain seconds) in seconds."""
    import re

    if run_time.isdigit():
        return float(run_time)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", run_time.strip())
    if not parts or not any(parts.groups()):
        raise SystemExit(f"--run-time {run_time!r}: use e.g. 20s, 1m30s or 1h")
    h, m, s = (int(x or 0) for x in parts.groups())
    return float(h * 3600 + m * 60 + s)


def percentile(histogram: dict[int, int], total: int, fraction: float) -> float:
    """Locust's own rule on its histogram of rounded response times (ms)."""
    wanted = int(total * fraction)
    seen = 0
    for value in sorted(histogram, reverse=True):
        seen += histogram[value]
        if total - seen <= wanted:
            return float(value)
    return float("nan")


def read_stats(prefix: Path) -> dict[str, Row]:
    """Final figures from locust's ``--json-file`` (its CSV is written on a timer and may miss the last second)."""
    entries = json.loads(Path(f"{prefix}.json").read_text(encoding="utf-8"))
    rows: dict[str, Row] = {}
    merged: dict[int, int] = {}
    first, last = float("inf"), 0.0
    for entry in entries:
        histogram = {int(float(k)): int(v) for k, v in entry["response_times"].items()}
        for k, v in histogram.items():
            merged[k] = merged.get(k, 0) + v
        count = int(entry["num_requests"])
        span = max(float(entry["last_request_timestamp"]) - float(entry["start_time"]), 1e-9)
        first, last = min(first, float(entry["start_time"])), max(last, float(entry["last_request_timestamp"]))
        rows[entry["name"]] = Row(entry["name"], count, int(entry["num_failures"]), count / span,
                                  percentile(histogram, count, 0.5), percentile(histogram, count, 0.99))
    total = sum(r.requests for r in rows.values())
    rows["all"] = Row("all", total, sum(r.failures for r in rows.values()), total / max(last - first, 1e-9),
                      percentile(merged, total, 0.5), percentile(merged, total, 0.99))
    return rows


def read_failures(prefix: Path) -> list[str]:
    path = Path(f"{prefix}_failures.csv")
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [f"{line['Name']}: {line['Error']} ×{line['Occurrences']}" for line in csv.DictReader(f)]


async def one_run(args: argparse.Namespace, workers: int, sage, plan_path: Path, workdir: Path,
                  header_value: str) -> Run:
    from connector.testing.connector import (
        SageEndpoints,
        connector_config,
        free_port,
        wait_until_ready,
        write_config,
    )

    run = Run(workers)
    database = await create_database(args.postgres)
    url = f"{args.postgres.rstrip('/')}/{database}"
    port = free_port()
    endpoints = SageEndpoints(sage.base_url, sage.client_id, sage.client_secret, sage.api_key,
                              notification_header_value=header_value, notification_header_name=HEADER_NAME)
    config = connector_config(endpoints, database_url=url, port=port,
                              banks=[{"sage_bank_id": BANK_ID, "name": "Demo Bank", "provider": "demobank"}],
                              providers={"demobank": {}},
                              extra={"server": {"workers": workers}, "logging": {"level": args.log_level}})
    config_path = write_config(workdir / f"config-{workers}.toml", config)
    log = workdir / f"connector-{workers}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("BENCH_LOAD_ROLE", None)
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "connector.cli", "serve", "--config", str(config_path),
                                   "--workers", str(workers)], stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                  env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        progress(f"connector serve --workers {workers} starting on a fresh database ({database})")
        await wait_until_ready(base, server.poll, log)
        progress(f"locust: {args.users} users for {args.run_time}")
        prefix = workdir / f"locust-{workers}"
        command = [sys.executable, "-m", "locust", "-f", str(Path(__file__).resolve()), "--headless",
                   "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
                   "--host", base, "--csv", str(prefix), "--json-file", str(prefix), "--only-summary",
                   "--stop-timeout", "10", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
        locust_env = {**env, "BENCH_LOAD_ROLE": "locust", "BENCH_LOAD_PLAN": str(plan_path)}
        locust_log = workdir / f"locust-{workers}.log"
        cpu0, t0, loader0, machine0 = tree_cpu(server.pid), time.monotonic(), children_cpu(), machine_ticks()
        with open(locust_log, "wb") as out:  # a file: locust's output never fills a pipe nobody reads
            # In a thread, so this event loop goes on serving the emulator's JWKS meanwhile.
            try:
                returncode = (await asyncio.to_thread(
                    subprocess.run, command, env=locust_env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, timeout=seconds(args.run_time) + 120)).returncode
            except subprocess.TimeoutExpired:
                raise SystemExit(f"locust did not stop:\n{locust_log.read_text(errors='replace')[-3000:]}") from None
        run.seconds = time.monotonic() - t0
        run.server_cpu = (tree_cpu(server.pid) - cpu0) / run.seconds
        run.loader_cpu = (children_cpu() - loader0) / run.seconds  # locust, reaped by now
        machine1 = machine_ticks()
        run.machine_busy = (machine1[0] - machine0[0]) / max(machine1[1] - machine0[1], 1)
        if returncode != 0 or not Path(f"{prefix}.json").exists():
            raise SystemExit(f"locust failed ({returncode}):\n{locust_log.read_text(errors='replace')[-3000:]}")
        run.rows = read_stats(prefix)
        run.failures = read_failures(prefix)
        progress("counting the rows stored")
        run.stored_notifications, run.stored_journeys = await count_rows(url)
    finally:
        progress("stopping the connector")
        stop(server)
        await drop_database(args.postgres, database)
    return run


def report(runs: list[Run], args: argparse.Namespace, command: str, pool: int, mint_seconds: float,
           load: tuple[float, float]) -> None:
    from importlib.metadata import version

    print(f"command: {command}")
    print(f"locust {version('locust')}, headless: {args.users} users, spawn rate {args.spawn_rate}/s, run time "
          f"{args.run_time}, no wait between tasks; each task: POST /notification, then GET /auth for its id")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}; load average {load[0]:.1f} before, {load[1]:.1f} after "
          "(the load generator, PostgreSQL and the server share these CPUs)")
    print(f"database: PostgreSQL at {args.postgres}, a fresh database per run; tokens: a pool of {pool} distinct "
          f"RS256 tokens (minted in {mint_seconds:.1f} s), taken in turn\n")
    width = max(len(n) for n in (*ENDPOINTS, "all"))
    header = f"{'':<{width}}"
    sub = f"{'request':<{width}}"
    for run in runs:
        header += f" | {'--workers ' + str(run.workers):^37}"
        sub += f" | {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'count':>6}"
    print(header)
    print(sub)
    for name in (*ENDPOINTS, "all"):
        line = f"{name:<{width}}"
        for run in runs:
            row = run.rows.get(name, Row(name))
            line += f" | {row.rps:>7.0f} {row.p50:>7.0f} {row.p99:>7.0f} {row.failures:>6} {row.requests:>6}"
        print(line)
    print()
    for run in runs:
        auth = run.rows.get("GET /auth", Row("GET /auth"))
        print(f"--workers {run.workers}: CPU (100% = one core) server {run.server_cpu:.0%}, locust "
              f"{run.loader_cpu:.0%}; all CPUs {run.machine_busy:.0%} busy; stored "
              f"{run.stored_notifications} notifications and {run.stored_journeys} journeys for "
              f"{run.rows.get(ENDPOINTS[0], Row('')).requests} notifications answered and "
              f"{auth.requests - auth.failures} pages served")
        for failure in run.failures:
            print(f"    failure: {failure}")
    print("\n'all' is both requests together; one task (a notification and its page) is half of it.")


async def main_async(args: argparse.Namespace) -> int:
    import importlib.util

    # Only looked for: importing locust here would monkey-patch this process for gevent and stall asyncio.
    if importlib.util.find_spec("locust") is None:
        print("locust is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    from connector.security.crypto import new_key
    from connector.security.tokens import SageTokenVerifier
    from connector.testing.sage import SageEmulator

    cache_size = SageTokenVerifier.__init__.__kwdefaults__["cache_size"]
    pool = max(args.tokens, 2 * cache_size)
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    header_value = new_key() + new_key()
    runs: list[Run] = []
    async with SageEmulator(rate=None) as sage:
        progress(f"minting {pool} tokens")
        t0 = time.perf_counter()
        tokens = [sage.identity.notification_token(jti=uuid.uuid4().hex) for _ in range(pool)]
        mint_seconds = time.perf_counter() - t0
        plan_path = workdir / "plan.json"
        plan_path.write_text(json.dumps({"tokens": tokens, "bank_id": BANK_ID, "header_name": HEADER_NAME,
                                         "header_value": header_value,
                                         "redirect_base": f"{sage.base_url}{REDIRECT_PATH}"}))
        load_before = os.getloadavg()[0]
        for workers in args.workers:
            runs.append(await one_run(args, workers, sage, plan_path, workdir, header_value))
        load_after = os.getloadavg()[0]
    command = " ".join(shlex.quote(a) for a in ["python", "bench/load.py", *sys.argv[1:]])
    report(runs, args, command, pool, mint_seconds, (load_before, load_after))
    if args.keep:
        print(f"\nwork directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    bad = [r for r in runs if r.errors or not r.rows.get("GET /auth")]
    # One stored notification per notification answered, one journey per page served.
    inconsistent = [r for r in runs if not bad and (
        r.stored_journeys != r.rows["GET /auth"].requests or r.stored_notifications != r.rows[ENDPOINTS[0]].requests)]
    if inconsistent:
        print("the rows stored differ from the requests answered", file=sys.stderr)
    return 1 if bad or inconsistent else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=32, help="locust users, each looping without pause (default 32)")
    parser.add_argument("--spawn-rate", type=float, default=32, help="users started per second (default 32)")
    parser.add_argument("--run-time", default="20s", help="locust run time per worker count (default 20s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)")
    parser.add_argument("--postgres", default=os.environ.get("CONNECTOR_TEST_POSTGRES") or DEFAULT_POSTGRES,
                        help="PostgreSQL server URL without a database (default: $CONNECTOR_TEST_POSTGRES or "
                             f"{DEFAULT_POSTGRES})")
    parser.add_argument("--tokens", type=int, default=0,
                        help="distinct tokens (default and minimum: twice the verifier cache)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the connector's logging.level (default INFO, as in production)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, CSV stats)")
    args = parser.parse_args()
    seconds(args.run_time)  # refused early when malformed
    sys.path.insert(0, str(REPO))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

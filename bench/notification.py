"""Benchmark: ``POST /notification`` with every check, against a bare Sanic JSON endpoint, on this machine.

Product bar (product.md, "Quality bars"): ``/notification`` with full token checks serves at least half the requests
per second of a bare Sanic JSON endpoint on the same machine.

What runs:

* the Sage emulator (Sage ID JWKS) in this process, on loopback;
* the connector, started as ``connector serve --workers 1`` in its own process, on a throwaway config and SQLite file;
* a bare Sanic app (``POST /bare`` answering ``{"status":"accepted"}``) in its own process, one worker, with a
  ``GET /ready`` like the connector's so one start-up wait serves both;
* the load generator: an aiohttp client in this process with a fixed concurrency, for a fixed duration per variant,
  after a warm-up.

Variants:

* ``bare``: the bare endpoint;
* ``full``: the custom header (constant-time compare), an RS256 Sage ID token verified against the JWKS, the JSON body
  and envelope, and an insert in SQLite. Every request carries a new authorisation id, so each stores a row; tokens
  come from a pool larger than the verifier's cache, taken in turn, so every request pays an RSA verification;
* ``cached``: as ``full`` but one token for every request, so the verified-token cache answers.

Run: ``python bench/notification.py [--seconds N] [--concurrency C]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BANK_ID = "10aaeee6-4691-4443-8198-df39aaa8007c"
HEADER_NAME = "X-Connector-Key"
BAR = 0.5


# --- The bare server (run as a subprocess of this script) ------------------------------------------------------------


def serve_bare(port: int) -> None:
    from sanic import Sanic
    from sanic.response import json as json_response

    app = Sanic("bare")

    @app.post("/bare")
    async def bare(request):  # type: ignore[no-untyped-def]
        return json_response({"status": "accepted"})

    @app.get("/ready")
    async def ready(request):  # type: ignore[no-untyped-def]
        return json_response({"status": "ready"})

    app.run(host="127.0.0.1", port=port, single_process=True, access_log=False, motd=False)


# --- Servers ---------------------------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")


def start_process(name: str, argv: list[str], env: dict[str, str], url: str, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    return Server(name, url, process, log)


# --- Load ------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    server_cpu: float = 0.0
    loader_cpu: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000


class Requests:
    """Makes the next request of a variant: (path, headers, body). Built ahead so the loader stays cheap."""

    def __init__(self, path: str, headers: list[dict[str, str]], body) -> None:
        self.path = path
        self._headers = headers
        self._body = body
        self._i = 0

    def next(self) -> tuple[str, dict[str, str], bytes]:
        self._i += 1
        return self.path, self._headers[self._i % len(self._headers)], self._body()


async def load(http, base_url: str, requests: Requests, *, seconds: float, concurrency: int,
               name: str, server: Server) -> Result:
    result = Result(name, seconds)
    deadline = time.perf_counter() + seconds
    cpu0, loader0 = server.cpu_seconds(), time.process_time()
    started = time.perf_counter()

    async def worker() -> None:
        while True:
            path, headers, body = requests.next()
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            try:
                async with http.post(base_url + path, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except Exception as exc:  # counted, and the run goes on
                result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1
                continue
            if status == 200:
                result.latencies.append(time.perf_counter() - t0)
            else:
                result.errors[str(status)] = result.errors.get(str(status), 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    result.server_cpu = (server.cpu_seconds() - cpu0) / result.seconds
    result.loader_cpu = (time.process_time() - loader0) / result.seconds
    return result


# --- Main ------------------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    import aiohttp

    from connector.security.crypto import new_key
    from connector.security.tokens import SageTokenVerifier
    from connector.testing.connector import (
        SageEndpoints,
        connector_config,
        free_port,
        wait_until_ready,
        write_config,
    )
    from connector.testing.sage import SageEmulator

    cache_size = SageTokenVerifier.__init__.__kwdefaults__["cache_size"]
    pool_size = max(args.tokens, 2 * cache_size)

    workdir = Path(tempfile.mkdtemp(prefix="bench-notification-"))
    header_value = new_key() + new_key()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    servers: list[Server] = []
    async with SageEmulator(rate=None) as sage:
        try:
            connector_port, bare_port = free_port(), free_port()
            endpoints = SageEndpoints(sage.base_url, sage.client_id, sage.client_secret, sage.api_key,
                                      notification_header_value=header_value, notification_header_name=HEADER_NAME)
            config = write_config(workdir / "config.toml", connector_config(
                endpoints, database_url=f"sqlite://{workdir / 'connector.sqlite3'}{args.database_query}",
                port=connector_port, banks=[{"sage_bank_id": BANK_ID, "name": "Demo Bank", "provider": "demobank"}],
                providers={"demobank": {}}, extra={"server": {"workers": 1}, "logging": {"level": args.log_level}}))
            connector = start_process(
                "connector", [sys.executable, "-m", "connector.cli", "serve", "--config", str(config),
                              "--workers", "1"], env, f"http://127.0.0.1:{connector_port}", workdir)
            bare = start_process("bare", [sys.executable, str(Path(__file__).resolve()), "--serve-bare",
                                          str(bare_port)], env, f"http://127.0.0.1:{bare_port}", workdir)
            servers += [connector, bare]

            t0 = time.perf_counter()
            tokens = [sage.identity.notification_token(jti=uuid.uuid4().hex) for _ in range(pool_size)]
            mint_seconds = time.perf_counter() - t0
            one_token = sage.identity.notification_token()

            def notification() -> bytes:
                return json.dumps({"type": "resourceCreated",
                                   "resource": {"id": str(uuid.uuid4()), "type": "authorisation", "url": "NA"},
                                   "additionalData": {"bankId": BANK_ID}}).encode()

            def headers_for(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                        HEADER_NAME: header_value}

            variants = {
                "bare": (bare, lambda: Requests("/bare", [{"Content-Type": "application/json"}],
                                                lambda: b'{"type":"resourceCreated"}')),
                "full": (connector, lambda: Requests("/notification", [headers_for(t) for t in tokens],
                                                     notification)),
                "cached": (connector, lambda: Requests("/notification", [headers_for(one_token)], notification)),
            }

            connector_limit = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
            async with aiohttp.ClientSession(connector=connector_limit) as http:
                for server in (connector, bare):
                    await wait_until_ready(server.url, server.process.poll, server.log, timeout=30)
                # A full request first: it must be accepted, or the run measures error answers.
                path, headers, body = variants["full"][1]().next()
                async with http.post(connector.url + path, data=body, headers=headers) as resp:
                    if resp.status != 200:
                        raise SystemExit(f"the connector refused a valid notification: {resp.status} "
                                         f"{await resp.text()}")
                rounds: list[list[Result]] = []
                load_before = os.getloadavg()[0]
                for _ in range(args.rounds):  # variants interleaved, so a neighbour's burst of load hits all of them
                    rounds.append([])
                    for name in args.variants:
                        server, make = variants[name]
                        await load(http, server.url, make(), seconds=args.warmup, concurrency=args.concurrency,
                                   name=name, server=server)
                        rounds[-1].append(await load(http, server.url, make(), seconds=args.seconds,
                                                     concurrency=args.concurrency, name=name, server=server))
                load_after = os.getloadavg()[0]
            stored = stored_notifications(workdir / "connector.sqlite3")
        finally:
            for server in servers:
                server.stop()

    results = [merge([r for rnd in rounds for r in rnd if r.name == name]) for name in args.variants]
    report(results, rounds, args, pool_size=pool_size, mint_seconds=mint_seconds, stored=stored,
           load=(load_before, load_after))
    if args.keep:
        print(f"\nwork directory kept: {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    by_name = {r.name: r for r in results}
    if "full" in by_name and "bare" in by_name and by_name["bare"].rps:
        return 0 if by_name["full"].rps / by_name["bare"].rps >= BAR else 2
    return 0


def merge(parts: list[Result]) -> Result:
    """One variant over every round: requests and seconds summed, latencies pooled, CPU averaged by time."""
    total = sum(r.seconds for r in parts)
    merged = Result(parts[0].name, total)
    for r in parts:
        merged.latencies += r.latencies
        for k, v in r.errors.items():
            merged.errors[k] = merged.errors.get(k, 0) + v
        merged.server_cpu += r.server_cpu * r.seconds / total
        merged.loader_cpu += r.loader_cpu * r.seconds / total
    return merged


def stored_notifications(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM notification").fetchone()[0])


def report(results: list[Result], rounds: list[list[Result]], args: argparse.Namespace, *, pool_size: int,
           mint_seconds: float, stored: int, load: tuple[float, float]) -> None:
    import platform

    print(f"POST /notification vs bare Sanic: {args.seconds:g} s per variant after {args.warmup:g} s warm-up, "
          f"{args.rounds} round{'s' if args.rounds > 1 else ''}, concurrency {args.concurrency}, "
          "one server worker each")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}; load average {load[0]:.1f} before, {load[1]:.1f} after "
          "(anything else running skews the figures)")
    if args.database_query:
        print(f"connector database URL ends with: {args.database_query}")
    print(f"token pool: {pool_size} distinct RS256 tokens (minted in {mint_seconds:.1f} s), taken in turn\n")
    print(f"{'variant':<8} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'server CPU':>10} {'loader CPU':>10}  errors")
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "-"
        print(f"{r.name:<8} {r.ok:>9} {r.rps:>9.0f} {r.percentile(50):>8.2f} {r.percentile(90):>8.2f} "
              f"{r.percentile(99):>8.2f} {r.server_cpu:>9.0%} {r.loader_cpu:>9.0%}   {errors}")
    by_name = {r.name: r for r in results}
    bare = by_name.get("bare")
    if bare and bare.rps:
        print()
        for name in ("full", "cached"):
            if name in by_name:
                ratio = by_name[name].rps / bare.rps
                verdict = "meets" if ratio >= BAR else "BELOW"
                print(f"ratio {name}/bare: {ratio:.2f}  ({verdict} the product bar of {BAR})")
                if len(rounds) > 1:
                    per_round = [by_round[name].rps / by_round["bare"].rps
                                 for by_round in ({r.name: r for r in rnd} for rnd in rounds)]
                    print(f"    per round: {', '.join(f'{x:.2f}' for x in per_round)}")
    print(f"\nnotification rows stored by the connector: {stored} (warm-ups and the check request included)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per variant (default 5)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the variants, interleaved (default 1)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per variant (default 1)")
    parser.add_argument("--tokens", type=int, default=0,
                        help="distinct tokens for the full variant (default and minimum: twice the verifier cache)")
    parser.add_argument("--variants", nargs="+", default=["bare", "full", "cached"],
                        choices=["bare", "full", "cached"])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the connector's logging.level (default INFO, as in production)")
    parser.add_argument("--database-query", default="",
                        help="appended to the connector's SQLite URL, e.g. '?synchronous=NORMAL' (default: none)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, logs, database)")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())

"""Feed benchmark: N accounts × M transactions through the Sage emulator limited to 10 requests per second.

For each N (default 100, 300, 1000) the benchmark seeds N linked Demo Bank accounts straight into a fresh SQLite
database, starts the Sage emulator in this process (``rate=10``: more than 10 ``/v1`` requests in any second get 429),
and runs ``connector feed run --once`` in a child process, exactly as an operator would. It reports:

- the achieved Provider API request rate in steady state, over the allowed rate (the bar: ≥ 0.95; the client's
  limiter keeps 3 % headroom, so 0.97 is the ceiling);
- 429 answers in steady state (the bar: none) and in the whole run;
- duplicates (transactions Sage received more than once; must be 0) and transactions missing;
- the child's peak RSS, and its growth over the child's own baseline, as N grows (the bar: flat).

Run from the repository root::

    python bench/feed.py            # 100, 300, 1000 accounts × 3 transactions: about 5 minutes
    python bench/feed.py --quick    # 50, 200 accounts: about 1 minute
    python bench/feed.py --sizes 100,1000 --transactions 5 --parallel 32

Statements complete at once at the emulator (``processing_polls=0``), so each account costs exactly one POST and one
GET (the first poll, 1 s after acceptance); what is measured is the feed's pacing, not Sage's processing time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRIM_START = 1.0  # seconds of ramp-up (token, first reads) left out of the steady state
TRIM_END = 2.0  # seconds of tail (the last polls, fewer accounts than workers) left out


def rss_kb(field: str = "VmRSS") -> int:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), in KiB.

    Not ``ru_maxrss``: Linux carries the parent's peak over into a child's ``ru_maxrss`` across fork/vfork + exec,
    so it would grow with the emulator's memory in the benchmark process, not the feed's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def child(config: str, report: str) -> int:
    """The feed process: ``connector feed run --once``, then its peak RSS into ``report``."""
    from connector import cli
    from connector.feed import runtime  # noqa: F401 - imported before the baseline, like the run itself does
    from connector.plugins import load_plugins

    load_plugins()
    baseline = rss_kb()
    with open(os.devnull, "w") as sink:
        stdout, sys.stdout = sys.stdout, sink
        try:
            code = cli.main(["feed", "run", "--once", "--config", config])
        finally:
            sys.stdout = stdout
    peak = rss_kb("VmHWM")
    Path(report).write_text(json.dumps({"code": code, "baseline_kb": baseline, "peak_kb": peak}))
    return 0


async def one_size(accounts: int, transactions: int, rate: float, parallel: int, batch_size: int,
                   database_query: str = "") -> dict:
    from connector.feed.testing import seed_linked_accounts
    from connector.security.crypto import SecretBox
    from connector.storage import close_database, open_database
    from connector.testing.connector import SageEndpoints, connector_config, settings_from, write_config
    from connector.testing.fixtures import DEMO_BANK_ID, DEMO_BANKS
    from connector.testing.sage import SageEmulator

    with tempfile.TemporaryDirectory(prefix="feed-bench-") as tmp:
        async with SageEmulator(rate=rate, processing_polls=0, batch_size=batch_size) as sage:
            endpoints = SageEndpoints(sage.base_url, sage.client_id, sage.client_secret, sage.api_key)
            config = connector_config(
                endpoints, database_url=f"sqlite://{tmp}/connector.sqlite3{database_query}", port=8080,
                banks=DEMO_BANKS,
                providers={"demobank": {"history_days": transactions}},
                extra={"sage": {"requests_per_second": rate, "statement_batch_size": batch_size},
                       "feed": {"parallel_accounts": parallel}, "logging": {"level": "WARNING"}})
            path = write_config(Path(tmp) / "config.toml", config)
            settings = settings_from(config)
            await open_database(settings.database["url"])
            start = datetime.now(UTC).date() - timedelta(days=transactions)
            ids = await seed_linked_accounts(SecretBox(settings.encryption_keys), provider="demobank",
                                             sage_bank_id=DEMO_BANK_ID,
                                             users=[f"bench{n:05d}" for n in range(accounts)],
                                             accounts_per_user=["current"], requested_start=start)
            await close_database()

            report = Path(tmp) / "child.json"
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--child", str(path), str(report), cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            elapsed = time.monotonic() - started
            result = json.loads(report.read_text()) if report.exists() else {"code": -1, "peak_kb": 0,
                                                                             "baseline_kb": 0}
            if result["code"] != 0:
                print(err.decode()[-2000:], file=sys.stderr)

            api = sorted(r.at for r in sage.requests if r.path.startswith("/v1/"))
            first, last = api[0], api[-1]
            lo, hi = first + TRIM_START, last - TRIM_END
            steady = [t for t in api if lo <= t <= hi]
            steady_rate = len(steady) / (hi - lo) if hi > lo else float("nan")
            steady_429 = sum(1 for t in sage.throttled_at if lo <= t <= hi)
            got = [sage.transactions_by_account.get(i, []) for i in ids]
            duplicates = sum(len(g) - len(set(g)) for g in got)
            missing = accounts * transactions - sum(len(set(g)) for g in got)
            return {
                "accounts": accounts, "transactions": transactions, "exit_code": result["code"],
                "seconds": round(elapsed, 1), "requests": len(api),
                "rate": round(len(api) / (last - first), 2), "steady_rate": round(steady_rate, 2),
                "ratio": round(steady_rate / rate, 3), "429_total": sage.count_429,
                "429_steady": steady_429, "duplicates": duplicates, "missing": missing,
                "replayed": sage.replayed_statements,
                "peak_rss_mb": round(result["peak_kb"] / 1024, 1),
                "rss_growth_mb": round((result["peak_kb"] - result["baseline_kb"]) / 1024, 1),
            }


async def main(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([50, 200] if args.quick else
                                                                        [100, 300, 1000])
    print(f"feed benchmark: Sage emulator at {args.rate:g} req/s, {args.transactions} transactions per account, "
          f"batch {args.batch_size}, parallel_accounts {args.parallel}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    header = (f"{'accounts':>8} {'seconds':>8} {'requests':>8} {'req/s':>7} {'steady':>7} {'ratio':>6} "
              f"{'429':>4} {'429 ss':>6} {'dup':>4} {'miss':>5} {'peak RSS':>9} {'growth':>7}")
    print(header)
    rows = []
    for n in sizes:
        row = await one_size(n, args.transactions, args.rate, args.parallel, args.batch_size, args.database_query)
        rows.append(row)
        print(f"{row['accounts']:>8} {row['seconds']:>8} {row['requests']:>8} {row['rate']:>7} "
              f"{row['steady_rate']:>7} {row['ratio']:>6} {row['429_total']:>4} {row['429_steady']!s:>6} "
              f"{row['duplicates']:>4} {row['missing']:>5} {row['peak_rss_mb']:>7}MB {row['rss_growth_mb']:>5}MB",
              flush=True)
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["accounts"] - a["accounts"]) * 100
        print(f"peak RSS grows {slope:.2f} MB per 100 accounts ({a['accounts']} → {b['accounts']} accounts)")
    if args.json:
        print(json.dumps(rows, indent=1))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a busy machine delays "
          "requests at the emulator, which then sees bursts: 429s and a lower ratio)")
    ok = all(r["exit_code"] == 0 and r["duplicates"] == 0 and r["missing"] == 0 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 and 200 accounts (about a minute)")
    parser.add_argument("--sizes", help="comma-separated account counts (default 100,300,1000)")
    parser.add_argument("--transactions", type=int, default=3, help="transactions per account (default 3)")
    parser.add_argument("--rate", type=float, default=10, help="Sage's allowed requests per second (default 10)")
    parser.add_argument("--parallel", type=int, default=32, help="feed.parallel_accounts (default 32)")
    parser.add_argument("--batch-size", type=int, default=100, help="sage.statement_batch_size (default 100)")
    parser.add_argument("--database-query", default="",
                        help="appended to the SQLite URL, e.g. '?synchronous=NORMAL' to compare SQLite settings")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    sys.exit(asyncio.run(main(parser.parse_args())))

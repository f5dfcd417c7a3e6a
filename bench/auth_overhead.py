"""What authentication + limits + metering add to a trivial request.

Two apps in one run, same settings: ``governed`` is maas as it ships (API key checked, request
admitted under rpm and concurrency limits, usage record queued, x-ratelimit headers added);
``bare`` has the key dependency replaced by a fixed principal and the governance middleware
removed. Requests go through the ASGI app in-process (no network), one at a time, in
alternating rounds so drift hits both alike. Reports medians and the difference.

    .venv/bin/python bench/auth_overhead.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from maas.api import governance
from maas.api.app import build_app
from maas.auth.principal import Limits, Principal, Role
from maas.auth.store import KeySpec
from maas.config import Settings

RESULTS = Path(__file__).parent / "results" / "auth_overhead.json"
PATH = "/v2"  # server metadata: authenticated, touches no database


def bare_app(settings: Settings):
    app = build_app(settings)
    principal = Principal(
        key_id="bench",
        name="bench",
        tenant_id=1,
        tenant="platform",
        industry="other",
        role=Role.admin,
        allowed_models=None,
        expires_at=None,
        limits=Limits(),
    )

    async def fixed() -> Principal:
        return principal

    app.dependency_overrides[governance.current_key] = fixed
    app.user_middleware = [
        m for m in app.user_middleware if m.cls is not governance.GovernanceMiddleware
    ]
    return app


async def timings(apps: dict, headers: dict, count: int) -> dict[str, list[float]]:
    """Alternate one request to each app, ``count`` times, so drift hits both alike."""
    clients = {
        name: httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://localhost",
            headers=headers[name],
        )
        for name, app in apps.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in apps}
    try:
        for round_ in range(count + 50):  # the first 50 warm up (the key is read from the db)
            for name, http in clients.items():
                started = time.perf_counter()
                response = await http.get(PATH)
                elapsed = time.perf_counter() - started
                assert response.status_code == 200, response.text
                if round_ >= 50:
                    samples[name].append(elapsed)
    finally:
        for http in clients.values():
            await http.aclose()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000, help="requests per variant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), allowed_hosts=["localhost"])
        with (
            TestClient(build_app(settings)) as governed_client,
            TestClient(bare_app(settings)) as bare_client,
        ):
            spec = KeySpec(
                name="bench",
                role=Role.user,
                limits=Limits(requests_per_minute=10**9, max_concurrent=1000),
            )
            key = governed_client.app.state.keys.create(spec, None)[1]
            apps = {"bare": bare_client.app, "governed": governed_client.app}
            headers = {"bare": {}, "governed": {"Authorization": f"Bearer {key}"}}
            runs = asyncio.run(timings(apps, headers, args.requests))
    medians = {name: statistics.median(samples) * 1e6 for name, samples in runs.items()}
    p90 = {name: statistics.quantiles(samples, n=10)[-1] * 1e6 for name, samples in runs.items()}
    paired = [g - b for g, b in zip(runs["governed"], runs["bare"], strict=True)]
    added = statistics.median(paired) * 1e6
    print(f"{'variant':<10} {'median us':>10} {'p90 us':>10} {'requests':>9}")
    for name in ("bare", "governed"):
        print(f"{name:<10} {medians[name]:>10.1f} {p90[name]:>10.1f} {len(runs[name]):>9}")
    print(
        f"added by auth + limits + metering: {added:.1f} us (median of paired differences), "
        f"{medians['governed'] - medians['bare']:.1f} us (difference of medians); "
        f"ratio of medians {medians['governed'] / medians['bare']:.2f}x"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "auth_overhead",
                "path": PATH,
                "python": sys.version.split()[0],
                "requests_per_variant": len(runs["bare"]),
                "median_us": medians,
                "p90_us": p90,
                "added_us_median_of_paired_differences": added,
                "added_us_difference_of_medians": medians["governed"] - medians["bare"],
                "ratio": medians["governed"] / medians["bare"],
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

"""``maas keys ...``, ``maas tenants ...`` and ``maas usage``: local, straight on the database."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from maas.artifacts.keyring import MasterKeyring
from maas.auth.principal import INDUSTRIES, Limits, Role
from maas.auth.store import KeySpec
from maas.cli.context import load_settings, open_access, open_registry
from maas.cli.output import console, progress_bar
from maas.metering.usage import GROUPS, aggregate

keys_app = typer.Typer(
    help="Create, list and revoke API keys; set up encryption at rest.", no_args_is_help=True
)
tenants_app = typer.Typer(
    help="Tenants: the organisations or departments that own keys and models.", no_args_is_help=True
)


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Option("--name", "-n", help="What the key is for, for people.")],
    role: Annotated[
        Role,
        typer.Option(
            help="user: inference; maintainer: its tenant's models and keys; admin: everything."
        ),
    ] = Role.user,
    tenant: Annotated[
        str | None, typer.Option(help="Tenant of the key (default: platform).")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated model names the key may use (default: all its tenant sees)."
        ),
    ] = None,
    expires_in_days: Annotated[
        float | None, typer.Option(help="Expire after this many days.", min=0.001, max=36500)
    ] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.", min=1)] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.", min=1)] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Requests in flight at once.", min=1)
    ] = None,
    budget: Annotated[int | None, typer.Option(help="Tokens per calendar month.", min=0)] = None,
    cost_budget: Annotated[
        float | None,
        typer.Option(
            help="What the key may spend per calendar month, in the currency of the price "
            "table (maas prices set).",
            min=0,
        ),
    ] = None,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    spec = KeySpec(
        name=name,
        role=role,
        tenant=tenant,
        allowed_models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
        expires_at=datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None,
        limits=Limits(
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
            max_concurrent=concurrency,
            monthly_token_budget=budget,
            monthly_cost_budget=cost_budget,
        ),
    )
    with open_access() as access:
        record, plaintext = access.keys.create(spec, None)
    console.print(f"created {record.role.value} key {record.key_id} in tenant {record.tenant}")
    console.print("the key (shown only now; store it safely):")
    console.print(plaintext, highlight=False)


@keys_app.command("list")
def list_keys() -> None:
    """List keys (never the keys themselves)."""
    with open_access() as access:
        records = access.keys.list(None)
    table = Table("id", "name", "tenant", "role", "models", "expires", "last used", "state")
    table.columns[0].no_wrap = True
    table.columns[0].min_width = 12
    for r in records:
        state = "revoked" if r.revoked_at else "active"
        table.add_row(
            r.key_id,
            r.name,
            r.tenant,
            r.role.value,
            ",".join(r.allowed_models or ["*"]),
            _when(r.expires_at),
            _when(r.last_used_at),
            state,
        )
    console.print(table)


@keys_app.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The key's id (the 12 characters after 'maas-').")],
) -> None:
    """Revoke a key. A running server stops accepting it within 5 seconds."""
    with open_access() as access:
        record = access.keys.revoke(key_id, None)
    console.print(f"revoked {record.key_id} ({record.name})")


@tenants_app.command("create")
def create_tenant(
    name: Annotated[
        str, typer.Argument(help="Tenant name: lowercase letters, digits, '-', '_', '.'.")
    ],
    industry: Annotated[
        str | None,
        typer.Option(help=f"One of: {', '.join(INDUSTRIES)} (a department takes its parent's)."),
    ] = None,
    description: Annotated[str, typer.Option(help="What the tenant is.")] = "",
    parent: Annotated[
        str | None, typer.Option(help="The organisation this new department belongs to.")
    ] = None,
) -> None:
    """Create a tenant: an organisation, or with --parent one of its departments."""
    with open_access() as access:
        record = access.tenants.create(name, industry, description, parent)
    within = f", a department of {record.parent}" if record.parent else ""
    console.print(f"created tenant {record.name} ({record.industry}{within})")


@tenants_app.command("list")
def list_tenants() -> None:
    """List tenants."""
    with open_access() as access:
        records = access.tenants.list(None)
    table = Table("name", "industry", "department of", "description", "created")
    for r in records:
        table.add_row(r.name, r.industry, r.parent or "", r.description, _when(r.created_at))
    console.print(table)


def usage(
    by: Annotated[
        str, typer.Option(help=f"Comma-separated groups: {', '.join(GROUPS)}.")
    ] = "tenant,model,day",
    since: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option(help="Last day, YYYY-MM-DD.")] = None,
) -> None:
    """Requests and tokens, grouped by tenant, industry, key, model, endpoint and day."""
    groups = [g.strip() for g in by.split(",") if g.strip()]
    with open_access() as access:
        rows = aggregate(
            access.registry.engine, groups, since=_day(since, "since"), until=_day(until, "until")
        )
    table = Table(*groups, "requests", "errors", "prompt tok", "completion tok", "items", "mean ms")
    for row in rows:
        table.add_row(
            *[str(row.group[g] or "-") for g in groups],
            str(row.requests),
            str(row.errors),
            str(row.prompt_tokens),
            str(row.completion_tokens),
            str(row.items),
            f"{row.mean_latency_ms:.1f}",
        )
    console.print(table)


def _day(text: str | None, option: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        from maas.errors import InvalidRequest

        raise InvalidRequest(f"--{option} must be a date like 2026-11-01, not {text!r}") from None


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment else "-"


@keys_app.command("init-master")
def init_master() -> None:
    """Create the master key file for encrypting weights at rest (new versions only)."""
    settings = load_settings()
    path = settings.encryption_key_file or settings.home / "master.keys"
    MasterKeyring.create(path)
    console.print(f"created master key file {path} (mode 0600); weights of new versions are")
    console.print("now stored encrypted. Keep a copy of it away from MAAS_HOME: without it,")
    console.print("encrypted versions cannot be read.")
    if path != settings.home / "master.keys":
        console.print(f"set MAAS_ENCRYPTION_KEY_FILE={path} for every maas command and the server")


artifacts_app = typer.Typer(help="Stored artifacts: encryption at rest.", no_args_is_help=True)


@artifacts_app.command("rotate-master-key")
def rotate_master_key() -> None:
    """Make a new master key, re-wrap every data key with it and retire the old master key.

    Restart a running server afterwards so it loads the new key file."""
    with open_registry() as registry, progress_bar() as progress:
        count = registry.rotate_master_key(progress)
    console.print(
        f"re-wrapped {count} data keys with master key version {registry.keyring.active_version}"
    )

"""Secrets at rest (security.md S2–S6): AES-256-GCM with random nonces, row-bound associated data, key rotation, and
``connector rotate-keys`` end to end on a SQLite file written by a running connector."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from connector.config import parse_settings
from connector.security.crypto import VERSION, SecretBox, SecretError, key_id, new_key
from connector.testing.connector import write_config
from connector.testing.fixtures import DEMO_BANK_ID, SageCalls

REPO = Path(__file__).resolve().parents[1]
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
KEY_C = os.urandom(32)
HEADER = 1 + 8 + 12
SECRET = b"refresh-token-1f0c9a7e5d"


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


# --- The sealed format and nonces (S2) -------------------------------------------------------------------------------


def test_sealed_format_is_version_key_id_nonce_ciphertext_and_tag() -> None:
    sealed = SecretBox([KEY_A]).seal(SECRET, "consent.secrets_sealed:c1")
    assert sealed[:1] == VERSION
    assert sealed[1:9] == key_id(KEY_A)
    assert len(sealed) == HEADER + len(SECRET) + 16
    assert SECRET not in sealed
    assert key_id(KEY_A) != key_id(KEY_B) and len(key_id(KEY_A)) == 8
    assert key_id(KEY_A) not in KEY_A  # the id is a hash, not a slice of the key


def test_a_thousand_encryptions_of_one_value_use_a_thousand_nonces() -> None:
    box = SecretBox([KEY_A])
    sealed = [box.seal(SECRET, "consent.secrets_sealed:c1") for _ in range(1000)]
    assert len({s[9:HEADER] for s in sealed}) == 1000
    assert len({s[HEADER:] for s in sealed}) == 1000
    assert all(box.open(s, "consent.secrets_sealed:c1") == SECRET for s in sealed)


def test_json_round_trip_and_empty_value() -> None:
    box = SecretBox([KEY_A])
    value = {"access_token": "a", "refresh_token": "r", "expires_in": 3600, "scopes": ["x", "y"]}
    assert box.open_json(box.seal_json(value, "consent.secrets_sealed:c1"), "consent.secrets_sealed:c1") == value
    assert box.open(box.seal(b"", "x:1"), "x:1") == b""


def test_no_keys_is_refused() -> None:
    with pytest.raises(ValueError):
        SecretBox([])


def test_new_key_is_accepted_by_the_config() -> None:
    key = new_key()
    assert len(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))) == 32
    assert new_key() != key
    settings, problems = parse_settings({
        "security": {"encryption_keys": [key]},
        "sage": {"client_id": "i", "client_secret": "s", "api_key": "k",
                 "notification_header": {"name": "X-Key", "value": "v" * 32}},
    }, env={})
    assert problems == [] and len(settings.encryption_keys[0]) == 32


# --- Associated data binds a value to its table, column and row (S3) -----------------------------------------------


@pytest.mark.parametrize("elsewhere", [
    "consent.secrets_sealed:c2",  # another row
    "journey.flow_state_sealed:c1",  # another column, same row key
    "consent.secrets_sealed:c1 ",  # one extra byte
    "",
])
def test_a_ciphertext_moved_elsewhere_does_not_open(elsewhere: str) -> None:
    box = SecretBox([KEY_A])
    sealed = box.seal(SECRET, "consent.secrets_sealed:c1")
    with pytest.raises(SecretError, match="failed authentication") as err:
        box.open(sealed, elsewhere)
    assert SECRET.decode() not in str(err.value)
    assert box.open(sealed, "consent.secrets_sealed:c1") == SECRET


# --- Tampering is an error, never plaintext (S6) ---------------------------------------------------------------------


def test_every_single_bit_flip_is_refused() -> None:
    box = SecretBox([KEY_A])
    aad = "account.account_identifier_sealed:4c0f"
    sealed = box.seal(SECRET, aad)
    seen: set[str] = set()
    for bit in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SecretError) as err:
            box.open(bytes(tampered), aad)
        message = str(err.value)
        assert SECRET.decode() not in message and KEY_A.hex() not in message
        seen.add(message.split(" ")[0])
    assert seen == {"sealed"}  # malformed version, unknown key id, or failed authentication: all SecretError


@pytest.mark.parametrize("sealed", [b"", b"\x01", VERSION + b"\x00" * (HEADER + 15), b"\x02" + b"\x00" * 40])
def test_malformed_values_are_refused(sealed: bytes) -> None:
    with pytest.raises(SecretError, match="malformed|key id|authentication"):
        SecretBox([KEY_A]).open(sealed, "x:1")


def test_truncated_tag_is_refused() -> None:
    box = SecretBox([KEY_A])
    sealed = box.seal(SECRET, "x:1")
    with pytest.raises(SecretError):
        box.open(sealed[:-1], "x:1")
    with pytest.raises(SecretError):
        box.open(sealed + b"\x00", "x:1")


# --- Rotation (S4) ----------------------------------------------------------------------------------------------------


def test_rotation_seal_under_a_read_with_b_a_reseal_then_b_alone() -> None:
    rows = {f"consent.secrets_sealed:c{i}": f"token-{i}".encode() for i in range(20)}
    under_a = {aad: SecretBox([KEY_A]).seal(value, aad) for aad, value in rows.items()}

    rotating = SecretBox([KEY_B, KEY_A])
    assert all(rotating.open(sealed, aad) == rows[aad] for aad, sealed in under_a.items())
    assert not any(rotating.is_current(sealed) for sealed in under_a.values())
    fresh = rotating.seal(b"new", "consent.secrets_sealed:new")
    assert fresh[1:9] == key_id(KEY_B) and rotating.is_current(fresh)

    resealed = {aad: rotating.seal(rotating.open(sealed, aad), aad) for aad, sealed in under_a.items()}
    assert all(rotating.is_current(sealed) for sealed in resealed.values())

    only_b = SecretBox([KEY_B])
    assert all(only_b.open(sealed, aad) == rows[aad] for aad, sealed in resealed.items())
    assert only_b.open(fresh, "consent.secrets_sealed:new") == b"new"


def test_dropping_a_key_too_early_names_its_key_id() -> None:
    sealed = SecretBox([KEY_A]).seal(SECRET, "consent.secrets_sealed:c1")
    with pytest.raises(SecretError) as err:
        SecretBox([KEY_B]).open(sealed, "consent.secrets_sealed:c1")
    assert key_id(KEY_A).hex() in str(err.value)
    assert "security.encryption_keys" in str(err.value)
    assert SECRET.decode() not in str(err.value)


def test_key_order_only_chooses_which_key_seals() -> None:
    under_b = SecretBox([KEY_B]).seal(SECRET, "x:1")
    under_a = SecretBox([KEY_A]).seal(SECRET, "x:1")
    for keys in ([KEY_A, KEY_B], [KEY_B, KEY_A], [KEY_C, KEY_A, KEY_B]):
        box = SecretBox(keys)
        assert box.open(under_a, "x:1") == box.open(under_b, "x:1") == SECRET
        assert box.seal(SECRET, "x:1")[1:9] == key_id(keys[0])


def test_a_value_sealed_under_a_different_key_with_the_same_id_slot_fails_authentication() -> None:
    sealed = bytearray(SecretBox([KEY_A]).seal(SECRET, "x:1"))
    sealed[1:9] = key_id(KEY_B)  # relabelled as if sealed by B
    with pytest.raises(SecretError, match="failed authentication"):
        SecretBox([KEY_B]).open(bytes(sealed), "x:1")


# --- connector rotate-keys, end to end ------------------------------------------------------------------------------

SEALED = {  # table.column -> (row key column, primary key column)
    "consent.secrets_sealed": ("id", "id"),
    "account.account_identifier_sealed": ("external_id", "id"),
    "journey.flow_state_sealed": ("handle", "handle"),
    "journey.page_sealed": ("handle", "handle"),
}


def sealed_values(db: Path) -> dict[str, dict[str, bytes]]:
    """Every non-null sealed value in the file, by ``table.column`` and row key, read with plain sqlite3."""
    out: dict[str, dict[str, bytes]] = {}
    with sqlite3.connect(db) as conn:
        for name, (row_key, _) in SEALED.items():
            table, column = name.split(".")
            rows = conn.execute(f"SELECT {row_key}, {column} FROM {table} WHERE {column} IS NOT NULL").fetchall()
            out[name] = {str(k): bytes(v) for k, v in rows}
    return out


def open_all(values: dict[str, dict[str, bytes]], box: SecretBox) -> dict[str, dict[str, bytes]]:
    return {name: {k: box.open(v, f"{name}:{k}") for k, v in rows.items()} for name, rows in values.items()}


def rotate_keys(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "connector.cli", "rotate-keys", "--config", str(config)],
                          env={**base, **env}, cwd=config.parent, capture_output=True, text=True, timeout=60,
                          check=False)


def write_rotation_config(path: Path, db: Path, keys: list[str]) -> Path:
    return write_config(path, {
        "server": {"public_url": "http://127.0.0.1:8080"},
        "database": {"url": f"sqlite://{db}"},
        "security": {"encryption_keys": [f"${{{k}}}" for k in keys]},
        "sage": {"client_id": "x", "client_secret": "y", "api_key": "z",
                 "notification_header": {"name": "X-Connector-Key", "value": "v" * 32}},
        "providers": {"demobank": {}},
        "banks": [{"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"}],
    })


async def test_rotate_keys_moves_every_sealed_column_to_the_first_key(
    tmp_path: Path, sage, connector_factory, http: aiohttp.ClientSession, browser
) -> None:
    db = tmp_path / "connector.sqlite3"
    env = {"KEY_OLD": b64(KEY_A), "KEY_NEW": b64(KEY_B)}

    # Key A: link two people through the running connector, and leave a third journey half way (at the code form).
    connector = await connector_factory(database=f"sqlite://{db}",
                                        extra={"security": {"encryption_keys": [b64(KEY_A)]}})
    calls = SageCalls.for_connector(sage, connector, http)
    await calls.onboard(browser, "alice")
    await calls.onboard(browser, "bob")
    page = await browser.get(calls.auth_url(await calls.announce()))
    await browser.submit(page, {"User name": "otp", "Password": "pw"}, button="Sign in")
    await connector.stop()

    before = sealed_values(db)
    assert {name: len(rows) for name, rows in before.items()} == {
        "consent.secrets_sealed": 2, "account.account_identifier_sealed": 4,
        "journey.flow_state_sealed": 3, "journey.page_sealed": 3}
    assert all(v[1:9] == key_id(KEY_A) for rows in before.values() for v in rows.values())
    plaintext = open_all(before, SecretBox([KEY_A]))

    # Dropping A before re-encrypting: the pass refuses, names A's key id for each value, and changes nothing.
    config = write_rotation_config(tmp_path / "config.toml", db, ["KEY_NEW"])
    result = rotate_keys(config, env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stdout.count(f"key id {key_id(KEY_A).hex()}, which is not in security.encryption_keys") == 12
    assert f"key id {key_id(KEY_A).hex()} (not in security.encryption_keys) still seals 12 values" in result.stdout
    assert sealed_values(db) == before

    # [B, A]: every value moves to B.
    write_rotation_config(config, db, ["KEY_NEW", "KEY_OLD"])
    result = rotate_keys(config, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "consent.secrets_sealed: 2 re-encrypted, 0 already on the first key" in result.stdout
    assert "account.account_identifier_sealed: 4 re-encrypted" in result.stdout
    assert "journey.flow_state_sealed: 3 re-encrypted" in result.stdout
    assert "journey.page_sealed: 3 re-encrypted" in result.stdout
    assert f"key id {key_id(KEY_A).hex()} (security.encryption_keys[1]) is no longer used" in result.stdout
    after = sealed_values(db)
    assert all(v[1:9] == key_id(KEY_B) for rows in after.values() for v in rows.values())
    assert open_all(after, SecretBox([KEY_B])) == plaintext
    for secret in (plaintext["account.account_identifier_sealed"].values()):
        assert secret not in db.read_bytes()

    # Running it again finds nothing to do.
    result = rotate_keys(config, env)
    assert result.returncode == 0
    assert "consent.secrets_sealed: 0 re-encrypted, 2 already on the first key" in result.stdout
    assert sealed_values(db) == after

    # A connector holding only B serves the stored consents: /availableaccounts opens secrets and identifiers.
    connector = await connector_factory(database=f"sqlite://{db}",
                                        extra={"security": {"encryption_keys": [b64(KEY_B)]}})
    external_ids = list(plaintext["account.account_identifier_sealed"])
    async with http.get(f"{connector.url}/availableaccounts", params={"externalId": external_ids[0]},
                        headers={"Authorization": f"Bearer {sage.identity.provider_api_token()}"}) as resp:
        assert resp.status == 200, await resp.text()
        listed = await resp.json()
    by_id = {a["externalId"]: a["accountIdentifier"] for a in listed}
    assert by_id[external_ids[0]] == plaintext["account.account_identifier_sealed"][external_ids[0]].decode()


async def test_rotate_keys_reports_a_misplaced_ciphertext_and_moves_the_rest(
    tmp_path: Path, sage, connector_factory, http: aiohttp.ClientSession, browser
) -> None:
    db = tmp_path / "connector.sqlite3"
    connector = await connector_factory(database=f"sqlite://{db}",
                                        extra={"security": {"encryption_keys": [b64(KEY_A)]}})
    calls = SageCalls.for_connector(sage, connector, http)
    await calls.onboard(browser, "carol")
    await calls.onboard(browser, "dave")
    await connector.stop()

    with sqlite3.connect(db) as conn:  # copy one consent's ciphertext into the other row (S3)
        (first, sealed), (second, _) = conn.execute("SELECT id, secrets_sealed FROM consent ORDER BY id").fetchall()
        first_user = json.loads(SecretBox([KEY_A]).open(sealed, f"consent.secrets_sealed:{first}"))["user"]
        assert first_user in ("carol", "dave")
        conn.execute("UPDATE consent SET secrets_sealed = ? WHERE id = ?", (sealed, second))
    result = rotate_keys(write_rotation_config(tmp_path / "config.toml", db, ["KEY_NEW", "KEY_OLD"]),
                         {"KEY_OLD": b64(KEY_A), "KEY_NEW": b64(KEY_B)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "consent.secrets_sealed: 1 re-encrypted, 0 already on the first key, 1 FAILED" in result.stdout
    assert f"failed: consent.secrets_sealed of row {second}: sealed value failed authentication" in result.stdout
    assert f"key id {key_id(KEY_A).hex()} (security.encryption_keys[1]) still seals 1 value: keep it" \
        in result.stdout
    values = sealed_values(db)
    assert values["consent.secrets_sealed"][second][1:9] == key_id(KEY_A)  # left as it was
    assert values["consent.secrets_sealed"][first][1:9] == key_id(KEY_B)
    assert all(v[1:9] == key_id(KEY_B) for v in values["account.account_identifier_sealed"].values())
    assert json.loads(SecretBox([KEY_B]).open(values["consent.secrets_sealed"][first],
                                              f"consent.secrets_sealed:{first}"))["user"] == first_user


def test_rotate_keys_without_a_database_changes_nothing(tmp_path: Path) -> None:
    config = write_rotation_config(tmp_path / "config.toml", tmp_path / "absent.sqlite3", ["KEY_NEW"])
    result = rotate_keys(config, {"KEY_NEW": b64(KEY_B)})
    assert result.returncode == 1
    assert "no database at" in result.stderr
    assert not (tmp_path / "absent.sqlite3").exists()


def test_rotate_keys_refuses_a_bad_config(tmp_path: Path) -> None:
    config = write_rotation_config(tmp_path / "config.toml", tmp_path / "db.sqlite3", ["KEY_NEW", "KEY_NEW"])
    result = rotate_keys(config, {"KEY_NEW": b64(KEY_B)})
    assert result.returncode == 1
    assert "security.encryption_keys[1]: repeats security.encryption_keys[0]" in result.stderr

"""`/openapi.json` is exact: every request it calls valid is accepted, every one it calls invalid is
refused with 4xx, and every answer is one it documents. Checked two ways: the schema's constraints
are the validator's constants, and a third-party conformance tester (schemathesis, all checks, all
phases) run against a live `fraudd ingest` with a real key finds nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from fraudd.ingest.app import OPENAPI_PATH
from fraudd.learning.labels import parse_labels
from fraudd.scoring import decode

from .conftest import Namespace
from .ingest_server import IngestServer

KEY = "conformance-" + "k3y" * 6
SCHEMATHESIS = str(Path(sys.executable).with_name("st"))
# The coverage phase reaches every operation's edges (each constraint's boundaries, each required
# field missing) whatever this is; it bounds the fuzzing and stateful phases, which add random
# cases on top. Derandomized (a fixed seed, deterministic generation): every run sends the same
# requests, so a finding is reproducible and a pass means the same every time.
MAX_EXAMPLES = 15
SEED = 20251129


def schemas() -> dict:
    return json.loads(OPENAPI_PATH.read_text())["components"]["schemas"]


def test_the_schema_states_the_validators_constants() -> None:
    transaction = schemas()["Transaction"]
    properties = transaction["properties"]
    assert transaction["required"] == ["transaction_id", "user_id", "amount", "merchant", "timestamp"]
    limits = {
        "transaction_id": (1, decode.MAX_ID_CHARS),
        "user_id": (1, decode.MAX_TEXT_CHARS),
        "merchant": (1, decode.MAX_TEXT_CHARS),
    }
    limits |= {"card_id": (0, decode.MAX_ID_CHARS), "device_id": (0, decode.MAX_TEXT_CHARS), "ip": (0, decode.MAX_IP_CHARS)}
    assert set(limits) == set(decode.IDENTIFIERS)
    for name, (shortest, longest) in limits.items():
        prop = properties[name]
        assert (prop.get("minLength", 0), prop["maxLength"], prop["pattern"]) == (shortest, longest, decode.NO_CONTROL_PATTERN), (
            name
        )
    assert properties["amount"]["exclusiveMinimum"] == 0 and properties["amount"]["maximum"] == decode.MAX_AMOUNT
    number, text = properties["timestamp"]["oneOf"]
    assert (number["minimum"], number["exclusiveMaximum"]) == (decode.EPOCH_MIN, decode.EPOCH_MAX)
    assert text["format"] == "date-time" and str(decode.YEAR_MIN) in text["description"]
    assert str(decode.YEAR_MAX) in text["description"]
    assert properties["currency"]["pattern"] == decode.CURRENCY_PATTERN
    assert properties["country"]["pattern"] == decode.COUNTRY_PATTERN
    assert properties["mcc"]["pattern"] == decode.MCC_PATTERN
    assert properties["channel"]["enum"] == [*decode.CHANNELS, None]
    assert (properties["lat"]["minimum"], properties["lat"]["maximum"]) == (-decode.LAT_LIMIT, decode.LAT_LIMIT)
    assert (properties["lon"]["minimum"], properties["lon"]["maximum"]) == (-decode.LON_LIMIT, decode.LON_LIMIT)
    # The year pattern admits exactly YEAR_MIN..YEAR_MAX.
    years = re.compile(text["pattern"])
    admitted = [year for year in range(1000, 10000) if years.match(f"{year}-01-01T00:00:00Z")]
    assert (admitted[0], admitted[-1], len(admitted)) == (decode.YEAR_MIN, decode.YEAR_MAX, decode.YEAR_MAX - decode.YEAR_MIN + 1)

    label = schemas()["Label"]["properties"]
    assert label["transaction_id"]["pattern"] == decode.NO_CONTROL_PATTERN
    assert label["reported_at"]["oneOf"][:2] == [number, text]


def test_labels_are_judged_as_the_schema_states() -> None:
    refused = [{"reported_at": ""}, {"reported_at": "2025-11-29 03:00:00"}, {"reported_at": 0.0}, {"source": {}}]
    refused += [{"transaction_id": "t\r\n1"}, {"source": "chargeback\n"}]
    labels, errors = parse_labels([{"transaction_id": "t1", "label": "fraud", **fields} for fields in refused])
    assert labels == [] and [position for position, _reason in errors] == list(range(len(refused))), errors
    accepted = [{"reported_at": None}, {"reported_at": "2025-11-29t03:00:00z"}, {"reported_at": 1764385200}, {"source": None}]
    labels, errors = parse_labels([{"transaction_id": "t1", "label": "fraud", **fields} for fields in accepted])
    assert errors == [] and labels[1].reported_at == labels[2].reported_at


def test_a_conformance_tester_finds_nothing(ns: Namespace, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"conformance:{KEY}::transactions+score+labels\n")  # every route
    server = IngestServer.start(ns, tmp_path, "--workers", "1", "--api-keys-file", str(keys), "--decision-timeout-ms", "1")
    try:
        result = subprocess.run(
            [
                SCHEMATHESIS,
                "run",
                f"{server.url}/openapi.json",
                "--header",
                f"Authorization: Bearer {KEY}",
                "--checks",
                "all",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--seed",
                str(SEED),
                "--generation-deterministic",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,  # where it keeps its reports
        )
    finally:
        assert server.stop() == 0, server.log()[-2000:]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout and "Tested: 6" in result.stdout, result.stdout[-3000:]

"""Batch decoding: one typed msgspec call for the usual batch, orjson for any other, exact
per-entry reasons for the bad entries."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fraudd.generator import GeneratorConfig, TransactionGenerator
from fraudd.scoring import decode

from .test_pipeline import INVALID_KINDS, NOW


def tx(i: int, **extra) -> bytes:
    return orjson.dumps(
        {"transaction_id": f"t{i}", "user_id": f"u{i}", "amount": 10.5 + i, "merchant": "m", "timestamp": NOW, **extra}
    )


def test_valid_batch_columns() -> None:
    payloads = [
        tx(0, currency="eur", mcc="5411", country="de", channel="ecom", lat=52.5, lon=13.4, device_id="d1"),
        tx(1, mcc="54x1", country="Germany", channel="moon", lat="north"),
    ]
    batch = decode.decode_batch(["1-0", "2-0"], payloads)
    assert batch.rejected == []
    assert batch.transaction_id == ["t0", "t1"] and batch.entry_ids == ["1-0", "2-0"]
    assert batch.amount.tolist() == [10.5, 11.5] and batch.timestamp.tolist() == [NOW, NOW]
    assert batch.currency == ["EUR", "USD"] and batch.mcc == ["5411", None] and batch.country == ["DE", None]
    assert batch.channel == ["ecom", None] and batch.device_id == ["d1", None]
    assert batch.lat[0] == 52.5 and math.isnan(batch.lat[1])


def test_rfc3339_timestamp() -> None:
    batch = decode.decode_batch(
        ["1-0"],
        [
            orjson.dumps(
                {"transaction_id": "t", "user_id": "u", "amount": 12.5, "merchant": "m", "timestamp": "2025-11-29T03:00:00Z"}
            )
        ],
    )
    assert batch.timestamp.tolist() == [1764385200.0] and batch.amount.tolist() == [12.5]


def test_every_invalid_kind_gets_its_reason_and_good_neighbours_survive() -> None:
    payloads, ids = [], []
    for i, (bad, _reason) in enumerate(INVALID_KINDS):
        payloads += [tx(i), bad]
        ids += [f"{2 * i}-0", f"{2 * i + 1}-0"]
    batch = decode.decode_batch(ids, payloads)
    assert batch.transaction_id == [f"t{i}" for i in range(len(INVALID_KINDS))]
    rejected = sorted(batch.rejected, key=lambda r: int(r.entry_id.split("-")[0]))
    assert [(r.entry_id, r.reason) for r in rejected] == [
        (f"{2 * i + 1}-0", reason) for i, (_bad, reason) in enumerate(INVALID_KINDS)
    ]
    assert [r.payload for r in rejected] == [bad for bad, _reason in INVALID_KINDS]


def test_payloads_cannot_shift_onto_other_entries() -> None:
    # Joined naively, "{..},{..}" + "[1" + "2]" parses to 3 elements for 3 entries, the second
    # object landing on an entry whose own payload is garbage. All three must be rejected.
    two_objects = tx(1) + b"," + tx(2)
    batch = decode.decode_batch(["1-0", "2-0", "3-0"], [two_objects, b"[1", b"2]"])
    assert len(batch) == 0
    assert len(batch.rejected) == 3


def test_missing_data_field() -> None:
    batch = decode.decode_batch(["1-0"], [None])
    assert [r.reason for r in batch.rejected] == [decode.REASON_NO_DATA]


CONTROL_CHARACTERS = ["\r\n", "\n", "\t", "\x00", "\x1b", "\x7f", "\x85", "\x9f"]


def test_control_characters_in_identifiers_are_dead_lettered_naming_the_field() -> None:
    bad = [
        tx(100 + k, **{name: f"a{char}b"})
        for k, (name, char) in enumerate((n, c) for n in decode.IDENTIFIERS for c in CONTROL_CHARACTERS)
    ]
    # Spelled raw in UTF-8 where JSON allows it (DEL, C1), escaped otherwise; printable escapes pass.
    assert b"\x7f" in b"".join(bad) and b"\xc2\x85" in b"".join(bad)
    good = [tx(0, merchant="Caf\u00e9 \u00a0\u2028"), tx(1, merchant="£ ¥"), tx(2)]
    batch = decode.decode_batch([f"{i}-0" for i in range(len(good) + len(bad))], good + bad)
    assert batch.transaction_id == ["t0", "t1", "t2"]
    assert len(batch.rejected) == len(bad)
    assert {r.reason for r in batch.rejected} == {decode.REASON_INVALID}
    fields = sorted({r.detail.split(":")[0] for r in batch.rejected})
    assert fields == sorted(decode.IDENTIFIERS)
    assert all("control characters" in r.detail for r in batch.rejected)


def test_an_escaped_printable_character_alone_does_not_reject_a_batch() -> None:
    payloads = [orjson.dumps({"transaction_id": "t\\", "user_id": "u", "amount": 1, "merchant": 'm"', "timestamp": NOW})]
    assert b"\\" in payloads[0]
    batch = decode.decode_batch(["1-0"], payloads)
    assert batch.rejected == [] and batch.transaction_id == ["t\\"]


def test_amount_is_bounded() -> None:
    batch = decode.decode_batch(["1-0", "2-0", "3-0"], [tx(0, amount=1e308), tx(1, amount=decode.MAX_AMOUNT), tx(2, amount=2e12)])
    assert batch.transaction_id == ["t1"]
    assert [(r.entry_id, r.reason, r.detail.split(":")[0]) for r in batch.rejected] == [
        ("1-0", decode.REASON_INVALID, "amount"),
        ("3-0", decode.REASON_INVALID, "amount"),
    ]


def test_rfc3339_forms_the_api_accepts_are_scored() -> None:
    stamps = ["2025-11-29t03:00:00z", "2016-12-31T23:59:60Z", "2001-01-01T00:30:00+01:00", "2025-11-29T03:00:00.123456789-05:00"]
    payloads = [tx(i, timestamp=stamp) for i, stamp in enumerate(stamps)]
    for payload in payloads:
        assert not isinstance(decode.check_payload(payload), decode.Problem), payload
    batch = decode.decode_batch([f"{i}-0" for i in range(len(payloads))], payloads)
    assert batch.rejected == []
    assert batch.timestamp.tolist()[:2] == [1764385200.0, 1483228800.0]


def test_the_api_refuses_what_the_decoder_drops() -> None:
    """The decoder scores a transaction whose optional field is malformed, without that field; the
    API refuses it, naming the field, as its schema says."""
    cases = {
        "timestamp": ["2025-11-29 03:00:00Z", "2025-11-29T03:00Z", "20251129T030000Z", "2100-01-01T00:00:00Z"],
        "currency": ["EURO", "E1R", 978],
        "country": ["DEU", "D1"],
        "mcc": ["54x1", "541", "5411\n", "٥٤١١"],
        "channel": ["moon", "POS"],
        "lat": [90.5, "north", True],
        "lon": [181, -180.01],
        "card_id": ["c" * 65, 7],
        "device_id": ["d" * 257],
        "ip": ["i" * 65],
    }
    for name, values in cases.items():
        for value in values:
            payload = tx(0, **{name: value})
            problem = decode.check_payload(payload)
            assert isinstance(problem, decode.Problem) and (problem.reason, problem.field) == (decode.REASON_INVALID, name), (
                name,
                value,
                problem,
            )
            if name != "timestamp" or value != "2100-01-01T00:00:00Z":
                assert not decode.decode_batch(["1-0"], [payload]).rejected, (name, value)
    absent = tx(0, currency=None, country=None, mcc=None, channel=None, lat=None, lon=None, card_id=None, ip="")
    assert not isinstance(decode.check_payload(absent), decode.Problem)


def test_an_optional_field_of_any_json_type_never_fails_the_batch() -> None:
    odd = [[], {}, [1], {"a": 1}, True, 7, None]
    payloads = [
        tx(i, **{name: value}) for i, value in enumerate(odd) for name in ("channel", "currency", "mcc", "country", "lat")
    ]
    batch = decode.decode_batch([f"{i}-0" for i in range(len(payloads))], payloads)
    assert batch.rejected == [] and len(batch) == len(payloads)
    assert set(batch.channel) == {None} and set(batch.currency) == {"USD"}
    for value in odd[:-1]:
        problem = decode.check_payload(tx(0, channel=value))
        assert isinstance(problem, decode.Problem) and problem.field == "channel"


def members(pairs: list[tuple[str, Any]]) -> bytes:
    """A JSON object of the given members in order; a name may repeat, as JSON allows."""
    return ("{" + ",".join(f"{json.dumps(name)}:{json.dumps(value, ensure_ascii=False)}" for name, value in pairs) + "}").encode()


def with_member(payload: bytes, member: bytes) -> bytes:
    """The object ``payload`` with ``member`` added last (so that an error keeps its position)."""
    return payload[:-1] + b"," + member + payload[-1:]


def assert_same(batch: decode.DecodedBatch, reference: decode.DecodedBatch) -> None:
    """Equal columns (numeric ones byte for byte) and equal rejections, payloads aside."""
    for f in fields(decode.DecodedBatch):
        ours, theirs = getattr(batch, f.name), getattr(reference, f.name)
        if f.name == "rejected":
            assert [(r.entry_id, r.reason, r.detail) for r in ours] == [(r.entry_id, r.reason, r.detail) for r in theirs]
        elif isinstance(ours, np.ndarray):
            assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes(), f.name
        else:
            assert ours == theirs, f.name


def general_path(payloads: list[bytes]) -> list[bytes]:
    """The payloads with a field the typed decoder does not know, which sends the batch to orjson
    and the column checks; the decoder ignores such a field."""
    return [with_member(p, b'"note":0') if p.endswith(b"}") else p for p in payloads]


def test_the_usual_batch_is_decoded_by_the_typed_decoder() -> None:
    payloads = TransactionGenerator(GeneratorConfig(seed=5)).generate(500).payloads()
    array = decode._joined(payloads)
    assert array is not None and decode._whole([str(i) for i in range(500)], array, []) is not None
    assert decode._whole([str(i) for i in range(500)], decode._joined(general_path(payloads)), []) is None
    ids = [f"{i}-0" for i in range(len(payloads))]
    assert_same(decode.decode_batch(ids, payloads), decode.decode_batch(ids, general_path(payloads)))


def test_what_the_typed_decoder_refuses_comes_out_as_orjson_reads_it() -> None:
    """msgspec differs from orjson in what it refuses (a shallower nesting limit, a field given
    twice), and skips an unknown field unread (bad UTF-8, a number out of range): those batches
    must come out as they did."""
    deep = b"[" * 1000 + b"]" * 1000
    cases = [
        (with_member(tx(0), b'"lat":' + deep), []),  # msgspec refuses the depth; orjson reads it
        (with_member(tx(1), b'"note":' + deep), []),
        (with_member(tx(2), b'"note":"\xff"'), [decode.REASON_NOT_UTF8]),
        (with_member(tx(3), b'"\xff":1'), [decode.REASON_NOT_UTF8]),
        (with_member(tx(4), b'"note":1e400'), [decode.REASON_NOT_JSON]),
        (members([("amount", "x"), *orjson.loads(tx(5)).items()]), []),  # the last one counts
        (members([*orjson.loads(tx(6)).items(), ("amount", True)]), [decode.REASON_INVALID]),
        (members([*orjson.loads(tx(7)).items(), ("user_id", "u\x85")]), [decode.REASON_INVALID]),
        (with_member(tx(8, merchant="Caf\u00e9"), b'"note":"\xed\xa0\x80"'), [decode.REASON_NOT_UTF8]),
    ]
    for payload, reasons in cases:
        payloads = [tx(10), payload]
        batch = decode.decode_batch(["1-0", "2-0"], payloads)
        assert [r.reason for r in batch.rejected] == reasons, payload[:80]
        assert len(batch) == 2 - len(reasons)
        assert_same(batch, decode.decode_batch(["1-0", "2-0"], general_path(payloads)))
    deep_lat = decode.decode_batch(["1-0"], [with_member(tx(0), b'"lat":' + deep)])
    assert math.isnan(deep_lat.lat[0]) and deep_lat.amount.tolist() == [10.5]


identifiers = st.sampled_from(["t", "é" * 64, "é" * 65, "", "a\x00b", "a\x7f", "a\x85", "\u2028", "x" * 257]) | st.text(
    max_size=8
)
numbers = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([decode.MAX_AMOUNT, decode.EPOCH_MIN, decode.EPOCH_MAX, 1e-320, -0.0, 0])
    | st.floats(min_value=9e8, max_value=4.2e9)
)
stamps = st.sampled_from(
    ["2025-11-29T03:00:00Z", "2016-12-31T23:59:60Z", "2025-11-29 03:00:00+01:00", "2025-11-29T03:00:00", "yesterday"]
)
odd = (
    st.none()
    | st.booleans()
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
texts = st.sampled_from(["EUR", "eur", "DE", "d1", "5411", "٥٤١١", "pos", "ecom", "ATM", "", "e\u00e9r"]) | st.text(max_size=6)
anything = identifiers | texts | numbers | stamps | odd
# Mostly values the typed decoder takes, so that many batches are decoded whole.
likely = {
    "transaction_id": identifiers,
    "user_id": identifiers,
    "merchant": identifiers,
    "amount": st.floats(min_value=1e-300, max_value=decode.MAX_AMOUNT) | st.integers(min_value=1, max_value=10**12),
    "timestamp": st.floats(min_value=decode.EPOCH_MIN, max_value=decode.EPOCH_MAX, exclude_max=True) | stamps,
    **{name: identifiers | texts for name in ("card_id", "device_id", "ip", "currency", "country", "mcc", "channel")},
    **{name: st.floats(min_value=-200, max_value=200) | st.integers(-200, 200) for name in ("lat", "lon")},
}
values = {name: st.one_of(*[value] * 9, anything) for name, value in likely.items()}
valid = {"transaction_id": "t", "user_id": "u", "merchant": "m", "amount": 10.5, "timestamp": NOW}
payload_members = st.builds(
    lambda chosen, dropped, twice: [(name, value) for name, value in {**valid, **chosen}.items() if name not in dropped] + twice,
    st.fixed_dictionaries({}, optional=values),
    st.sets(st.sampled_from(sorted(valid)), max_size=1) | st.just(set()),
    st.lists(st.sampled_from(sorted(values)).flatmap(lambda name: st.tuples(st.just(name), values[name])), max_size=1),
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(payload_members, min_size=1, max_size=4))
def test_any_batch_decodes_as_on_the_general_path(batch: list[list[tuple[str, Any]]]) -> None:
    payloads = [members(pairs) for pairs in batch]
    ids = [f"{i}-0" for i in range(len(payloads))]
    assert_same(decode.decode_batch(ids, payloads), decode.decode_batch(ids, general_path(payloads)))

"""Batch decoding: one orjson call on the happy path, exact per-entry reasons otherwise."""

from __future__ import annotations

import math

import orjson

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
                {"transaction_id": "t", "user_id": "u", "amount": 1, "merchant": "m", "timestamp": "2025-11-29T03:00:00Z"}
            )
        ],
    )
    assert batch.timestamp.tolist() == [1764385200.0]


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

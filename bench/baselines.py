"""The two consumers fraudd is measured against, one process each (``python -m bench.baselines``).

``bare``: the ceiling of moving messages through a consumer group from Python: XREADGROUP COUNT
B, then one XACK of every id, and nothing else. No consumer of this stream can be faster.

``naive``: the consumer a tutorial would write: per message, one ``orjson.loads``, a feature row
from the message alone (behaviour features left at zero), one-row ONNX inference, one INSERT and
commit, one XACK. One concession keeps the comparison fair: onnxruntime gets one intra-op thread,
as fraudd's workers do, instead of its default of a thread per core spinning against the other
processes.

Both read their namespace from the environment fraudd reads (REDIS_URL, FRAUDD_STREAM, ...), and
run until SIGTERM.
"""

from __future__ import annotations

import math
import os
import signal
from datetime import UTC, datetime

import click

from fraudd.scoring.features import HIGH_RISK_MCC

_stopping = False


def _stop(signum, frame) -> None:
    global _stopping
    _stopping = True


def _env(name: str) -> str:
    return os.environ[name]


def bare(consumer: str, batch_size: int, block_ms: int) -> None:
    import redis

    stream, group = _env("FRAUDD_STREAM"), _env("CONSUMER_GROUP")
    # The same client setup as fraudd's workers (RESP2, raw replies), so only the work differs.
    client = redis.Redis.from_url(_env("REDIS_URL"), protocol=2)
    client.set_response_callback("XREADGROUP", lambda response, **options: response)
    while not _stopping:
        reply = client.execute_command(
            "XREADGROUP", "GROUP", group, consumer, "COUNT", batch_size, "BLOCK", block_ms, "STREAMS", stream, ">"
        )
        if reply:
            client.execute_command("XACK", stream, group, *[entry_id for entry_id, _fields in reply[0][1]])


# Message-only features, written out per message the way a tutorial would.
_CHANNELS = {"pos": 1.0, "ecom": 2.0, "atm": 3.0}
_INSERT = """INSERT INTO transactions (transaction_id, user_id, amount, currency, merchant, mcc, country,
    card_id, device_id, ip, channel, lat, lon, event_time, stream_id, score, decision, model_version)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"""


def naive(consumer: str, batch_size: int, block_ms: int, model_path: str) -> None:
    import numpy as np
    import onnxruntime as ort
    import orjson
    import redis

    from fraudd.schema import connect
    from fraudd.scoring.features import FEATURE_NAMES

    stream, group = _env("FRAUDD_STREAM"), _env("CONSUMER_GROUP")
    client = redis.Redis.from_url(_env("REDIS_URL"), decode_responses=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    version = meta.get("fraudd.version", "unknown")
    review, decline = float(meta.get("fraudd.review_threshold", 0.5)), float(meta.get("fraudd.decline_threshold", 0.9))
    input_name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    output = "probabilities" if "probabilities" in outputs else outputs[-1]
    conn = connect(_env("POSTGRES_URL"), _env("FRAUDD_PG_SCHEMA"))
    conn.commit()
    while not _stopping:
        reply = client.xreadgroup(group, consumer, {stream: ">"}, count=batch_size, block=block_ms)
        # redis-py answers a map under RESP3 and a list of pairs under RESP2.
        for _stream, messages in reply.items() if isinstance(reply, dict) else reply or []:
            for entry_id, fields in messages[0] if messages and isinstance(messages[0], list) else messages:
                tx = orjson.loads(fields["data"])
                row = np.zeros((1, len(FEATURE_NAMES)), dtype=np.float32)
                row[0, 0] = math.log1p(tx["amount"])
                row[0, 1] = (int(tx["timestamp"]) // 3600) % 24
                row[0, 2] = tx.get("mcc") in HIGH_RISK_MCC
                row[0, 3] = _CHANNELS.get(tx.get("channel"), 0.0)
                row[0, 4] = tx.get("device_id") is not None
                row[0, 5] = tx.get("card_id") is not None
                probabilities = session.run([output], {input_name: row})[0]
                score = float(probabilities[0][-1])
                decision = "decline" if score >= decline else "review" if score >= review else "approve"
                conn.execute(
                    _INSERT,
                    (
                        tx["transaction_id"],
                        tx["user_id"],
                        tx["amount"],
                        tx.get("currency", "USD"),
                        tx["merchant"],
                        tx.get("mcc"),
                        tx.get("country"),
                        tx.get("card_id"),
                        tx.get("device_id"),
                        tx.get("ip"),
                        tx.get("channel"),
                        tx.get("lat"),
                        tx.get("lon"),
                        datetime.fromtimestamp(tx["timestamp"], tz=UTC),
                        entry_id,
                        score,
                        decision,
                        version,
                    ),
                )
                conn.commit()
                client.xack(stream, group, entry_id)


@click.command()
@click.argument("kind", type=click.Choice(["bare", "naive"]))
@click.option("--consumer", required=True, help="Consumer name in the group.")
@click.option("--batch-size", default=500, show_default=True, help="XREADGROUP COUNT.")
@click.option("--block-ms", default=50, show_default=True)
@click.option("--model-path", default=None, help="ONNX model (naive only).")
def main(kind: str, consumer: str, batch_size: int, block_ms: int, model_path: str | None) -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if kind == "bare":
        bare(consumer, batch_size, block_ms)
    else:
        if not model_path:
            raise click.UsageError("naive needs --model-path")
        naive(consumer, batch_size, block_ms, model_path)


if __name__ == "__main__":
    main()

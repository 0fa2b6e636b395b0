"""Publishing identifications: a plain paho client vs the durable outbox + MqttLink.

Baseline, the research-script way: one paho client (``loop_start``, automatic
reconnect), ``client.publish(topic, payload, qos=1)`` for each identification and
nothing else; unacknowledged messages live only in paho's memory.

Ours, what the edge daemon does: each identification is committed to the SQLite
outbox (WAL, fsync per commit) under the device's next ``seq``, and ``MqttLink``
publishes the backlog and deletes an entry only when its PUBACK arrives.

Everything runs against a real mosquitto on 127.0.0.1 started by this script (with
persistence, so a broker restart keeps its sessions and queues: what goes missing is
lost by the publisher). Payloads are realistic identifications (~650 bytes).

* **throughput**: N messages published as fast as possible, until the last PUBACK;
  the gain (below 1) is the cost of durability.
* **lost messages** in three incidents, each with the publisher producing
  ``--count`` messages at ``--rate`` per second in its own process while a
  persistent-session subscriber counts distinct messages:
  - *broker restart*: mosquitto is stopped (SIGTERM) half-way and started again
    ``--outage`` seconds later;
  - *publisher SIGKILL*: the publishing process is killed with SIGKILL half-way and
    started again (as systemd would), producing the rest;
  - *SIGKILL during an outage*: the broker is stopped at a third, the publisher is
    killed at two thirds (a power cut while the network is down), then both come back.

  A message is *produced* once ``publish()`` (baseline) or ``Outbox.add()`` (ours)
  has returned; *lost* = produced and never received. Ours must lose 0.

    python benchmarks/publish.py [--messages 3000] [--count 600] [--rate 200]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from _broker import Broker
from _machine import Figure, Goal, Report, benchmark_parser, positive_float, positive_int
from paho.mqtt.enums import CallbackAPIVersion

from fieldscope.collect.samples import sample_identification
from fieldscope.edge.link import BrokerSettings, MqttLink
from fieldscope.edge.outbox import Outbox
from fieldscope.edge.topics import Topics

PREFIX = "bench"
STATION = "pub"
SCENARIOS = ("broker restart", "publisher SIGKILL", "SIGKILL during outage")
WAYS = ("baseline", "ours")


def topic_for(device: str) -> str:
    return Topics(PREFIX, STATION, device).identification


def payload(device: str, seq: int) -> bytes:
    return sample_identification(seq, device=device, station=STATION).to_json()


def pace(t0: float, i: int, rate: float) -> None:
    """Sleep until message ``i`` is due (a station produces at its own pace)."""
    if rate > 0:
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


# --- the two publishers ----------------------------------------------------------------


def new_link(port: int, device: str, outbox: Outbox, stop: threading.Event) -> MqttLink:
    return MqttLink(
        BrokerSettings(host="127.0.0.1", port=port, client_id=f"bench-{device}"),
        Topics(PREFIX, STATION, device),
        outbox,
        on_command=lambda _name, _payload: None,
        retained_model=lambda: None,
        stop=stop,
    )


class PahoPublisher:
    """The baseline: publish QoS 1 and count PUBACKs; nothing survives the process."""

    def __init__(self, port: int, device: str) -> None:
        self.device = device
        self.topic = topic_for(device)
        self.acked = 0
        self.sent = 0
        self._cv = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{device}")
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_publish(self, *_args: Any) -> None:
        with self._cv:
            self.acked += 1
            self._cv.notify_all()

    def publish(self, seq: int) -> None:
        # The research scripts ignore the result: a QoS 1 message published while
        # disconnected is kept in memory and sent after paho reconnects.
        self.client.publish(self.topic, payload(self.device, seq), qos=1)
        self.sent += 1

    def wait_all_acked(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self.acked >= self.sent, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def child(fields: list[str]) -> int:
    """A publishing process: produce ``count`` messages, print each seq once produced."""
    way, device, db = fields[0], fields[2], fields[6]
    port, start, count, rate = int(fields[1]), int(fields[3]), int(fields[4]), float(fields[5])
    t0 = time.monotonic()
    if way == "baseline":
        paho = PahoPublisher(port, device)
        for i in range(count):
            paho.publish(start + i)
            print(start + i, flush=True)
            pace(t0, i + 1, rate)
        delivered = paho.wait_all_acked(60)
        paho.close()
        return 0 if delivered else 3
    stop = threading.Event()
    with Outbox(db) as outbox:
        link = new_link(port, device, outbox, stop)
        link.start()
        topic = topic_for(device)
        for i in range(count):
            entry = outbox.add(topic, lambda seq: payload(device, seq))
            print(entry.seq, flush=True)
            pace(t0, i + 1, rate)
        stop.set()
        flushed = link.stop_clean(timeout=60)
    return 0 if flushed else 3


class Child:
    """A publishing child process and the seqs it has produced so far."""

    def __init__(self, args: list[str], log: Path) -> None:
        command = [sys.executable, __file__, "--child", *args]
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=fh, text=True)
        self.log = log
        self.produced: list[int] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cv:
                self.produced.append(int(line))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_produced(self, n: int, timeout: float = 60) -> None:
        with self._cv:
            done = self._cv.wait_for(
                lambda: len(self.produced) >= n or self.proc.poll() is not None, timeout
            )
        if not done or len(self.produced) < n:
            self.fail(f"produced {len(self.produced)} of {n} messages")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.finish(10)

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.fail(f"did not finish within {timeout:.0f} s")
        self._reader.join(10)
        return code

    def fail(self, why: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        raise SystemExit(f"publisher process: {why}\n{self.log.read_text()[-3000:]}")


# --- the subscriber that counts --------------------------------------------------------


class Counter:
    """A persistent-session QoS 1 subscriber: the distinct ``seq`` received per device."""

    def __init__(self, port: int) -> None:
        self.seen: dict[str, set[int]] = {}
        self.duplicates: dict[str, int] = {}
        self._cv = threading.Condition()
        self.last_arrival = time.monotonic()
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-counter", clean_session=False
        )
        self.client.reconnect_delay_set(1, 2)
        topic = f"{PREFIX}/{STATION}/+/identification"
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise SystemExit("the counting subscriber could not subscribe")

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        data = json.loads(msg.payload)
        device, seq = data["device"], int(data["seq"])
        with self._cv:
            seen = self.seen.setdefault(device, set())
            if seq in seen:
                self.duplicates[device] = self.duplicates.get(device, 0) + 1
            seen.add(seq)
            self.last_arrival = time.monotonic()
            self._cv.notify_all()

    def settle(self, device: str, produced: set[int], quiet: float, timeout: float) -> set[int]:
        """Wait until every produced seq arrived, or nothing arrived for ``quiet`` s."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                missing = produced - self.seen.get(device, set())
                now = time.monotonic()
                if not missing or now >= deadline or now - self.last_arrival >= quiet:
                    return missing
                self._cv.wait(min(0.2, deadline - now))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- measurements ----------------------------------------------------------------------


def throughput_baseline(port: int, n: int) -> float:
    paho = PahoPublisher(port, "tput-paho")
    start = time.perf_counter()
    for seq in range(n):
        paho.publish(seq)
    if not paho.wait_all_acked(120):
        raise SystemExit(f"baseline: only {paho.acked} of {n} PUBACKs within 120 s")
    elapsed = time.perf_counter() - start
    paho.close()
    return n / elapsed


def throughput_ours(port: int, n: int, work: Path) -> tuple[float, float]:
    """Messages/s through outbox + link until the outbox is empty; and outbox.add alone."""
    device = "tput-outbox"
    topic = topic_for(device)
    with Outbox(work / "store-only.sqlite") as outbox:
        start = time.perf_counter()
        for _ in range(n):
            outbox.add(topic, lambda seq: payload(device, seq))
        store_only = n / (time.perf_counter() - start)
    stop = threading.Event()
    with Outbox(work / "throughput.sqlite") as outbox:
        link = new_link(port, device, outbox, stop)
        link.start()
        if not link.wait_online(10):
            raise SystemExit("ours: the link did not connect within 10 s")
        start = time.perf_counter()
        for _ in range(n):
            outbox.add(topic, lambda seq: payload(device, seq))
        while outbox.depth():
            if time.perf_counter() - start > 300:
                raise SystemExit(f"ours: {outbox.depth()} messages still unacknowledged")
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        stop.set()
        link.stop_clean(10)
    return n / elapsed, store_only


def incident(
    way: str,
    scenario: str,
    *,
    broker: Broker,
    counter: Counter,
    args: argparse.Namespace,
    work: Path,
) -> dict[str, int]:
    """Run one publisher through one incident; return produced, lost and duplicate counts."""
    device = f"{way}-{SCENARIOS.index(scenario)}"
    db = work / f"{device}.sqlite"
    log = work / f"{device}.log"
    n, rate = args.count, args.rate

    def spawn(start: int, count: int) -> Child:
        fields = [way, broker.port, device, start, count, rate, db]
        return Child([str(f) for f in fields], log)

    produced: list[int] = []
    first = spawn(0, n)
    if scenario == "broker restart":
        first.wait_produced(n // 2)
        broker.stop()
        time.sleep(args.outage)
        broker.start()
        code = first.finish()
        produced = first.produced
        if code != 0:
            first.fail(f"exited with {code}")
    else:
        outage = scenario == "SIGKILL during outage"
        if outage:
            first.wait_produced(n // 3)
            broker.stop()
            first.wait_produced(2 * n // 3)
        else:
            first.wait_produced(n // 2)
        first.kill()
        if outage:
            time.sleep(max(0.0, args.outage - 0.5))
            broker.start()
        done = len(first.produced)
        start = (max(first.produced) + 1) if first.produced else 0
        second = spawn(start, n - done)  # ours continues the seq from its outbox
        code = second.finish()
        if code != 0:
            second.fail(f"restarted publisher exited with {code}")
        produced = first.produced + second.produced
    missing = counter.settle(device, set(produced), quiet=args.quiet, timeout=60)
    return {
        "produced": len(produced),
        "lost": len(missing),
        "duplicates": counter.duplicates.get(device, 0),
    }


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--messages", type=positive_int, default=3000, help="throughput messages")
    parser.add_argument("--count", type=positive_int, default=600, help="messages per incident run")
    parser.add_argument(
        "--rate", type=positive_float, default=200.0, help="messages/s in incidents"
    )
    parser.add_argument(
        "--outage", type=positive_float, default=1.0, help="seconds the broker is down"
    )
    parser.add_argument(
        "--quiet", type=positive_float, default=5.0, help="seconds without arrivals that end a run"
    )
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.quick:
        args.messages, args.count, args.rate, args.outage, args.quiet = 200, 60, 300.0, 0.3, 2.0

    report = Report(
        "publish",
        "identifications to a real mosquitto: throughput and messages lost in incidents",
        baseline="paho client, QoS 1 publish() per message, unacked messages in memory only",
        ours="SQLite outbox (fsync per message) + MqttLink, entry deleted on PUBACK",
        quick=args.quick,
    )
    with report.started() as work, Broker(work / "broker", persistence=True) as broker:
        counter = Counter(broker.port)
        try:
            print(f"throughput, {args.messages} messages each ...", flush=True)
            base = throughput_baseline(broker.port, args.messages)
            ours, store_only = throughput_ours(broker.port, args.messages, work)
            results: dict[str, dict[str, dict[str, int]]] = {}
            for scenario in SCENARIOS:
                results[scenario] = {}
                for way in WAYS:
                    print(f"{scenario}: {way} ...", flush=True)
                    results[scenario][way] = incident(
                        way, scenario, broker=broker, counter=counter, args=args, work=work
                    )
        finally:
            counter.close()

    report.add(Figure("throughput until all PUBACKed", ours, "msg/s", baseline=base, note="QoS 1"))
    report.add(Figure("outbox.add alone (commit + fsync)", store_only, "msg/s"))
    lost_any = False
    for scenario in SCENARIOS:
        mine, theirs = results[scenario]["ours"], results[scenario]["baseline"]
        lost_any = lost_any or mine["lost"] > 0
        report.add(
            Figure(
                f"lost of {mine['produced']}, {scenario}",
                mine["lost"],
                "msgs",
                baseline=theirs["lost"],
                higher_is_better=False,
                goal=Goal("<=", 0),
            )
        )
        report.note(
            f"{scenario}: duplicates delivered (dropped by subscribers by seq): "
            f"ours {mine['duplicates']}, baseline {theirs['duplicates']}"
        )
    report.details = {
        "messages": args.messages,
        "count": args.count,
        "rate": args.rate,
        "outage_s": args.outage,
        "incidents": results,
    }
    report.finish(args.json)
    return 1 if lost_any else 0


if __name__ == "__main__":
    sys.exit(main())

"""The broker fixture gives later tests a real Mosquitto: check it passes messages."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker

pytestmark = pytest.mark.mqtt


def test_mosquitto_fixture_delivers_qos1_and_retained(mosquitto: Broker) -> None:
    received: list[tuple[str, bytes, bool]] = []
    got = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append((msg.topic, msg.payload, bool(msg.retain)))
        got.set()

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fixture-pub")
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    info = pub.publish("fs/test/retained", b"hello", qos=1, retain=True)
    info.wait_for_publish(timeout=5)
    assert info.is_published()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fixture-sub")
    sub.on_message = on_message
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("fs/#", qos=1)
    sub.loop_start()
    try:
        assert got.wait(timeout=5), "no message from the broker"
        assert received[0] == ("fs/test/retained", b"hello", True)
    finally:
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()

#!/usr/bin/env python3
"""Writes the seed corpora the README describes (corpus/ is git-ignored):
corpus/plan from the example plan (TOML) and a JSON body of the same plan; corpus/mqtt_front
from hand-built MQTT 3.1.1 sessions of device `gw-fuzz`, each prefixed with the read size
byte the target uses to split its input."""
import json, os, sys, tomllib

HERE = os.path.dirname(os.path.abspath(__file__))


def s(text):
    b = text.encode()
    return len(b).to_bytes(2, "big") + b


def rlen(n):
    out = bytearray()
    while True:
        d, n = n % 128, n // 128
        out.append(d | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first, body):
    return bytes([first]) + rlen(len(body)) + body


def connect(client="gw-fuzz", user="gw-fuzz", password="p" * 64, will=None):
    flags = 0x80 | 0x40
    payload = s(client)
    if will:
        flags |= 0x04 | 0x08  # will, will QoS 1
        payload += s(will[0]) + len(will[1]).to_bytes(2, "big") + will[1]
    payload += s(user) + s(password)
    body = s("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + payload
    return packet(0x10, body)


def subscribe(pid, topics):
    body = pid.to_bytes(2, "big") + b"".join(s(t) + bytes([1]) for t in topics)
    return packet(0x82, body)


def publish(pid, topic, payload):
    return packet(0x32, s(topic) + pid.to_bytes(2, "big") + payload)


DOWN = "drover/v1/dev/gw-fuzz/down"
KEYRING = "drover/v1/fleet/keyring"
UP = "drover/v1/dev/gw-fuzz/up/telemetry"


def main():
    plan_dir = os.path.join(HERE, "corpus", "plan")
    front_dir = os.path.join(HERE, "corpus", "mqtt_front")
    os.makedirs(plan_dir, exist_ok=True)
    os.makedirs(front_dir, exist_ok=True)
    example = os.path.join(HERE, "..", "examples", "rollout.toml")
    text = open(example, "rb").read()
    open(os.path.join(plan_dir, "rollout.toml"), "wb").write(text)
    open(os.path.join(plan_dir, "rollout.json"), "w").write(json.dumps(tomllib.loads(text.decode())))
    session = (
        connect()
        + subscribe(1, [DOWN, KEYRING])
        + publish(2, UP, b"DR\x01\x02" + bytes(40))
        + packet(0x40, (7).to_bytes(2, "big"))
        + packet(0xC0, b"")
        + packet(0xE0, b"")
    )
    seeds = {f"session-{n}": bytes([n]) + session for n in (1, 7, 255)}
    seeds["will"] = bytes([255]) + connect(will=("drover/v1/dev/gw-fuzz/up/status", b"DR\x01\x05gone"))
    seeds["foreign"] = (
        bytes([255])
        + connect()
        + publish(3, "drover/v1/dev/gw-other/up/telemetry", b"x")
        + subscribe(4, ["#"])
    )
    for name, data in seeds.items():
        open(os.path.join(front_dir, name), "wb").write(data)
    print(f"seeds: {len(os.listdir(plan_dir))} plan, {len(os.listdir(front_dir))} mqtt_front", file=sys.stderr)


if __name__ == "__main__":
    main()

"""A third-party Kafka client (confluent-kafka) talking to the bridge as a Firely client would.

Sends an ExecuteStorePlanCommand as raw JSON with its ids, fhir-release and response address in
record headers, then reads the reply from the response topic and the change events from the event
topics. Prints one JSON object on stdout with what it received, for the calling test to check.

Usage: kafka_client.py BOOTSTRAP COMMAND_TOPIC REPLY_TOPIC FULL_EVENT_TOPIC LIGHT_EVENT_TOPIC PATIENT_ID
"""

import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer


def headers_of(message):
    return {key: (value.decode("utf-8") if value is not None else None) for key, value in (message.headers() or [])}


def main():
    bootstrap, command_topic, reply_topic, full_topic, light_topic, patient_id = sys.argv[1:7]
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "python-client-" + uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([reply_topic, full_topic, light_topic])

    message_id, conversation_id = str(uuid.uuid4()), str(uuid.uuid4())
    command = {
        "instructions": [
            {
                "itemId": "python-1",
                "resource": json.dumps(
                    {
                        "resourceType": "Patient",
                        "id": patient_id,
                        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
                        "active": True,
                    }
                ),
                "resourceType": "Patient",
                "resourceId": patient_id,
                "currentVersion": None,
                "operation": "create",
            }
        ]
    }
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    delivered = []
    producer.produce(
        command_topic,
        value=json.dumps(command).encode("utf-8"),
        headers=[
            ("MessageId", message_id),
            ("ConversationId", conversation_id),
            ("SourceAddress", "kafka://python-client/" + reply_topic),
            ("fhir-release", "R4"),
            ("responseAddress", "kafka://" + bootstrap + "/" + reply_topic + "?type=topic"),
        ],
        on_delivery=lambda err, msg: delivered.append(err),
    )
    producer.flush(30)
    if delivered != [None]:
        raise SystemExit("the command was not delivered: %r" % delivered)

    result = {"reply": None, "events": []}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (result["reply"] is None or len(result["events"]) < 2):
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        body = json.loads(message.value())
        received = {"topic": message.topic(), "headers": headers_of(message), "body": body}
        if message.key() is not None:
            received["key"] = message.key().decode("utf-8")
        if message.topic() == reply_topic:
            result["reply"] = received
        elif any(c["reference"]["resourceId"] == patient_id for c in body.get("changes", [])):
            result["events"].append(received)
    consumer.close()
    print(json.dumps({"sent": {"messageId": message_id, "conversationId": conversation_id}, **result}))


if __name__ == "__main__":
    main()

// An MQTT.js client over WebSockets, as a browser dashboard uses it, driven by fleetmq's tests
// (tests/mqttjs.py): options as JSON in argv[2]; commands as JSON lines on stdin; everything
// it sees as JSON lines on stdout. It never reconnects: a test sees each refusal once.
import { createInterface } from "node:readline";
import mqtt from "mqtt";

const options = JSON.parse(process.argv[2]);
const say = (event) => process.stdout.write(JSON.stringify(event) + "\n");

const client = mqtt.connect(options.url, {
  clientId: options.clientId ?? "",
  username: options.username,
  password: options.password,
  protocolVersion: options.protocolVersion ?? 4,
  clean: true,
  reconnectPeriod: 0,
  connectTimeout: 10_000,
  keepalive: 30,
  ...(options.will ? { will: { ...options.will, qos: 1 } } : {}),
  // A browser names the page's origin in the handshake; Node.js sends none unless told.
  ...(options.origin ? { wsOptions: { origin: options.origin } } : {}),
});

client.on("connect", (connack) => say({ event: "connect", sessionPresent: connack.sessionPresent }));
client.on("error", (error) => say({ event: "error", message: String(error.message), code: error.code ?? null }));
client.on("close", () => say({ event: "close" }));
client.on("message", (topic, payload, packet) =>
  say({ event: "message", topic, payload: payload.toString("utf8"), retain: packet.retain }));

const commands = {
  subscribe: (command) =>
    // A refused filter (SUBACK 0x80) comes as an error carrying the SUBACK packet; granted
    // then echoes what was asked for.
    client.subscribe(command.filter, { qos: command.qos ?? 1 }, (error, granted) =>
      say({ event: "suback", filter: command.filter, error: error ? String(error.message) : null,
            granted: error?.packet?.granted ?? (granted ?? []).map((g) => g.qos) })),
  publish: (command) =>
    client.publish(command.topic, command.payload, { qos: command.qos ?? 1, retain: command.retain ?? false },
      (error) => say({ event: "published", topic: command.topic, error: error ? String(error.message) : null })),
  // Forced when the connection is gone: nothing in flight can complete then.
  end: () => client.end(!client.connected, () => { say({ event: "ended" }); process.exit(0); }),
};

createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  commands[command.op](command);
});
process.stdin.on("end", () => client.end(true, () => process.exit(0)));

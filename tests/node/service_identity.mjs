// A Node service on letta-bus, with the official clients from npm (@nats-io/transport-node, @nats-io/jetstream):
// every operation a service identity may do, and every one it may not, against a running nats-server.
// Run by tests/integration/test_service_identity.py:
//   node service_identity.mjs '<json>'   with {url, user, password, inbox_prefix, stream, subject, durable,
//                                         others: [durable names it must not touch], timeout_ms}
// Prints one JSON object: {"<operation>": {"ok": true, "value": ...} | {"ok": false, "error": "<name>: <message>"}}.
// Exit code 0 whenever the results were printed (the caller asserts them), 2 on bad arguments.
import { connect } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";

const args = JSON.parse(process.argv[2] ?? "null");
if (!args || !args.url || !args.user || !args.password || !args.stream || !args.durable) {
  console.error("usage: node service_identity.mjs '{\"url\", \"user\", \"password\", \"inbox_prefix\", \"stream\", " +
    "\"subject\", \"durable\", \"others\", \"timeout_ms\"}'");
  process.exit(2);
}
const timeout = args.timeout_ms ?? 2000;
const results = {};

async function attempt(name, fn) {
  try {
    const value = await fn();
    results[name] = { ok: true, value: value === undefined ? null : value };
  } catch (err) {
    results[name] = { ok: false, error: `${err?.name ?? "Error"}: ${err?.message ?? String(err)}` };
  }
}

const options = { servers: args.url, user: args.user, pass: args.password, timeout, name: `node-${args.user}` };

// 1. Without the per-user inbox prefix: nats.js subscribes to _INBOX.<nuid>.*, which the identity may not.
await attempt("default_inbox_jsm", async () => {
  const nc = await connect(options);
  try {
    await jetstreamManager(nc, { timeout });
  } finally {
    await nc.close();
  }
});

// 2. With it (the documented client option), everything a service needs.
const nc = await connect({ ...options, inboxPrefix: args.inbox_prefix });
results.connect = { ok: true, value: nc.getServer() };
let jsm = null;
await attempt("jsm", async () => {
  jsm = await jetstreamManager(nc, { timeout }); // requests $JS.API.INFO (checkAPI)
  return true;
});
jsm ??= await jetstreamManager(nc, { timeout, checkAPI: false });
const js = jetstream(nc, { timeout });

await attempt("account_info", async () => (await jsm.getAccountInfo()).streams);
await attempt("stream_info", async () => (await jsm.streams.info(args.stream)).config.name);
await attempt("stream_find", async () => await jsm.streams.find(args.subject)); // $JS.API.STREAM.NAMES
await attempt("create_own", async () => (await jsm.consumers.add(args.stream, {
  durable_name: args.durable, name: args.durable, ack_policy: AckPolicy.Explicit,
  deliver_policy: DeliverPolicy.All, filter_subject: "letta.agent.>",
})).name);
await attempt("update_own", async () => (await jsm.consumers.update(args.stream, args.durable, {
  description: "billing, updated",
})).config.description);
await attempt("consumer_info_own", async () => (await jsm.consumers.info(args.stream, args.durable)).name);
await attempt("fetch_ack", async () => {
  const consumer = await js.consumers.get(args.stream, args.durable);
  const batch = await consumer.fetch({ max_messages: 1, expires: timeout });
  for await (const m of batch) {
    const ok = await m.ackAck({ timeout }); // the server confirms the ack on our inbox
    return { event_id: JSON.parse(new TextDecoder().decode(m.data)).event_id, subject: m.subject, acked: ok };
  }
  throw new Error("no message fetched");
});
await attempt("acked_state", async () => {
  const info = await jsm.consumers.info(args.stream, args.durable);
  return { ack_floor: info.ack_floor.stream_seq, num_ack_pending: info.num_ack_pending, num_pending: info.num_pending };
});

for (const other of args.others ?? []) {
  await attempt(`create_other:${other}`, async () => (await jsm.consumers.add(args.stream, {
    durable_name: other, name: other, ack_policy: AckPolicy.Explicit,
  })).name);
  await attempt(`delete_other:${other}`, async () => await jsm.consumers.delete(args.stream, other));
  await attempt(`fetch_other:${other}`, async () => {
    const consumer = await js.consumers.get(args.stream, other); // consumer info first: refused
    const batch = await consumer.fetch({ max_messages: 1, expires: 1000 });
    for await (const m of batch) return m.seq;
    return null;
  });
  await attempt(`pull_other:${other}`, async () => { // a raw pull request, past the client's consumer lookup
    const reply = await nc.request(`$JS.API.CONSUMER.MSG.NEXT.${args.stream}.${other}`,
      JSON.stringify({ batch: 1, expires: 500_000_000 }), { timeout });
    return reply.subject;
  });
}
await attempt("ephemeral", async () => (await jsm.consumers.add(args.stream, { ack_policy: AckPolicy.Explicit })).name);
await attempt("update_stream", async () => (await jsm.streams.update(args.stream, { description: "mine" }))
  .config.description);
await attempt("delete_stream", async () => await jsm.streams.delete(args.stream));
await attempt("purge_stream", async () => (await jsm.streams.purge(args.stream)).purged);
await attempt("publish", async () => (await js.publish(args.subject, "{}", { timeout })).seq);
await attempt("delete_own", async () => await jsm.consumers.delete(args.stream, args.durable));

await nc.close();
console.log(JSON.stringify(results));

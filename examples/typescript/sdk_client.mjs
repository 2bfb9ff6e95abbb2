// The official Mistral SDK for JavaScript/TypeScript, pointed at Envoy with a shield token.
// Usage: node sdk_client.mjs <server_url> <token>  -> prints one JSON line with what it saw.
import { Mistral } from "@mistralai/mistralai";

const [serverURL, apiKey] = process.argv.slice(2);
const client = new Mistral({ apiKey, serverURL, timeoutMs: 30000 });
const out = {};
try {
  const res = await client.chat.complete({
    model: "mistral-small-latest",
    messages: [{ role: "user", content: "Hello from TypeScript" }],
  });
  out.chat = { content: res.choices[0].message.content, usage: res.usage };

  const stream = await client.chat.stream({
    model: "mistral-small-latest",
    messages: [{ role: "user", content: "Count" }],
  });
  let text = "";
  let usage = null;
  for await (const event of stream) {
    text += event.data.choices[0]?.delta?.content ?? "";
    if (event.data.usage) usage = event.data.usage;
  }
  out.stream = { text, usage };

  const emb = await client.embeddings.create({ model: "mistral-embed", inputs: ["a", "b"] });
  out.embeddings = { count: emb.data.length, usage: emb.usage };
} catch (err) {
  out.error = { status: err.statusCode ?? null, body: err.body ?? String(err) };
}
console.log(JSON.stringify(out));

// The web chat of `scratchlm serve`: plain JavaScript, no libraries, talking to the server's own
// OpenAI-compatible /v1/chat/completions with stream: true (server-sent events read from fetch's body).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], model: null, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return body;
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    return (j.error && j.error.message) || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { $("model").textContent = "(" + (await errorText(resp)) + ")"; return; }
    const j = await resp.json();
    state.model = j.data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    $("model").textContent = "(server not reachable)";
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Reads "data: {...}" events off the response body; calls onEvent with each parsed JSON object.
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  let reply = "";
  setBusy(true);
  $("status").textContent = "thinking…";
  state.controller = new AbortController();
  const started = performance.now();
  let tokens = 0;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: state.controller.signal,
      body: JSON.stringify({
        model: state.model || undefined,
        messages: state.messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: parseFloat($("temperature").value),
        max_tokens: parseInt($("max-tokens").value, 10) || undefined,
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    let finish = null;
    await readEvents(resp, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const c of chunk.choices || []) {
        if (c.delta && c.delta.content) {
          reply += c.delta.content;
          out.textContent = reply;
          out.parentElement.scrollIntoView({ block: "end" });
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    });
    const secs = (performance.now() - started) / 1000;
    $("status").textContent = `${tokens} tokens in ${secs.toFixed(1)} s` + (finish ? ` (${finish})` : "");
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      addMessage("error", String(e.message || e));
      $("status").textContent = "";
    }
  } finally {
    state.controller = null;
    setBusy(false);
    // what was shown stays in the conversation, stopped or not, so the next turn continues from it
    if (reply) state.messages.push({ role: "assistant", content: reply });
    else state.messages.pop();
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("reset").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").replaceChildren();
  $("status").textContent = "";
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("api-key").addEventListener("change", loadModel);
loadModel();

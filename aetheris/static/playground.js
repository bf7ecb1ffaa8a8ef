// The Aetheris chat playground: a client of the server's own OpenAI-compatible API (/v1/models,
// /v1/chat/completions with stream: true), loaded from the same origin. No framework, no build step.
//
// Safety: everything the model or the server sends (text, tool names, tool arguments, error messages)
// reaches the page only through textContent / createElement -- never innerHTML -- so generated text
// cannot inject markup. The page is served with a Content-Security-Policy that allows scripts from
// this origin only, as a second line of defence. An API key, when the server asks for one, is typed
// by the user and kept in a variable of this tab; the page never stores or embeds it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {key: null, model: null, messages: [], controller: null, busy: false};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function setStatus(text) { $("status").textContent = text; }

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function errorText(response) {
  // The server answers errors as {"error": {"message", ...}}; anything else is shown by status.
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function connect() {
  setStatus("connecting...");
  let response;
  try {
    response = await fetch("/v1/models", {headers: headers()});
  } catch (err) {
    setStatus("server unreachable");
    showError(String(err));
    return;
  }
  if (response.status === 401) {
    $("auth").hidden = false;
    $("send").disabled = true;
    setStatus(state.key ? "that key was refused" : "API key needed");
    $("api-key").focus();
    return;
  }
  if (!response.ok) {
    setStatus("error");
    showError(await errorText(response));
    return;
  }
  const body = await response.json();
  state.model = body.data && body.data.length ? body.data[0].id : "aetheris";
  $("model").textContent = state.model;
  $("auth").hidden = true;
  $("send").disabled = false;
  setStatus("ready");
}

// --- the conversation ------------------------------------------------------------------------------

function addMessage(role, text) {
  const item = el("li", "msg " + role);
  item.dataset.role = role;
  item.append(el("span", "role", role));
  const content = el("div", "content", text);
  content.dir = "auto";
  item.append(content);
  $("messages").append(item);
  item.scrollIntoView({block: "end"});
  return {item, content};
}

function addToolCall(view) {
  const box = el("div", "tool-call");
  const name = el("span", "tool-name");
  const args = el("pre", "tool-args");
  box.append(el("span", "tool-label", "tool call"), name, args);
  view.item.append(box);
  return {box, name, args};
}

function prettyArguments(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (_) { return text; }
}

function offerToolResult(view, call, pending) {
  // The playground does not run tools: the user types each result, which goes back as a tool message;
  // the model is asked again once every call of the turn has its result.
  const form = el("form", "tool-result");
  const input = el("input");
  input.placeholder = `result of ${call.name} (sent as a tool message)`;
  const button = el("button", null, "Send result");
  button.type = "submit";
  form.append(input, button);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.busy) return;
    form.remove();
    state.messages.push({role: "tool", tool_call_id: call.id, content: input.value});
    addMessage("tool", input.value);
    pending.left -= 1;
    if (pending.left === 0) complete();
  });
  view.item.append(form);
}

function toolSpec() {
  // The tool offered with each request, or null; a bad schema is the user's to fix, so say where.
  if (!$("tool-enabled").checked) return null;
  let parameters;
  try {
    parameters = JSON.parse($("tool-schema").value);
  } catch (err) {
    throw new Error("The tool's parameters are not valid JSON: " + err.message);
  }
  const name = $("tool-name").value.trim();
  if (!name) throw new Error("Give the tool a name.");
  return {type: "function", function: {name, description: $("tool-description").value, parameters}};
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...state.messages);
  const body = {
    model: state.model, messages, stream: true, stream_options: {include_usage: true},
    max_tokens: Number($("max-tokens").value) || 128, temperature: Number($("temperature").value),
  };
  const tool = toolSpec();
  if (tool) {
    body.tools = [tool];
    body.tool_choice = $("tool-choice").value;
  }
  return body;
}

async function* serverEvents(response) {
  // Server-sent events: "data: {json}" blocks separated by a blank line, ending with "data: [DONE]".
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy || !state.model;
  $("stop").hidden = !busy;
}

async function complete() {
  let body;
  try {
    body = requestBody();
  } catch (err) {
    showError(err.message);
    return;
  }
  showError("");
  setBusy(true);
  const view = addMessage("assistant", "");
  view.item.classList.add("streaming");
  const started = performance.now();
  let firstAt = null, text = "", usage = null, finish = null;
  const calls = [];
  state.controller = new AbortController();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal});
    if (!response.ok) {
      if (response.status === 401) { state.key = null; await connect(); }
      throw new Error(await errorText(response));
    }
    for await (const chunk of serverEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) {
          if (firstAt === null) firstAt = performance.now();
          text += delta.content;
          view.content.textContent = text;
        }
        for (const tc of delta.tool_calls || []) {
          if (firstAt === null) firstAt = performance.now();
          let call = calls[tc.index];
          if (!call) call = calls[tc.index] = {id: tc.id, name: "", arguments: "", view: addToolCall(view)};
          const fn = tc.function || {};
          if (fn.name) call.name = fn.name;
          if (fn.arguments) call.arguments += fn.arguments;
          call.view.name.textContent = call.name;
          call.view.args.textContent = call.arguments;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
    finish = finish || (err.name === "AbortError" ? "stopped" : "error");
  } finally {
    state.controller = null;
    view.item.classList.remove("streaming");
    setBusy(false);
  }
  const ended = performance.now();
  for (const call of calls) call.view.args.textContent = prettyArguments(call.arguments);
  if (text || calls.length) {
    const message = {role: "assistant", content: text || null};
    if (calls.length) {
      message.tool_calls = calls.map((c) => ({id: c.id, type: "function",
                                              function: {name: c.name, arguments: c.arguments}}));
    }
    state.messages.push(message);
    if (finish === "tool_calls") {
      const pending = {left: calls.length};
      calls.forEach((c) => offerToolResult(view, c, pending));
    }
  }
  showStats(usage, started, firstAt, ended, finish);
}

function showStats(usage, started, firstAt, ended, finish) {
  const parts = [];
  if (usage) {
    const tokens = usage.completion_tokens;
    // Decode speed: tokens after the first, over the time after the first arrived (prefill excluded).
    const decodeSeconds = firstAt === null ? 0 : (ended - firstAt) / 1000;
    parts.push(`${tokens} tokens in ${((ended - started) / 1000).toFixed(2)} s`);
    if (tokens > 1 && decodeSeconds > 0) parts.push(`${((tokens - 1) / decodeSeconds).toFixed(1)} tokens/s`);
    parts.push(`prompt ${usage.prompt_tokens} tokens`);
  }
  if (firstAt !== null) parts.push(`first token after ${Math.round(firstAt - started)} ms`);
  if (finish) parts.push(`finish: ${finish}`);
  $("stats").textContent = parts.join(" · ");
}

// --- wiring ----------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || state.busy || !state.model) return;
  $("prompt").value = "";
  state.messages.push({role: "user", content: text});
  addMessage("user", text);
  complete();
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").replaceChildren();
  $("stats").textContent = "";
  showError("");
});

$("language").addEventListener("change", () => {
  const name = $("language").value;
  $("system").value = name ? `Reply in ${name}.` : "";
});

$("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value;
  $("api-key").value = "";
  connect();
});

connect();
